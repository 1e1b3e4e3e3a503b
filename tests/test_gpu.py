"""GPU checks: extraction, training, auxiliary losses and metrics on CUDA against CPU float64 /
float32 references. Every test is skipped without a CUDA device (CI is CPU only).

Models are tiny GPT-2 / Llama built from configs (``AutoModelForCausalLM.from_config``, seeded),
never downloaded. Tolerances:

* CUDA float32 vs CPU float32: the same arithmetic up to summation order (TF32 is off by
  default in torch), ~1e-4 relative; pooled states are stored as float16 (~5e-4 relative).
* CUDA bfloat16 (weights, or autocast as in ``dispersion.training.train``) vs CPU float32: bf16 has an
  8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per value), which compounds over a few layers
  to ~1e-2 relative on states and NLL; the bounds below are 2-3x what the same comparison gives
  with CPU bfloat16.

Run on a GPU machine: ``python -m pytest -q -rP tests/test_gpu.py`` (``-rP`` shows the measured
errors each test prints).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import reference as naive  # the naive float64 references (tests/reference.py)
import torch

from dispersion.measure import metrics as M
from dispersion.measure.extract import Extractor
from dispersion.measure.modeling import load_model, resolve_source
from dispersion.training import losses as L
from dispersion.training import train as T

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
VOCAB = 512
BOS = 1


# ----------------------------------------------------------------------------- helpers


def _config(arch: str, *, vocab: int = VOCAB, d: int = 128, layers: int = 4, ctx: int = 256, init: float = 0.05):
    """A small GPT-2 or Llama config. ``init`` above HF's 0.02 gives non-uniform predictions (a
    0.02 init predicts every token with probability ~1/V, which would make NLL checks trivial)."""
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=layers, n_head=4, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=0,
                          initializer_range=init)
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx,
                       bos_token_id=BOS, eos_token_id=BOS, pad_token_id=0, initializer_range=init)


def _model(arch: str, seed: int = 0, **kw):
    """A seeded fp32 model on the CPU (the caller's RNG state is kept)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(arch, **kw))
    return model.eval()


def _row_rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row relative error ||a - b|| / ||b|| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def _rel(a: float, b: float) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten().cpu(), b.detach().double().flatten().cpu()
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- (a) extraction


def _segments(n: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=int(rng.integers(24, 97))).astype(np.int32) for _ in range(n)]


