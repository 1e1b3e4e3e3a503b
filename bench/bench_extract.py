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

On CUDA the throughput shapes are fixed (1024 segments of 512 tokens, d 1024, 8 layers, vocab
32000, batch 32; 256 segments with --quick), every timed region ends with
``torch.cuda.synchronize()``, and (c) also reports the peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dispersion.measure.extract import Extractor  # noqa: E402
from rss import peak_rss_kb, reset_peak_rss  # noqa: E402  (bench/rss.py)


def make_model(vocab: int, d: int, layers: int, ctx: int, device: str, dtype: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=int(8 * d / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, d // 64), num_key_value_heads=max(1, d // 64),
                      max_position_embeddings=ctx, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype)).eval()
    model.config._attn_implementation = "sdpa"
    return model


def flops_per_token(model, T: int) -> float:
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
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


def ours(model, segs, batch: int, layers=("final",)) -> dict:
    ex = Extractor(model, layers=list(layers), pools=["last"], bos_token_id=1, batch_size=batch,
                   nll_chunk_tokens=1024)
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
    if dev.startswith("cuda"):
        shapes = [(1024, 512, 32000, 1024, 8, 32)] if not args.quick else [(256, 512, 32000, 1024, 8, 32)]
    else:
        shapes = [(128 if not args.quick else 32, 128, 8192, 256, 4, 16)]
    peak = matmul_peak(dev, dt, n=4096 if dev.startswith("cuda") else 2048)
    print(f"\n### (b) extraction throughput (matmul peak measured here: {peak / 1e9:.1f} GFLOP/s {dt})\n")
    print("| model | N x T | method | seconds | segments/s | model GFLOP/s | fraction of peak | max |Δppl|/ppl |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for n, T, V, d, L, batch in shapes:
        model = make_model(V, d, L, T + 1, dev, dt)
        segs = segments(n, T, V)
        fpt = flops_per_token(model, T + 1)
        ours(model, segs[:batch], batch)  # warm-up
        naive(model, segs[:2], dev)
        _sync(dev)
        t = time.perf_counter()
        a = ours(model, segs, batch)
        _sync(dev)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        b = naive(model, segs, dev)
        _sync(dev)
        t_naive = time.perf_counter() - t
        diff = float(np.max(np.abs(a["ppl"] - b["ppl"]) / b["ppl"]))
        name = f"llama d={d} L={L} V={V}"
        for label, sec in (("ours (batched, hooks, chunked NLL)", t_ours), ("naive (per segment, all hidden states)", t_naive)):
            fl = fpt * n * (T + 1) / sec
            print(f"| {name} | {n} x {T} | {label} | {sec:.2f} | {n / sec:.1f} | {fl / 1e9:.1f} | {fl / peak:.2f} | "
                  f"{diff:.1e} |")
        print(f"\nspeedup ours / naive: {t_naive / t_ours:.2f}x")
        del model

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
