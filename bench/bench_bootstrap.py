"""Bootstrap intervals of a binned correlation: ours (one gather of unit rows per resample,
Eq. 1 over pairs of different segments from bin sums, correlations of all resamples at once)
vs the naive loop (re-bin each resample, Eq. 1 per bin from the Gram matrix of its distinct
members, scipy's pearsonr/spearmanr), one run each.

    python bench/bench_bootstrap.py [--resamples 1000]

Prints a markdown table: N segments (10 bins), d, seconds ours and naive, the ratio and the
largest difference of the resampled Spearman rhos (the same resamples on both sides).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import stats

from dispersion.measure.bootstrap import bootstrap_binned


def naive(ppl, vectors, bin_size, n_boot, seed):
    """Each resample sorted by perplexity and cut into bins; per bin, Eq. 1 over the pairs of
    different segments from the Gram matrix of its distinct members and their counts
    (sum_{j != k} c_j c_k (1 - cos_jk) / sum_{j != k} c_j c_k); scipy's correlations."""
    rng = np.random.default_rng(seed)
    idx_all = rng.integers(0, len(ppl), size=(n_boot, len(ppl)))
    unit = vectors.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    out = []
    for idx in idx_all:
        order = idx[np.argsort(ppl[idx], kind="stable")]
        x, y = [], []
        for b in range(len(ppl) // bin_size):
            members = order[b * bin_size:(b + 1) * bin_size]
            ids, counts = np.unique(members, return_counts=True)
            w = np.outer(counts, counts).astype(np.float64)
            np.fill_diagonal(w, 0.0)
            x.append(ppl[members].mean())
            y.append(float((w * (1.0 - unit[ids] @ unit[ids].T)).sum() / w.sum()))
        stats.pearsonr(x, y)
        out.append(stats.spearmanr(x, y)[0])
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.resamples} resamples; 10 bins per sample")
    print("| N | d | ours_s | naive_s | speedup | max abs diff of rho |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, d in ((400, 576), (1000, 576), (4000, 576), (10000, 576)):
        ppl = np.exp(rng.normal(2.5, 0.6, n))
        vectors = (rng.normal(size=d) + rng.normal(size=(n, d))).astype(np.float16)
        t0 = time.perf_counter()
        ours = bootstrap_binned(ppl, bin_size=n // 10, vectors=vectors, n_boot=args.resamples, seed=1)
        t_ours = time.perf_counter() - t0
        if n <= 4000:
            t0 = time.perf_counter()
            ref = naive(ppl, vectors, n // 10, args.resamples, 1)
            t_naive = time.perf_counter() - t0
            diff = float(np.nanmax(np.abs(ours["all"]["spearman_r"] - ref)))
            print(f"| {n} | {d} | {t_ours:.3g} | {t_naive:.3g} | {t_naive / t_ours:.1f}x | {diff:.1e} |")
        else:
            print(f"| {n} | {d} | {t_ours:.3g} | skipped | - | - |")


if __name__ == "__main__":
    main()