def _hf_reference(model, segs, layers, skip):
    """Per segment, one plain transformers forward on the CPU in fp32 (no batching, no hooks):
    NLL sum and last-token NLL (float64 log-softmax), last / mean pooled states per layer
    (HF ``hidden_states[l]`` = block l's output for l < n, ``[n]`` = the final-norm output) and
    the within-segment mean pairwise cosine distance of the kept states."""
    n = model.config.num_hidden_layers
    index = {name: (n if name == "final" else int(name)) for name in layers}
    ref = {"nll_sum": [], "last_nll": [], "n_scored": []}
    vec = {(name, pool): [] for name in layers for pool in ("last", "mean")}
    within = {name: [] for name in layers}
    with torch.no_grad():
        for s in segs:
            ids = torch.tensor([[BOS, *s.tolist()]])
            out = model(input_ids=ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
            tok = -logp.gather(1, ids[0, 1:, None]).squeeze(1).numpy()
            ref["nll_sum"].append(tok.sum())
            ref["last_nll"].append(tok[-1])
            ref["n_scored"].append(len(tok))
            for name, i in index.items():
                h = out.hidden_states[i][0].double().numpy()
                kept = h[1 + skip:]  # drop BOS and the first `skip` segment tokens
                vec[(name, "last")].append(h[-1])
                vec[(name, "mean")].append(kept.mean(0))
                within[name].append(naive.dispersion(kept))
    ref = {k: np.asarray(v) for k, v in ref.items()}
    ref["ppl"] = np.exp(ref["nll_sum"] / ref["n_scored"])
    return ref, {k: np.stack(v) for k, v in vec.items()}, {k: np.asarray(v) for k, v in within.items()}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_extraction_on_cuda_matches_cpu_fp32(arch, dtype, compiled):
    """Extractor on CUDA (bf16 or fp32 weights, batched, padded, hooks, chunked NLL; eager or
    compiled blocks, ``extraction.compile``) vs a plain per-segment transformers forward on the
    CPU in fp32; the CPU Extractor is checked against the same reference (tight), and dispersion
    metrics of the pooled states agree."""
    cpu_model = _model(arch)
    segs = _segments()
    layers, skip = ["1", "2", "final"], 2
    kw = dict(layers=[1, 2, "final"], pools=["last", "mean"], bos_token_id=BOS, skip_first=skip,
              context_lengths=[8, 20], batch_size=16, nll_chunk_tokens=512)
    ref, ref_vec, ref_within = _hf_reference(cpu_model, segs, layers, skip)
    cpu = Extractor(cpu_model, **kw).extract(segs)
    gpu_model = copy.deepcopy(cpu_model).to(device=DEVICE, dtype=getattr(torch, dtype))
    ex = Extractor(gpu_model, compile_blocks=compiled, **kw)
    assert ex.device.type == torch.device(DEVICE).type
    gpu = ex.extract(segs)
    assert ex.compile_note is None  # a compile that failed would have fallen back to eager

    bf16 = dtype == "bfloat16"
    tol = dict(ppl=1e-2 if bf16 else 1e-4, nll=5e-2 if bf16 else 1e-4, vec=3e-2 if bf16 else 2e-3,
               within=5e-3 if bf16 else 1e-4, metric=1e-2 if bf16 else 1e-4)
    # the CPU fp32 Extractor reproduces the reference tightly (pooled states stored as float16)
    np.testing.assert_allclose(cpu.features["ppl"], ref["ppl"], rtol=1e-4)
    assert _row_rel(cpu.vectors[("final", "block", "mean")], ref_vec[("final", "mean")]).max() < 2e-3

    report = {}
    assert (gpu.features["n_scored"] == ref["n_scored"]).all()
    report["ppl"] = float(np.max(np.abs(gpu.features["ppl"] / ref["ppl"] - 1)))
    assert report["ppl"] < tol["ppl"]
    report["nll_sum"] = float(np.max(np.abs(gpu.features["nll_sum"] / ref["nll_sum"] - 1)))
    assert report["nll_sum"] < tol["ppl"]
    report["last_nll"] = float(np.max(np.abs(gpu.features["last_token_nll"] - ref["last_nll"])))
    assert report["last_nll"] < tol["nll"]
    for c in (8, 20):  # the last-token NLL of the prefix of length c: read from the same pass
        np.testing.assert_allclose(gpu.features[f"last_nll_c{c}"], cpu.features[f"last_nll_c{c}"],
                                   atol=tol["nll"], rtol=0)
    for name in layers:
        for pool in ("last", "mean"):
            v = gpu.vectors[(name, "block", pool)]
            assert v.dtype == np.float16 and np.isfinite(v).all()
            err = float(_row_rel(v, ref_vec[(name, pool)]).max())
            report[f"{name}/{pool}"] = err
            assert err < tol["vec"], (name, pool, err)
            np.testing.assert_allclose(gpu.norms[(name, "block", pool)], np.linalg.norm(ref_vec[(name, pool)], axis=1),
                                       rtol=tol["vec"])
        w = float(np.max(np.abs(gpu.within[(name, "block")] - ref_within[name])))
        report[f"within {name}"] = w
        assert w < tol["within"], (name, w)

    # dispersion metrics over the segments, from the CUDA states vs from the reference states
    labels = np.arange(len(segs)) % 3
    for name, pool in [("final", "last"), ("final", "mean"), ("1", "mean")]:
        got = gpu.vectors[(name, "block", pool)].astype(np.float64)
        want = ref_vec[(name, pool)]
        pairs = [(M.cosine_dispersion(got), naive.dispersion(want)),
                 (M.euclidean_dispersion(got), naive.dispersion(want, "euclidean")),
                 (M.vendi_score(got), naive.vendi_score(want)),
                 *zip(M.cluster_dispersion(got, labels), naive.cluster_dispersion(want, labels))]
        for i, (a, b) in enumerate(pairs):
            err = _rel(a, b)
            report[f"metric{i} {name}/{pool}"] = err
            assert err < tol["metric"], (name, pool, i, a, b)
    print(f"{arch} {dtype}: max errors vs CPU fp32 reference:",
          {k: f"{v:.1e}" for k, v in report.items()})


# ----------------------------------------------------------------------------- (b) training

TRAIN_VOCAB = 128


def _markov_tokens(n: int, seed: int) -> np.ndarray:
    """Random tokens with learnable structure: next = perm[current] (90%) or a uniform token."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(TRAIN_VOCAB)
    noise = rng.random(n) < 0.1
    rnd = rng.integers(0, TRAIN_VOCAB, n)
    x = np.empty(n, np.int64)
    x[0] = 0
    for i in range(1, n):
        x[i] = rnd[i] if noise[i] else perm[x[i - 1]]
    return x.astype(np.int32)


def _train_data():
    a = _markov_tokens(23_000, 0)
    train = {"a": a[:20_000], "b": _markov_tokens(20_000, 1)}  # two chains (two permutations)
    evals = {("a", "validation"): a[20_000:]}  # held-out continuation of chain a
    return train, evals


def _train_spec(**over) -> T.TrainSpec:
    base = dict(steps=20, batch_size=8, seq_len=64, lr=1e-2, warmup_steps=2, eval_batches=2, eval_every=10,
                save_at=[10], device=DEVICE, dtype="auto")
    base.update(over)
    return T.TrainSpec(**base)


def _train_model(arch: str, seed: int = 0):
    return _model(arch, seed, vocab=TRAIN_VOCAB, d=64, layers=2, ctx=128, init=0.02)


def _metrics(out_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _complete_steps(out_dir) -> list[int]:
    """Steps of the checkpoint folders that have a trainer state (written last)."""
    return sorted(int(p.name[4:]) for p in Path(out_dir).glob("step*") if (p / "trainer_state.json").is_file())


def _naive_eval_ppl(model, ids: np.ndarray, seq_len: int, n: int) -> float:
    """exp(mean token NLL) over n evenly spaced windows of seq_len + 1 tokens, CPU fp32, one at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in np.linspace(0, ids.size - seq_len - 1, n).astype(np.int64):
            w = torch.as_tensor(ids[s:s + seq_len + 1], dtype=torch.long)[None]
            logp = torch.log_softmax(model(input_ids=w[:, :-1]).logits[0].double(), -1)
            nll -= float(logp.gather(1, w[0, 1:, None]).sum())
            count += seq_len
    return math.exp(nll / count)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_train_on_cuda_bf16_autocast_checkpoint_and_resume(arch, tmp_path):
    train, evals = _train_data()
    spec = _train_spec()
    device = torch.device(DEVICE)
    assert T.amp_dtype(spec, device) == "bfloat16"  # dtype auto on CUDA = bf16 autocast

    model = _train_model(arch)
    seen = set()
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    r = T.train(model, train, spec, out_dir=tmp_path / "full", eval_tokens=evals)
    hook.remove()
    assert seen == {torch.bfloat16}  # the LM head ran under bf16 autocast (training and evaluation)
    assert all(p.device.type == device.type and p.dtype == torch.float32 for p in model.parameters())  # fp32 master

    rows = _metrics(tmp_path / "full")
    losses = [x["loss"] for x in rows if x["kind"] == "train"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
    ppl0 = next(x["ppl"] for x in rows if x["kind"] == "eval" and x["step"] == 0)
    key = ("a", "validation")
    assert math.isfinite(r.eval[key]) and r.eval[key] < 0.9 * ppl0
    assert sorted(r.checkpoints) == [10, 20] == _complete_steps(tmp_path / "full") and r.final_loss == losses[-1]

    # the checkpoint reloads on the CPU with the trained weights, bit for bit (saved fp32)
    loaded = load_model(resolve_source(str(tmp_path / "full"), "step20"), dtype="float32", device="cpu")
    trained = {k: v.cpu() for k, v in model.state_dict().items()}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # the bf16-autocast eval perplexity vs a naive fp32 CPU evaluation of the same windows
    ref_ppl = _naive_eval_ppl(loaded, evals[key], spec.seq_len, spec.eval_batches * spec.batch_size)
    assert r.eval[key] == pytest.approx(ref_ppl, rel=2e-2)

    # resume: a run cut after the step-10 checkpoint, resumed from a fresh model, vs the straight run
    class Crash(Exception):
        pass

    def crash_at_20(step, _ppl):
        if step == 20:  # evaluation of step 20 runs before its checkpoint is written
            raise Crash

    with pytest.raises(Crash):
        T.train(_train_model(arch), train, spec, out_dir=tmp_path / "cut", eval_tokens=evals, on_eval=crash_at_20)
    assert _complete_steps(tmp_path / "cut") == [10]
    resumed = _train_model(arch, seed=1)  # whatever its start: the checkpoint's weights are loaded
    r2 = T.train(resumed, train, spec, out_dir=tmp_path / "cut", eval_tokens=evals)
    assert r2.resumed_from == 10 and sorted(r2.checkpoints) == [10, 20]
    rows2 = _metrics(tmp_path / "cut")
    assert [x["step"] for x in rows2 if x["kind"] == "train"] == list(range(1, 21))
    # On CPU the trainer is bit-identical across a resume (tests/test_train.py). On CUDA some
    # kernels (attention backward, reductions with atomics, cuBLAS heuristics) are not guaranteed
    # deterministic, and Adam can amplify tiny gradient differences on near-zero gradients, so the
    # resumed weights are compared in norm, relative to how far training moved them, and the
    # losses within 1e-3; whether they happen to be bit-identical is printed.
    losses2 = [x["loss"] for x in rows2 if x["kind"] == "train"]
    np.testing.assert_allclose(losses2, losses, rtol=1e-3)
    assert r2.eval[key] == pytest.approx(r.eval[key], rel=1e-3)
    start = _train_model(arch)
    with torch.no_grad():
        w = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        w_resumed = torch.cat([p.detach().flatten().cpu() for p in resumed.parameters()])
        w_start = torch.cat([p.detach().flatten() for p in start.parameters()])
    identical = torch.equal(w, w_resumed)
    diff = float((w_resumed - w).norm() / (w - w_start).norm())
    assert diff < 1e-2, diff
    print(f"{arch}: losses {losses[0]:.3f} -> {losses[-1]:.3f}; eval ppl {ppl0:.1f} -> {r.eval[key]:.2f} "
          f"(CPU fp32 {ref_ppl:.2f}); resume bit-identical: {identical}, |w_resumed - w| / |w - w_0| = {diff:.1e}, "
          f"max |dw| {float((w_resumed - w).abs().max()):.1e}")


# ----------------------------------------------------------------------------- (c) auxiliary losses

LOSS_CASES = {
    "push_away": dict(name="push_away"),
    "push_away_seq_all": dict(name="push_away", scope="sequence", where="all"),
    "cross_domain": dict(name="cross_domain"),
    "squeeze": dict(name="squeeze", where="upper"),
    "dispersion": dict(name="dispersion"),
    "dispersion_code_flatten": dict(name="dispersion", form="code", tau=0.5, scope="flatten"),
    "dispersion_capped": dict(name="dispersion", where="all", max_tokens=24),
    "decorrelation": dict(name="decorrelation"),
    "decorrelation_code": dict(name="decorrelation", form="code"),
    "l2_repel": dict(name="l2_repel", tau=4.0),
    "orthogonal": dict(name="orthogonal"),
}
# (value rtol, gradient cosine) for: bf16 states outside autocast (dispersion.training.train's path: the
# loss casts the states to fp32), and the whole loss inside bf16 autocast (its matmuls in bf16)
LOSS_TOL = {"trainer": (5e-3, 0.999), "autocast": (2e-2, 0.99)}


def _states(B: int = 4, T_: int = 48, d: int = 64, layers: int = 3, seed: int = 0):
    """Hidden states [B, T, d] per layer (embeddings + blocks), fp32, with a shared direction so
    cosines are not all ~0 (as in LM states)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    return tuple(torch.randn(B, T_, d, generator=g) + 0.6 * common for _ in range(layers + 1))


class _Out:
    def __init__(self, hs):
        self.hidden_states = hs


def _aux_value_and_grads(aux, hs, batch, autocast: bool):
    leaves = [h.detach().clone().requires_grad_(True) for h in hs]
    torch.manual_seed(0)  # the max_tokens draw
    device_type = leaves[0].device.type
    ctx = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        val = aux(_Out(tuple(leaves)), batch)
    val.float().backward()
    grads = [torch.zeros_like(h) if h.grad is None else h.grad for h in leaves]
    return val.detach(), torch.cat([g.flatten().float().cpu() for g in grads])




@pytest.mark.parametrize("mode", ["trainer", "autocast"])
@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_aux_losses_on_cuda_bf16_match_cpu_fp32(case, mode):
    """Each auxiliary loss (through make_aux_loss, over the layers of its ``where``) on bf16 CUDA
    states vs the same loss on the fp32 CPU states: ``trainer`` = the loss outside autocast, as
    dispersion.training.train.compute_loss calls it (it casts the states to fp32); ``autocast`` = the whole
    loss inside ``torch.autocast(bfloat16)`` (its matmuls then run in bf16)."""
    spec = L.LossSpec(lam=0.1, **LOSS_CASES[case])
    aux = L.make_aux_loss(spec)
    hs = _states()
    batch = T.Batch(None, None, torch.tensor([0, 1, 0, 1]), ("a", "b"))
    ref_val, ref_grad = _aux_value_and_grads(aux, hs, batch, autocast=False)  # CPU fp32
    assert torch.isfinite(ref_val) and torch.isfinite(ref_grad).all()
    hs_gpu = tuple(h.to(DEVICE, torch.bfloat16) for h in hs)  # what a model emits under bf16 autocast
    val, grad = _aux_value_and_grads(aux, hs_gpu, batch, autocast=mode == "autocast")
    assert val.device.type == torch.device(DEVICE).type
    assert torch.isfinite(val)
    assert torch.isfinite(grad).all()
    rtol, min_cos = LOSS_TOL[mode]
    err, cos = _rel(val, ref_val), _cos(grad, ref_grad)
    assert err < rtol + 1e-4 / max(abs(float(ref_val)), 1e-12), (float(val), float(ref_val))
    assert cos > min_cos, cos
    if mode == "trainer":  # fp32 arithmetic on both devices on identical (bf16-rounded) inputs
        rounded_val, _ = _aux_value_and_grads(aux, tuple(h.float().cpu() for h in hs_gpu), batch, autocast=False)
        assert _rel(val, rounded_val) < 1e-3 + 1e-6 / max(abs(float(rounded_val)), 1e-12)
    print(f"{case} {mode}: value {float(ref_val):.5g}, rel error {err:.1e}, gradient cosine {cos:.6f}")


@pytest.mark.parametrize("case", ["push_away", "cross_domain", "dispersion_capped", "decorrelation"])
def test_compute_loss_with_aux_on_cuda_bf16_matches_cpu_fp32(case):
    """The trainer's step (dispersion.training.train.compute_loss: forward under bf16 autocast, CE + lam *
    aux) on CUDA vs the same step in fp32 on the CPU: loss terms close, parameter gradients finite
    and aligned."""
    spec = L.LossSpec(lam=0.1, **LOSS_CASES[case])
    aux = L.make_aux_loss(spec)
    train, _ = _train_data()
    arrays = T.domain_arrays(train)
    batch = T.sample_batch(arrays, [4, 4], 64, seed=0, step=1)
    results = []
    for where, amp in (("cpu", "float32"), (DEVICE, "bfloat16")):
        model = _train_model("gpt2").to(where).train()
        torch.manual_seed(0)
        loss, ce, a = T.compute_loss(model, batch, spec.lam, aux, device=torch.device(where), amp=amp)
        loss.backward()
        grad = torch.cat([p.grad.flatten().cpu() for p in model.parameters()])
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), where
        results.append((float(loss.detach()), float(ce.detach()), float(a.detach()), grad))
    (l0, c0, a0, g0), (l1, c1, a1, g1) = results
    assert _rel(c1, c0) < 1e-2 and _rel(l1, l0) < 1e-2
    assert abs(a1 - a0) < 2e-2 * abs(a0) + 1e-4
    cos = _cos(g1, g0)
    assert cos > 0.99, cos
    print(f"{case}: ce {c0:.4f}/{c1:.4f}, aux {a0:.5g}/{a1:.5g}, grad cos {cos:.5f}")


# ----------------------------------------------------------------------------- (d) metrics on CUDA tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_metrics_accept_cuda_tensors(dtype):
    """dispersion.measure.metrics takes torch tensors on any device and dtype (converted to float64 on the
    CPU): results equal a naive float64 numpy computation on the same (rounded) values."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(48, generator=g)
    X = (torch.randn(300, 48, generator=g) + 0.5 * common).to(DEVICE, dtype)
    Y = (torch.randn(200, 48, generator=g) - 0.3 * common).to(DEVICE, dtype)
    E = torch.randn(1000, 48, generator=g).to(DEVICE, dtype)
    labels = torch.arange(300, device=DEVICE) % 4
    x, y, e = (t.double().cpu().numpy() for t in (X, Y, E))
    rtol = 1e-9
    assert M.cosine_dispersion(X) == pytest.approx(naive.dispersion(x), rel=rtol)
    assert M.euclidean_dispersion(X, chunk_size=128) == pytest.approx(naive.dispersion(x, "euclidean"), rel=rtol)
    assert M.vendi_score(X) == pytest.approx(naive.vendi_score(x), rel=1e-7)
    assert M.mean_cosine_distance_between(X, Y) == pytest.approx(naive.mean_distance_between(x, y), rel=rtol)
    within, between = M.cluster_dispersion(X, labels)
    w_ref, b_ref = naive.cluster_dispersion(x, labels.cpu().numpy())
    assert within == pytest.approx(w_ref, rel=rtol) and between == pytest.approx(b_ref, rel=rtol)
    dom = np.arange(0, 1000, 7)
    refs = np.arange(3, 1000, 11)
    gap = M.dispersion_gap(E, dom, refs)
    wt = naive.dispersion(e[dom])
    bt = naive.mean_distance_between(e[dom], e[refs])
    assert gap.within_domain == pytest.approx(wt, rel=rtol)
    assert gap.within_reference == pytest.approx(naive.dispersion(e[refs]), rel=rtol)
    assert gap.between == pytest.approx(bt, rel=rtol) and gap.gap == pytest.approx(wt + bt, rel=rtol)
    gap_e = M.dispersion_gap(E, dom, refs, metric="euclidean", chunk_size=64)
    assert gap_e.within_domain == pytest.approx(naive.dispersion(e[dom], "euclidean"), rel=rtol)
    with pytest.raises(ValueError, match="zero vector"):
        M.cosine_dispersion(torch.zeros(3, 4, device=DEVICE))
