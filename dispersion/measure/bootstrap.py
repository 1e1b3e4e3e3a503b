"""Bootstrap intervals of the binned perplexity-vs-dispersion correlations, and permutation tests.

Paper 001 (A.1.2) reports one correlation from one sample of segments. How much of it is the
sample is measured by resampling the segments of a partition with replacement and redoing
steps 3-7 of A.1.2 on each resample:

    for r = 1..R:   idx_r ~ Uniform{0..N-1}^N                      (N segments, with replacement)
                    bins of B consecutive resampled segments in perplexity order (stable sort)
                    x_r[b] = mean perplexity of bin b,  y_r[b] = dispersion of bin b
                    pearson_r[r] = Pearson(x_r, y_r),  spearman_r[r] = Spearman(x_r, y_r)
    interval = the (1 - level)/2 and (1 + level)/2 percentiles of the R values

A segment drawn twice sits twice in its bin. Eq. 1 is a U-statistic (a mean over pairs of
distinct segments), and a bin's dispersion on a resample is kept one: the mean of
:math:`1 - \\cos` over the pairs of its members that are *different segments*. Counting the
pairs of copies (at distance 0), as plain ``bin_table(ppl[idx], vectors[idx])`` would, lowers
each resampled bin's dispersion by the share of such pairs, about 1/(B - 1) and varying from
bin to bin by about as much as neighbouring bins differ; that noise pulls the resampled
correlations toward 0 and the interval away from the estimate. With unit rows :math:`u_i`,
:math:`s_b = \\sum_{i \\in b} u_i` and counts :math:`c_j` of each drawn segment in the bin,
the pairs of different segments sum to :math:`\\|s_b\\|^2 - \\sum_j c_j^2` over
:math:`B^2 - \\sum_j c_j^2` pairs, so one resample costs O(N d) and R resamples O(R N d);
without copies this is Eq. 1 exactly. A resample whose correlation is undefined (a constant
side) is left out; ``n_boot`` counts the ones kept.

Permutation test (draws that overlap, e.g. hardness slices that share queries): the p-value of
a statistic under exchangeable labels, :math:`p = (1 + \\#\\{|t_\\pi| \\ge |t_{obs}|\\}) / (1 + P)`
over P random permutations (two-sided; Phipson & Smyth 2010).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dispersion.measure.binning import MIN_POINTS, uniform_perplexity_bins

__all__ = ["Interval", "bootstrap_bias", "bootstrap_binned", "bootstrap_p", "bootstrap_ppl_difference",
           "eq1_jackknife_se", "interval", "permutation_p", "rowwise_pearson", "rowwise_spearman",
           "standard_error"]

CHUNK_VALUES = 1 << 24  # floats gathered at once (resamples x segments x d): bounds the memory of a step


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval: ``low``, ``high`` and the resamples behind it."""

    low: float | None
    high: float | None
    n_boot: int


