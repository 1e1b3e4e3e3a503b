"""Roofline: each O(N d) metric against this machine's measured memory bandwidth, extraction
against its measured matmul peak, and the float32 BLAS N x N way beside cosine dispersion.

Usage: python bench/roofline.py [--n 20000] [--d 768] [--repeats 7] [--quick]

What it measures, in order (one run, printed as markdown for bench/RESULTS.md):

1. **Memory bandwidth**: reading a 1 GiB float32 array (a sum, torch with the CPU budget's
   threads; numpy's dot with itself, one thread) and copying it; the best read is the limit.
2. **Matmul peak**: a 2048^3 float32 matmul in torch with the CPU budget's threads.
3. **Metrics** at N x d float32 (float16 for the pooled vectors as stored): best-of-repeats
   seconds, the bytes each call must read (the input once per pass over it), GB/s and the
   fraction of the measured bandwidth. The naive float32 BLAS way (unit rows, then U[a:b] @ U.T
   in 2000-row chunks, summed; what a torch ``cosine_similarity`` matrix in chunks does) is timed
   once beside cosine dispersion.
4. **Extraction**: the batched extractor on a small Llama (d 512, 4 layers, vocab 8192,
   64 x 256 tokens), model FLOP/s against the matmul peak.

The CPU budget (threads) follows ``DISPERSION_THREADS`` / ``OMP_NUM_THREADS`` / the CPUs this
process may use (:mod:`dispersion.core.threads`). Check the machine is quiet first (load average
is printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispersion.core.threads import cpu_budget  # noqa: E402
from dispersion.measure.extract import within_segment  # noqa: E402
from dispersion.measure.metrics import (  # noqa: E402
    cluster_dispersion,
    cosine_dispersion,
    dispersion_gap,
    mean_cosine_distance_between,
    mean_cosine_distance_to_rest,
)
from dispersion.training.losses import push_away  # noqa: E402


def best(fn: Callable[[], object], repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def bandwidth(repeats: int) -> dict[str, float]:
    """GB/s of reading (and copying) a 1 GiB float32 array, larger than any cache."""
    a = np.ones(256 * 2**20, np.float32)
    b = np.empty_like(a)
    ta = torch.from_numpy(a)
    out = {
        "read, torch sum": a.nbytes / best(lambda: ta.sum().item(), repeats) / 1e9,
        "read, numpy dot (1 thread)": a.nbytes / best(lambda: float(a @ a), repeats) / 1e9,
        "copy (read + write), numpy": 2 * a.nbytes / best(lambda: np.copyto(b, a), repeats) / 1e9,
    }
    return out


def matmul_peak(repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best(lambda: a @ b, repeats)


def naive_cosine_f32(X: np.ndarray, chunk: int = 2000) -> float:
    """Float32 BLAS all-pairs: unit rows, then U[a:b] @ U.T chunk by chunk (the N x N way)."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    Ut = np.ascontiguousarray(U.T)
    n, total = len(U), 0.0
    for a in range(0, n, chunk):
        total += float((U[a:a + chunk] @ Ut).sum(dtype=np.float64))
    return 1.0 - (total - n) / (n * (n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller extraction")
    args = ap.parse_args()
    reps = 3 if args.quick else args.repeats
    threads, source = cpu_budget()
    torch.set_num_threads(threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, budget {threads} threads ({source}); "
          f"load average {os.getloadavg()[0]:.2f}; numpy {np.__version__}, torch {torch.__version__}\n")

    bw = bandwidth(reps)
    limit = max(v for k, v in bw.items() if k.startswith("read"))
    peak = matmul_peak(reps)
    print("### Machine limits (measured)\n")
    print("| what | measured |")
    print("|---|---:|")
    for k, v in bw.items():
        print(f"| memory bandwidth, {k} | {v:.1f} GB/s |")
    print(f"| matmul peak, float32 2048^3, {threads} threads | {peak / 1e9:.0f} GFLOP/s |\n")

    rng = np.random.default_rng(0)
    n, d = args.n, args.d
    X = rng.standard_normal((n, d), dtype=np.float32) + rng.standard_normal(d, dtype=np.float32)
    X16 = X.astype(np.float16)
    labels = rng.integers(0, 64, n)
    E = rng.standard_normal((49152, 576), dtype=np.float32)  # a vocab x d output matrix
    ids = rng.choice(49152, 22000, replace=False)
    dom, ref = ids[:11000], ids[11000:]
    B_, T_ = n // 512 or 1, 512
    H = torch.from_numpy(rng.standard_normal((B_, T_, d), dtype=np.float32))
    keep = torch.ones(B_, T_, dtype=torch.bool)

    Hg = H.clone().requires_grad_(True)

    def pa_step() -> None:  # forward, then backward into a fresh gradient (as a training step)
        Hg.grad = None
        push_away(Hg).backward()

    rows = [  # (name, dtype, bytes read per call, fn)
        ("cosine_dispersion (Eq. 1)", "float32", X.nbytes, lambda: cosine_dispersion(X)),
        ("cosine_dispersion, pooled vectors as stored", "float16", X16.nbytes, lambda: cosine_dispersion(X16)),
        ("mean_cosine_distance_to_rest (2 passes)", "float32", 2 * X.nbytes, lambda: mean_cosine_distance_to_rest(X)),
        ("mean_cosine_distance_between (two halves)", "float32", X.nbytes,
         lambda: mean_cosine_distance_between(X[: n // 2], X[n // 2:])),
        ("cluster_dispersion, cosine, 64 clusters (2 passes)", "float32", 2 * X.nbytes,
         lambda: cluster_dispersion(X, labels)),
        ("dispersion_gap, cosine, 11k + 11k rows of E", "float32", 2 * 11000 * 576 * 4,
         lambda: dispersion_gap(E, dom, ref)),
        ("within-segment form, extraction reducer", "float32", 2 * H.numel() * 4, lambda: within_segment(H, keep)),
        ("push_away loss, forward + backward", "float32", 4 * H.numel() * 4, pa_step),
    ]
    print(f"### O(N d) metrics, N = {n}, d = {d} (limit: {limit:.1f} GB/s read)\n")
    print("| metric | input | MB read | ms | GB/s | fraction of bandwidth |")
    print("|---|---|---:|---:|---:|---:|")
    for name, dt, nbytes, fn in rows:
        fn()
        t = best(fn, reps)
        print(f"| {name} | {dt} | {nbytes / 1e6:.0f} | {t * 1e3:.1f} | {nbytes / t / 1e9:.1f} | "
              f"{nbytes / t / 1e9 / limit:.2f} |", flush=True)

    t_ours = best(lambda: cosine_dispersion(X), reps)
    t0 = time.perf_counter()
    v_naive = naive_cosine_f32(X)
    t_naive = time.perf_counter() - t0
    err = abs(cosine_dispersion(X) - v_naive)
    print(f"\n### cosine_dispersion vs the float32 BLAS N x N (N = {n}, d = {d})\n")
    print("| ours ms | naive float32 N x N ms | speedup | \\|ours - naive\\| |")
    print("|---:|---:|---:|---:|")
    print(f"| {t_ours * 1e3:.1f} | {t_naive * 1e3:.0f} | {t_naive / t_ours:.0f}x | {err:.1e} |\n")

    from bench_extract import flops_per_token, make_model, ours, segments

    nseg, T = (32, 256) if args.quick else (64, 256)
    model = make_model(8192, 512, 4, T + 1, "cpu", "float32")
    segs = segments(nseg, T, 8192)
    ours(model, segs[:8], 8)
    t = best(lambda: ours(model, segs, 8), 1 if args.quick else 2)
    flops = flops_per_token(model, T + 1) * nseg * (T + 1)
    print("### Extraction (batched extractor, small Llama d 512 x 4 layers, vocab 8192, float32)\n")
    print("| segments x tokens | s | tokens/s | GFLOP/s | fraction of matmul peak |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {nseg} x {T} | {t:.2f} | {nseg * (T + 1) / t:.0f} | {flops / t / 1e9:.0f} | {flops / t / peak:.2f} |")


if __name__ == "__main__":
    main()
