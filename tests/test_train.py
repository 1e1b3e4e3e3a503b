"""The training loop (dispersion.training.train) on a tiny GPT-2 and synthetic two-domain data, CPU only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dispersion.training import checkpoints as C
from dispersion.training import train as T
from dispersion.core.errors import ConfigError
from dispersion.measure.modeling import load_model, resolve_source

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg)


def _data():
    """Domain ``a``: a periodic sequence over tokens 1..31 (learnable); ``b``: a noisy counter
    over 32..63. Train and held-out parts of each."""
    rng = np.random.default_rng(0)
    a = (1 + (np.arange(6000) * 7) % 31).astype(np.int32)
    b = (32 + (np.arange(6000) + rng.integers(0, 2, 6000)) % 32).astype(np.int32)
    train = {"a": a[:5000], "b": b[:5000]}
    evals = {("a", "validation"): a[5000:5500], ("a", "test"): a[5500:], ("b", "validation"): b[5000:5500],
             ("b", "test"): b[5500:]}
    return train, evals


def _spec(**over) -> T.TrainSpec:
    base = dict(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, eval_batches=1,
                device="cpu")
    base.update(over)
    return T.TrainSpec(**base)


def test_loss_falls_on_micro_data(tmp_path):
    train, evals = _data()
    r = T.train(_model(), train, _spec(steps=40, batch_size=8, eval_every=20), out_dir=tmp_path, eval_tokens=evals)
    rows = C.read_metrics(tmp_path)
    first = {(x["domain"], x["split"]): x["ppl"] for x in rows if x["kind"] == "eval" and x["step"] == 0}
    assert set(first) == set(evals) and set(r.eval) == set(evals)
    assert all(r.eval[k] < 0.5 * first[k] for k in evals)  # both domains, both splits
    losses = [x["loss"] for x in rows if x["kind"] == "train"]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert r.final_loss == losses[-1] and sorted(r.checkpoints) == [40]
    steps_logged = [x["step"] for x in rows if x["kind"] == "eval" and x["domain"] == "a" and x["split"] == "test"]
    assert steps_logged == [0, 20, 40]


def test_schedule_against_naive_formula(tmp_path):
    spec = _spec(steps=50, warmup_steps=5, lr=1e-3, min_lr_ratio=0.1)
    for s in range(50):
        if s < 5:
            naive = 1e-3 * (s + 1) / 5
        else:
            naive = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 5) / 45))
        assert T.lr_at(s, spec) == pytest.approx(naive, rel=1e-12)
    assert T.lr_at(4, spec) == pytest.approx(1e-3) and T.lr_at(50, spec) == pytest.approx(1e-4)
    no_warm = _spec(steps=10, warmup_steps=0, lr=2.0, min_lr_ratio=0.0)
    assert T.lr_at(0, no_warm) == 2.0 and T.lr_at(5, no_warm) == pytest.approx(1.0)
    # the logged lr of update s is lr_at(s - 1)
    train, _ = _data()
    T.train(_model(), train, _spec(steps=6, warmup_steps=3), out_dir=tmp_path)
    logged = [x["lr"] for x in C.read_metrics(tmp_path) if x["kind"] == "train"]
    assert logged == [T.lr_at(s, _spec(steps=6, warmup_steps=3)) for s in range(6)]


class _Recorder(torch.optim.SGD):
    """An optimizer that records the global gradient norm it is asked to apply."""

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.seen = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        return super().step(closure)


def _batch():
    train, _ = _data()
    return T.sample_batch(train, [2, 2], 16, seed=0, step=1)


def test_grad_clipping_bounds_the_norm():
    model = _model()
    for clip in (0.05, None):
        loss, _, _ = T.compute_loss(model, _batch())
        (loss * 100).backward()
        raw = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        opt = _Recorder(model.parameters(), lr=0.0)
        returned = T.clip_and_step(model, opt, clip, lr=0.0)
        assert returned == pytest.approx(raw, rel=1e-5) and raw > 1.0
        assert opt.seen == pytest.approx(clip if clip else raw, rel=1e-4)
        assert all(p.grad is None for p in model.parameters())  # zeroed


def _push_away(outputs, batch):
    """Paper 001 §3.4 cross-domain aux loss: minus the mean cosine distance between the final
    states (last position) of rows of different domains."""
    h = F.normalize(outputs.hidden_states[-1][:, -1].float(), dim=-1)
    a, b = h[batch.domain == 0], h[batch.domain == 1]
    return -(1 - a @ b.T).mean()


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_aux_loss_is_added_with_lambda():
    batch = _batch()
    assert batch.domains == ("a", "b") and batch.domain.tolist() == [0, 0, 1, 1]
    m1, m2, m3 = _model(), _model(), _model()
    loss, ce, aux = T.compute_loss(m1, batch, 0.3, _push_away)
    loss.backward()
    assert loss.item() == pytest.approx(ce.item() + 0.3 * aux.item(), rel=1e-6)
    # manual: the same forward pass, written out
    out = m2(input_ids=batch.input_ids, output_hidden_states=True)
    manual_ce = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten())
    (manual_ce + 0.3 * _push_away(out, batch)).backward()
    torch.testing.assert_close(_grads(m1), _grads(m2), rtol=1e-5, atol=1e-7)
    # lambda = 0: the aux term is reported but has no gradient
    loss0, ce0, aux0 = T.compute_loss(m3, batch, 0.0, _push_away)
    loss0.backward()
    assert aux0.item() == pytest.approx(aux.item()) and not aux0.requires_grad
    m4 = _model()
    F.cross_entropy(m4(input_ids=batch.input_ids).logits.flatten(0, 1), batch.labels.flatten()).backward()
    torch.testing.assert_close(_grads(m3), _grads(m4), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(_grads(m1), _grads(m3))


def test_mixed_batches_and_weight_decay_groups():
    train, _ = _data()
    assert T.rows_per_domain(("a", "b"), 5, None) == [3, 2]
    assert T.rows_per_domain(("a", "b"), 8, {"a": 3, "b": 1}) == [6, 2]
    b = T.sample_batch(train, [3, 2], 16, seed=0, step=4)
    x = b.input_ids
    assert x.shape == (5, 16) and (x[:3] < 32).all() and (x[3:] >= 32).all()
    assert torch.equal(b.labels[:, :-1], x[:, 1:])
    assert torch.equal(T.sample_batch(train, [3, 2], 16, seed=0, step=4).input_ids, x)
    assert not torch.equal(T.sample_batch(train, [3, 2], 16, seed=0, step=5).input_ids, x)
    model = _model()
    decay, no_decay = T.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.wte.weight", "transformer.wpe.weight",
                                                          "transformer.ln_f.weight", "transformer.h.0.attn.c_attn.bias"}
    with pytest.raises(ConfigError, match="batch_size"):
        T.rows_per_domain(("a", "b"), 1, None)


def test_checkpoints_reload_with_identical_logits(tmp_path):
    train, evals = _data()
    model = _model()
    r = T.train(model, train, _spec(save_at=[0, 3]), out_dir=tmp_path, eval_tokens=evals)
    assert sorted(r.checkpoints) == [0, 3, 6]
    assert not list(tmp_path.glob(".tmp-*"))
    x = _batch().input_ids
    loaded = load_model(resolve_source(str(tmp_path), "step6"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
        step0 = load_model(resolve_source(str(tmp_path), "step0"))
        assert torch.equal(step0(input_ids=x).logits, _model()(input_ids=x).logits)
    state = json.loads((tmp_path / "step6" / C.STATE_FILE).read_text())
    assert state["step"] == 6 and state["trainable"] is None
    assert (tmp_path / "step6" / "model.safetensors").exists()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    train, evals = _data()
    spec = _spec(steps=6, save_at=[3], eval_every=1)
    full = _model()
    T.train(full, train, spec, out_dir=tmp_path / "full", eval_tokens=evals)

    class Crash(Exception):
        pass

    def crash_at_5(step, ppl):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        T.train(_model(), train, spec, out_dir=tmp_path / "cut", eval_tokens=evals, on_eval=crash_at_5)
    assert C.checkpoint_steps(tmp_path / "cut") == [3]
    resumed = _model(seed=1)  # whatever the start: the checkpoint's weights are loaded
    r = T.train(resumed, train, spec, out_dir=tmp_path / "cut", eval_tokens=evals)
    assert r.resumed_from == 3
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    rows = C.read_metrics(tmp_path / "cut")
    assert [x["step"] for x in rows if x["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    clean = C.read_metrics(tmp_path / "full")
    assert [x["loss"] for x in rows if x["kind"] == "train"] == [x["loss"] for x in clean if x["kind"] == "train"]
    # a finished run returns at once; another spec on the same folder is refused in one line
    again = T.train(_model(seed=2), train, spec, out_dir=tmp_path / "cut", eval_tokens=evals)
    assert again.resumed_from == 6 and len(C.read_metrics(tmp_path / "cut")) == len(rows)
    with pytest.raises(ConfigError, match="different run") as err:
        T.train(_model(), train, _spec(steps=6, lr=5e-3), out_dir=tmp_path / "cut")
    assert "\n" not in str(err.value)
    # unless the caller owns the folder (restart_stale): the stale run goes and this one starts
    # afresh, with the weights and log of a run in an empty folder
    other = _spec(steps=6, lr=5e-3, save_at=[3], eval_every=1)
    fresh, restarted = _model(), _model()
    T.train(fresh, train, other, out_dir=tmp_path / "fresh", eval_tokens=evals)
    r = T.train(restarted, train, other, out_dir=tmp_path / "cut", eval_tokens=evals, restart_stale=True)
    assert r.resumed_from is None and C.checkpoint_steps(tmp_path / "cut") == C.checkpoint_steps(tmp_path / "fresh")
    for (n, p), (_, q) in zip(fresh.named_parameters(), restarted.named_parameters()):
        assert torch.equal(p, q), n
    def untimed(folder):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in C.read_metrics(folder)]
    assert untimed(tmp_path / "cut") == untimed(tmp_path / "fresh")


def test_per_domain_eval_equals_a_naive_loop(tmp_path):
    train, evals = _data()
    model = _model()
    r = T.train(model, train, _spec(steps=3, batch_size=3, eval_batches=2), out_dir=tmp_path, eval_tokens=evals)
    model.eval()
    for (dom, split), ids in evals.items():
        nlls = []
        for s in np.linspace(0, ids.size - 17, 6).astype(int):  # eval_batches x batch_size windows
            w = torch.as_tensor(ids[s:s + 17], dtype=torch.long)[None]
            with torch.no_grad():
                logits = model(input_ids=w[:, :-1]).logits[0]
            logp = torch.log_softmax(logits, -1)
            nlls += [-logp[t, w[0, t + 1]].item() for t in range(16)]
        assert r.eval[(dom, split)] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-5)


def _crash_at(n: int):
    class Crash(Exception):
        pass

    def on_eval(step, ppl):
        if step == n:
            raise Crash
    return Crash, on_eval


def test_a_run_moved_to_another_machine_resumes_from_the_store(tmp_path, s3):
    """Checkpoints and metrics are mirrored to S3 (moto on loopback) as they are written; a
    run whose local folder is gone (another node) pulls the newest stored checkpoint and ends
    with the weights and losses of an uninterrupted run."""
    from dispersion.core.storage import Store

    train, evals = _data()
    spec = _spec(steps=6, save_at=[3], eval_every=1)
    full = _model()
    T.train(full, train, spec, out_dir=tmp_path / "full", eval_tokens=evals)

    store = Store("s3://dispersion-test/train")
    mirror = C.Mirror(store, "runs/a")
    Crash, crash_at_5 = _crash_at(5)
    with pytest.raises(Crash):
        T.train(_model(), train, spec, out_dir=tmp_path / "node1", eval_tokens=evals, on_eval=crash_at_5,
                mirror=mirror)
    assert mirror.steps() == [3]
    stored = sorted(p.rsplit("/", 1)[-1] for p in store.glob("runs/a/step3/*"))
    assert stored == sorted(p.name for p in (tmp_path / "node1" / "step3").iterdir())
    assert C.OPTIMIZER_FILE in stored and C.STATE_FILE in stored
    logged = [json.loads(x) for x in store.fs.cat(store.path("runs/a/metrics.jsonl")).decode().splitlines()]
    assert max(r["step"] for r in logged) == 5  # pushed at every evaluation, up to the crash

    resumed = _model(seed=1)
    r = T.train(resumed, train, spec, out_dir=tmp_path / "node2", eval_tokens=evals, mirror=mirror)
    assert r.resumed_from == 3 and mirror.steps() == [3, 6]
    assert r.urls == {3: "s3://dispersion-test/train/runs/a/step3", 6: "s3://dispersion-test/train/runs/a/step6"}
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    losses = [x["loss"] for x in C.read_metrics(tmp_path / "node2") if x["kind"] == "train"]
    assert losses == [x["loss"] for x in C.read_metrics(tmp_path / "full") if x["kind"] == "train"]
    # the stored final checkpoint loads like a local one
    pulled = mirror.pull(6, tmp_path / "node3")
    x = _batch().input_ids
    with torch.no_grad():
        assert torch.equal(load_model(resolve_source(str(pulled.parent), "step6"))(input_ids=x).logits,
                           full(input_ids=x).logits)


def test_a_local_checkpoint_ahead_of_the_store_is_kept(tmp_path):
    """The local folder wins when it is newer (the store lags only by an upload)."""
    from dispersion.core.storage import Store

    train, evals = _data()
    spec = _spec(steps=6, save_at=[2, 4], eval_every=1)
    mirror = C.Mirror(Store(str(tmp_path / "store")), "run")
    Crash, crash_at_5 = _crash_at(5)
    with pytest.raises(Crash):
        T.train(_model(), train, spec, out_dir=tmp_path / "local", eval_tokens=evals, on_eval=crash_at_5,
                mirror=mirror)
    import shutil

    shutil.rmtree(tmp_path / "store" / "run" / "step4")  # as if the last upload never happened
    assert mirror.steps() == [2] and mirror.sync_down(tmp_path / "local") is None
    r = T.train(_model(), train, spec, out_dir=tmp_path / "local", eval_tokens=evals, mirror=mirror)
    assert r.resumed_from == 4 and mirror.steps() == [2, 4, 6]


def test_a_stored_checkpoint_of_another_run_is_refused_before_any_download(tmp_path):
    from dispersion.core.storage import Store

    train, evals = _data()
    mirror = C.Mirror(Store(str(tmp_path / "store")), "run")
    T.train(_model(), train, _spec(steps=4, save_at=[2]), out_dir=tmp_path / "a", eval_tokens=evals, mirror=mirror)
    assert mirror.steps() == [2, 4]
    with pytest.raises(ConfigError, match="holds a checkpoint of a different run") as err:
        T.train(_model(), train, _spec(steps=4, lr=5e-3), out_dir=tmp_path / "b", eval_tokens=evals, mirror=mirror)
    assert str(tmp_path / "store" / "run" / "step4") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