def interval(values: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of the finite resampled ``values`` at ``level``: the
    (1 - level)/2 and (1 + level)/2 quantiles (linear interpolation).

    A binned correlation is attenuated by the noise of its bins (a bin mean of B segments is
    not the population's), and a resample adds that noise once more: the resampled
    correlations lean toward 0 from the estimate by about as much as the estimate leans from
    the population value (the bootstrap bias, :func:`bootstrap_bias`). The percentile interval
    therefore errs toward 0, on the conservative side for a test of "rho != 0"; the
    bias-corrected variants (basic, BC) move it away from 0 instead, and collapse when nearly
    every resample lies on one side of the estimate, as they do for rho near +-1."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return Interval(None, None, int(v.size))
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(lo), float(hi), int(v.size))


def bootstrap_bias(values: np.ndarray, estimate: float | None) -> float | None:
    """Mean of the finite resampled values minus the estimate (None without either)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or estimate is None or not np.isfinite(estimate):
        return None
    return float(v.mean() - estimate)


def bootstrap_p(values: np.ndarray) -> float | None:
    r"""Two-sided bootstrap p-value of "the statistic is 0" from its resampled values:
    :math:`\min(1, 2 \min(1 + \#\{t^* \le 0\}, 1 + \#\{t^* \ge 0\}) / (1 + R))`, about
    1 minus the largest coverage whose percentile interval leaves 0 out (None without resamples)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    below, above = int((v <= 0).sum()), int((v >= 0).sum())
    return float(min(1.0, 2 * (1 + min(below, above)) / (1 + v.size)))


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of ``x``, ``y`` (R, n); NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / den
    r[~(den > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair (R, n): Pearson r of the average ranks (ties averaged)."""
    from scipy.stats import rankdata

    return rowwise_pearson(rankdata(x, axis=1), rankdata(y, axis=1))


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    V = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ValueError(f"vectors: row {int(np.flatnonzero(~(norms[:, 0] > 0))[0])} is zero; cosine is undefined")
    return V / norms


def same_pairs(members: np.ndarray) -> np.ndarray:
    r"""Per bin of drawn segment indices (..., B): the ordered position pairs (p, q) that hold
    the same segment, p = q included: :math:`\sum_j c_j^2` for counts c_j (B when all differ)."""
    a = np.sort(members, axis=-1)
    pos = np.arange(a.shape[-1])
    new = np.ones(a.shape, bool)
    new[..., 1:] = a[..., 1:] != a[..., :-1]
    start = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)  # first position of each run
    return a.shape[-1] + 2 * (pos - start).sum(axis=-1)  # B + 2 sum_j C(c_j, 2)


def bootstrap_binned(ppl: np.ndarray, *, bin_size: int, vectors: np.ndarray | None = None,
                     within: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                     select_k: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The R = ``n_boot`` resampled correlations of one scope (module docstring).

    Args:
        ppl: (N,) per-segment perplexities.
        bin_size: B, segments per bin (a trailing partial bin is dropped, as in ``make_bins``).
        vectors: (N, d) pooled vectors: the across-segment scope (Eq. 1 per bin).
        within: (N,) within-segment dispersions: the within scope (their mean per bin).
        n_boot: R, resamples; the same ``seed`` draws the same resamples whatever the scope,
            so two layers of one partition are compared on paired resamples.
        select_k: K of Algorithm 1: also the correlations over the K bins it selects on each
            resample's bin means.

    Returns:
        ``{"all": {"pearson_r": (R,), "spearman_r": (R,)}, "selected": {...}}`` (``selected``
        only with ``select_k``); NaN where a resample's correlation is undefined.
    """
    p = np.asarray(ppl, dtype=np.float64)
    n = p.shape[0]
    nb = n // bin_size
    if nb < MIN_POINTS:
        raise ValueError(f"{n} segments make {nb} bins of {bin_size}; a correlation needs {MIN_POINTS}")
    if (vectors is None) == (within is None):
        raise TypeError("bootstrap_binned: pass vectors (across scope) or within (within scope)")
    U = _unit_rows(vectors) if vectors is not None else None
    w = None if within is None else np.asarray(within, dtype=np.float64)
    m = nb * bin_size  # resampled segments that land in a full bin
    rng = np.random.default_rng(seed)
    x = np.empty((n_boot, nb))  # bin mean perplexities
    y = np.empty((n_boot, nb))  # bin dispersions
    per_step = max(1, CHUNK_VALUES // (n * (U.shape[1] if U is not None else 1)))
    for start in range(0, n_boot, per_step):
        rows = range(start, min(start + per_step, n_boot))
        idx = rng.integers(0, n, size=(len(rows), n))  # (r, N) segment indices drawn
        order = np.take_along_axis(idx, np.argsort(p[idx], axis=1, kind="stable"), axis=1)[:, :m]  # (r, m)
        x[rows.start:rows.stop] = p[order].reshape(len(rows), nb, bin_size).mean(axis=2)
        if U is not None:
            s = U[order.reshape(-1)].reshape(len(rows), nb, bin_size, -1).sum(axis=2)  # (r, nb, d) unit-row sums
            same = same_pairs(order.reshape(len(rows), nb, bin_size))  # (r, nb) ordered pairs of one segment
            with np.errstate(invalid="ignore", divide="ignore"):
                eq1 = 1.0 - (np.einsum("rbd,rbd->rb", s, s) - same) / (bin_size * bin_size - same)
            y[rows.start:rows.stop] = np.maximum(eq1, 0.0)
        else:
            assert w is not None
            y[rows.start:rows.stop] = w[order].reshape(len(rows), nb, bin_size).mean(axis=2)
    out = {"all": {"pearson_r": rowwise_pearson(x, y), "spearman_r": rowwise_spearman(x, y)}}
    if select_k is not None:
        k = min(select_k, nb)
        sel = np.stack([uniform_perplexity_bins(row, k) for row in x])  # (R, k) bins of each resample
        xs, ys = np.take_along_axis(x, sel, axis=1), np.take_along_axis(y, sel, axis=1)
        out["selected"] = {"pearson_r": rowwise_pearson(xs, ys), "spearman_r": rowwise_spearman(xs, ys)}
    return out


def eq1_jackknife_se(X: np.ndarray) -> float:
    r"""Jackknife standard error of Eq. 1 over the n rows of ``X`` (the error bar of one bin).

    Leaving row i out of the unit-row sum s: :math:`\|s - u_i\|^2 = \|s\|^2 - 2 s \cdot u_i + 1`, so
    every leave-one-out value :math:`D_{(i)} = 1 - (\|s - u_i\|^2 - (n-1)) / ((n-1)(n-2))` comes in
    O(n d), and :math:`\mathrm{se} = \sqrt{\tfrac{n-1}{n} \sum_i (D_{(i)} - \bar D_{(\cdot)})^2}`.
    NaN below 3 rows."""
    U = _unit_rows(X)  # (n, d)
    n = U.shape[0]
    if n < 3:
        return float("nan")
    s = U.sum(axis=0)
    loo = 1.0 - ((s @ s - 2.0 * (U @ s) + 1.0) - (n - 1)) / ((n - 1) * (n - 2))  # (n,)
    return float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))


def standard_error(values: np.ndarray) -> float | None:
    """Standard error of a mean, s / sqrt(n) (what the jackknife gives for a mean); None below 2."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None


def bootstrap_ppl_difference(lp_a: np.ndarray, lp_b: np.ndarray, groups: np.ndarray, *, n_boot: int = 1000,
                             seed: int = 0) -> tuple[float, np.ndarray]:
    """Perplexity of b minus perplexity of a over the same tokens, and its ``n_boot``
    resampled values, resampling the ``groups`` (e.g. the evaluation windows, whose tokens are
    not independent) with replacement: a resample's perplexity is
    exp(-sum of its groups' log-probabilities / their token count), a group drawn twice
    counted twice. ``lp_a``, ``lp_b``: (T,) natural-log probabilities; ``groups``: (T,) ids."""
    a, b = np.asarray(lp_a, np.float64), np.asarray(lp_b, np.float64)
    _, g = np.unique(np.asarray(groups), return_inverse=True)  # (T,) group index 0..G-1
    G = int(g.max()) + 1 if g.size else 0
    sum_a, sum_b = np.bincount(g, a, G), np.bincount(g, b, G)  # (G,) per-group log-prob sums
    count = np.bincount(g, minlength=G).astype(np.float64)  # (G,) tokens per group
    observed = float(np.exp(-b.sum() / b.size) - np.exp(-a.sum() / a.size))
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for r in range(n_boot):
        w = np.bincount(rng.integers(0, G, G), minlength=G).astype(np.float64)  # (G,) times drawn
        n = w @ count
        out[r] = np.exp(-(w @ sum_b) / n) - np.exp(-(w @ sum_a) / n)
    return observed, out


def permutation_p(statistic: Callable[[np.ndarray], float | np.ndarray], labels: np.ndarray, *,
                  n_perm: int = 1000, seed: int = 0) -> tuple[np.ndarray, int]:
    """Two-sided permutation p-values of ``statistic(labels)`` (a number or a vector of them)
    against ``n_perm`` random permutations of ``labels``: ``(p, n_perm)`` with, per component,
    p = (1 + #{|t_pi| >= |t_obs|}) / (1 + P); a permutation whose statistic is undefined (NaN)
    counts as not as extreme."""
    rng = np.random.default_rng(seed)
    observed = np.abs(np.atleast_1d(np.asarray(statistic(labels), dtype=np.float64)))
    hits = np.zeros(observed.shape, np.int64)
    for _ in range(n_perm):
        t = np.abs(np.atleast_1d(np.asarray(statistic(rng.permutation(labels)), dtype=np.float64)))
        hits += t >= observed - 1e-12
    return (1 + hits) / (1 + n_perm), n_perm
