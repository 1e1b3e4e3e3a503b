"""Benchmark dispersion.measure.metrics against naive full-matrix / scipy references.

Usage:
    python bench/bench_metrics.py [--sizes 2000 8000 20000] [--dim 768]
        [--repeats 3] [--pdist-max 8000] [--seed 0]

Data: float32 standard-normal (N, d) matrices plus one shared offset vector, fixed seed. Prints markdown
tables (paste into bench/RESULTS.md):

1. cosine_dispersion (O(N d) via the sum of unit vectors) vs the naive way
   (``dispersion`` of tests/reference.py, the tests' reference): float64 copy, row-normalise, full N x N similarity matrix S = U U^T, mean of
   the strict upper triangle of 1 - S (summed block-wise so only S itself is
   held: 20k x 20k float64 = 3.2 GB). S is formed by GEMM with a copied U^T,
   because numpy's SYRK shortcut for U @ U.T segfaults in this OpenBLAS build
   for N >= 16k (numpy/numpy#19685); SYRK would be about 2x faster.
2. euclidean_dispersion (chunked exact Gram-trick, float64) vs
   scipy.spatial.distance.pdist(X64).mean() for N <= --pdist-max (pdist is
   single-threaded, O(N^2 d); at N = 20k it would take several minutes and hold
   a 1.6 GB condensed vector, so it is skipped there).

"ours" is the best of --repeats runs; the naive references are run once.
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
from scipy.spatial.distance import pdist  # imported up front so the import is not timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dispersion.measure.metrics import cosine_dispersion, euclidean_dispersion  # noqa: E402
from reference import dispersion as naive_cosine_dispersion  # noqa: E402  (tests/reference.py)


def pdist_euclidean_dispersion(X: np.ndarray) -> float:
    """scipy's pdist mean in float64: the euclidean reference here (compiled, no N x N matrix;
    tests/reference.py's row-by-row loop computes the same number far more slowly at N = 8000)."""
    return float(pdist(X.astype(np.float64)).mean())


def best_time(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    best, val = float("inf"), float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        val = fn()
        best = min(best, time.perf_counter() - t0)
    return best, val


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 20000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pdist-max", type=int, default=8000, help="largest N for the scipy pdist reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(
        f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; data float32 N(0,1) + shared offset, seed {args.seed}; ours = best of {args.repeats}\n"
    )
    rng = np.random.default_rng(args.seed)
    # a shared offset makes the geometry anisotropic like LM states (dispersion ~0.5, not ~1)
    offset = rng.standard_normal(args.dim, dtype=np.float32)
    data = {n: rng.standard_normal((n, args.dim), dtype=np.float32) + offset for n in args.sizes}

    print("### cosine_dispersion vs naive N x N matrix (float64)\n")
    print("| N | d | ours_s | naive_s | speedup | \\|ours - ref\\| |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        X = data[n]
        t_ours, v_ours = best_time(lambda: cosine_dispersion(X), args.repeats)
        t0 = time.perf_counter()
        v_naive = naive_cosine_dispersion(X)
        t_naive = time.perf_counter() - t0
        print(
            f"| {n} | {args.dim} | {t_ours:.3g} | {t_naive:.3g} | {t_naive / t_ours:.3g}x | "
            f"{abs(v_ours - v_naive):.2e} |",
            flush=True,
        )

    print("\n### euclidean_dispersion vs scipy pdist mean (float64)\n")
    print("| N | d | ours_s | pdist_s | speedup | \\|ours - ref\\| |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        X = data[n]
        t_ours, v_ours = best_time(lambda: euclidean_dispersion(X), args.repeats)
        if n <= args.pdist_max:
            t0 = time.perf_counter()
            v_ref = pdist_euclidean_dispersion(X)
            t_ref = time.perf_counter() - t0
            print(
                f"| {n} | {args.dim} | {t_ours:.3g} | {t_ref:.3g} | {t_ref / t_ours:.3g}x | "
                f"{abs(v_ours - v_ref):.2e} |",
                flush=True,
            )
        else:
            print(f"| {n} | {args.dim} | {t_ours:.3g} | skipped (N > {args.pdist_max}) | - | - |", flush=True)


if __name__ == "__main__":
    main()
