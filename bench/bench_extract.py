"""Extraction benchmarks, ours vs the naive way, side by side in one run.

(b) throughput: segments/s and model FLOP/s as a fraction of this machine's matmul peak
    (measured here, same dtype), for the batched ``Extractor`` and for a naive loop that
    calls the model once per segment with ``output_hidden_states=True`` and takes the
    loss from full logits.
(c) peak memory (peak RSS above the RSS before extraction, Linux VmHWM after clear_refs)
    of extraction at N and 4N
    segments, and with a 128k vocabulary, ours vs naive batched full-logits log-softmax.

Each memory measurement runs in a fresh subprocess so peaks do not mix.

Forward FLOPs per token: 2 * (matmul parameters incl. the LM head) + 2 * n_layer * T * d
(attention scores and weighted values, causal half of T x T, two matmuls).

Usage: python bench/bench_extract.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]
       [--d D --layers L --T T --batch B]   (the model and segments of the memory runs (c))
       [--shapes NAME,...] [--naive-n N] [--no-memory]

On CUDA the throughput shapes are named presets (``--shapes``, default ``llama-d1024``):

* ``llama-d1024``: d 1024, 8 layers, vocab 32000 (the synthetic shape of earlier runs);
* ``smollm2-135m``: SmolLM2-135M's published config (d 576, 30 layers, 9 heads / 3 KV heads,
  MLP 1536, vocab 49152, tied head), randomly initialised: throughput does not depend on the
  weights' values;
* ``llama-3.2-1b``: Llama-3.2-1B's config (d 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192,
  vocab 128256, tied head), randomly initialised.

On CUDA ours also runs with the fused head and compiled blocks (``extraction.fused_head`` and
``extraction.compile`` on, a copy of the model compiled in its warm-up); the CPU's comparison of
compiled and eager blocks is bench/bench_compile.py.

Each shape runs 1024 segments of 512 tokens (256 with --quick) through ours and through the
field's two-pass pattern (a batched full-logit fp32 log-softmax loss pass, as
lm-evaluation-harness' HFLM computes log-likelihoods, then a batched
``output_hidden_states=True`` pass for the states), both at the same batch, and the first
``--naive-n`` segments through the per-segment loop. Every timed region ends with
``torch.cuda.synchronize()``; the fraction of peak is against a measured 8192^3 matmul in the
same dtype; (c) also reports the peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from rss import peak_rss_kb, reset_peak_rss  # noqa: E402  (bench/rss.py)

from dispersion.measure.extract import Extractor  # noqa: E402

# name: (vocab, d, layers, heads, kv_heads, mlp, tied head)
SHAPES = {
    "llama-d1024": (32000, 1024, 8, 16, 16, 2728, False),
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536, True),
    "llama-3.2-1b": (128256, 2048, 16, 32, 8, 8192, True),
}


def make_model(vocab: int, d: int, layers: int, ctx: int, device: str, dtype: str, heads: int | None = None,
               kv_heads: int | None = None, mlp: int | None = None, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = heads or max(1, d // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=mlp or int(8 * d / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=ctx, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                      tie_word_embeddings=tied)
    with torch.device(device):  # initialise on the device: a 1B model's CPU init takes minutes
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=getattr(torch, dtype)).eval()
    model.config._attn_implementation = "sdpa"
    return model


def flops_per_token(model, T: int) -> float:
    """2 x matmul parameters (all 2-D weights but the token embedding, plus the LM head once even
    when it is tied to the embedding) + 2 x n_layer x T x d (attention scores and values)."""
    cfg = model.config
    params = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    matmul = sum(p.numel() for p in params)
    head = model.get_output_embeddings().weight
    if not any(p is head for p in params):
        matmul += head.numel()
    return 2.0 * matmul + 2.0 * cfg.num_hidden_layers * T * cfg.hidden_size


def matmul_peak(device: str, dtype: str, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def segments(n: int, T: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(2, vocab, T).astype(np.int32) for _ in range(n)]


@torch.inference_mode()
def naive(model, segs, device: str) -> dict:
    """Once per segment: full logits, fp32 log-softmax, every hidden state; pool in numpy."""
    ppl, vecs = [], []
    for s in segs:
        ids = torch.tensor([[1, *s.tolist()]], device=device)
        out = model(input_ids=ids, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean()
        ppl.append(float(torch.exp(nll)))
        vecs.append(out.hidden_states[-1][0, -1].float().cpu().numpy())
    return {"ppl": np.array(ppl), "vec": np.stack(vecs)}


@torch.inference_mode()
def naive_batched(model, segs, device: str, batch: int) -> None:
    """Batched, but with full [B, T, V] fp32 logits (what chunking avoids)."""
    for i in range(0, len(segs), batch):
        ids = torch.tensor([[1, *s.tolist()] for s in segs[i:i + batch]], device=device)
        logits = model(input_ids=ids).logits.float()
        torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])


@torch.inference_mode()
def two_pass(model, segs, device: str, batch: int) -> dict:
    """The usual two passes, batched: full fp32 logits and log-softmax for the loss, then
    ``output_hidden_states=True`` for the final layer's last-token state."""
    ppl, vecs = [], []
    for i in range(0, len(segs), batch):
        ids = torch.tensor(np.stack([np.concatenate([[1], s]) for s in segs[i:i + batch]]), device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        nll = -logp.gather(2, ids[:, 1:, None])[..., 0].mean(1)
        del logp
        ppl.append(torch.exp(nll).cpu())
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        vecs.append(h[:, -1].float().cpu())
    return {"ppl": torch.cat(ppl).numpy(), "vec": torch.cat(vecs).numpy()}


def ours(model, segs, batch: int, layers=("final",), compiled: bool = False) -> dict:
    """Our extractor; ``compiled``: with the fused head and compiled blocks (``extraction.fused_head``
    and ``extraction.compile`` on; the compile happens in the warm-up call)."""
    ex = Extractor(model, layers=list(layers), pools=["last"], bos_token_id=1, batch_size=batch,
                   nll_chunk_tokens=1024, fused_head=compiled, compile_blocks=compiled)
    out = ex.extract(segs)
    return {"ppl": out.features["ppl"], "vec": out.vectors[("final", "block", "last")].astype(np.float32)}


def child(args) -> None:
    """One memory measurement; prints JSON."""
    model = make_model(args.vocab, args.d, args.layers, args.T + 1, args.device, args.dtype)
    segs = segments(args.n, args.T, args.vocab)
    base = reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    _sync(args.device)
    t = time.perf_counter()
    if args.method == "ours":
        ours(model, segs, args.batch)
    else:
        naive_batched(model, segs, args.device, args.batch)
    _sync(args.device)  # CUDA kernels run asynchronously: wait for them before reading the clock
    res = {"seconds": time.perf_counter() - t, "peak_rss_mb": (peak_rss_kb() - base) / 1024}
    if args.device.startswith("cuda"):
        res["peak_gpu_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    print(json.dumps(res))


def run_child(**kw) -> dict:
    cmd = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", action="store_true")
    p.add_argument("--method", default="ours")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--T", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--shapes", default="llama-d1024",
                   help=f"CUDA throughput presets, comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--naive-n", type=int, default=128, help="segments through the per-segment loop")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (c)")
    args = p.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        return child(args)
    torch.set_num_threads(os.cpu_count() or 1)
    dev, dt = args.device, args.dtype
    print(f"torch {torch.__version__}, device {dev}"
          f"{' (' + torch.cuda.get_device_name() + ')' if dev.startswith('cuda') else ''}, dtype {dt}, "
          f"{os.cpu_count()} CPUs")

    # (b) throughput
    peak = matmul_peak(dev, dt, n=8192 if dev.startswith("cuda") else 2048)
    if dev.startswith("cuda"):
        n = 256 if args.quick else 1024
        runs = [(name, n, 512, *SHAPES[name], args.batch if args.batch != 16 else 32)
                for name in args.shapes.split(",")]
    else:
        runs = [("llama-d256", 128 if not args.quick else 32, 128, 8192, 256, 4, None, None, None, False, 16)]
    print(f"\n### (b) extraction throughput (matmul peak measured here: {peak / 1e12:.1f} TFLOP/s {dt})\n")
    print("| model | params | N x T | method | seconds | segments/s | tokens/s | model TFLOP/s | fraction of peak "
          "| max |Δppl|/ppl vs ours |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for name, n, T, V, d, L, H, KV, mlp, tied, batch in runs:
        model = make_model(V, d, L, T + 1, dev, dt, H, KV, mlp, tied)
        params = sum(p.numel() for p in model.parameters())
        segs = segments(n, T, V)
        fpt = flops_per_token(model, T + 1)
        n_naive = min(n, args.naive_n)
        ours(model, segs[:batch], batch)  # warm-up
        cuda = dev.startswith("cuda")
        compiled = copy.deepcopy(model) if cuda else None  # compiled in place: a copy of its own
        if compiled is not None:
            ours(compiled, segs[:batch], batch, compiled=True)  # the compile
        two_pass(model, segs[:batch], dev, batch)
        naive(model, segs[:2], dev)
        results = []
        methods = (("ours (batched, hooks, chunked NLL)", ours, (model, segs, batch), n),
                   *((("ours, fused head + compiled blocks", ours, (compiled, segs, batch, ("final",), True), n),)
                     if cuda else ()),
                   ("two-pass (loss pass + hidden-states pass)", two_pass, (model, segs, dev, batch), n),
                   ("naive (per segment, all hidden states)", naive, (model, segs[:n_naive], dev), n_naive))
        for label, fn, fn_args, k in methods:
            _sync(dev)
            t = time.perf_counter()
            out = fn(*fn_args)
            _sync(dev)
            results.append((label, time.perf_counter() - t, k, out))
        ref = results[0][3]["ppl"]
        for label, sec, k, out in results:
            diff = float(np.max(np.abs(out["ppl"] - ref[:k]) / ref[:k]))
            fl = fpt * k * (T + 1) / sec
            print(f"| {name} | {params / 1e6:.0f}M | {k} x {T} | {label} | {sec:.2f} | {k / sec:.1f} | "
                  f"{k * T / sec:,.0f} | {fl / 1e12:.2f} | {fl / peak:.2f} | {diff:.1e} |")
        rate = {label: k / sec for label, sec, k, _ in results}
        labels = [r[0] for r in results]
        print(f"\n{name}: ours / two-pass {rate[labels[0]] / rate[labels[-2]]:.2f}x, "
              f"ours / per-segment loop {rate[labels[0]] / rate[labels[-1]]:.1f}x (segments/s)"
              + (f"; compiled / eager {rate[labels[1]] / rate[labels[0]]:.2f}x" if cuda else "") + "\n")
        del model, compiled, results, methods
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.no_memory:
        return

    # (c) peak memory
    print("\n### (c) peak memory above the loaded model (fresh process each)\n")
    print("| case | method | N | vocab | seconds | peak RSS MB | peak GPU MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    base_n = 32 if args.quick else 64
    cases = [("N", base_n, 8192), ("4N", 4 * base_n, 8192), ("large vocab", base_n, 128_000)]
    for case, n, V in cases:
        for method in ("ours", "naive-batched"):
            r = run_child(method=method, n=n, T=args.T, vocab=V, d=args.d, layers=args.layers, batch=args.batch,
                          device=dev, dtype=dt)
            print(f"| {case} | {method} | {n} | {V} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r.get('peak_gpu_mb', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
