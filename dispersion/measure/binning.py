"""Perplexity binning and uniform-in-perplexity bin selection.

Implements the mean-perplexity vs. dispersion procedure of the paper's
appendix A.1.2 ("On the Predictive Power of Representation Dispersion in
Language Models"):

* steps 3-4  -> :func:`make_bins` (sort segments by perplexity, fixed-size bins)
* step 5     -> :func:`uniform_perplexity_bins` (Algorithm 1)
* step 6     -> :func:`bin_dispersion` / :func:`bin_table` (Eq. 1 per bin)
* step 7     -> :func:`correlations` (Pearson / Spearman of the mapping)

Everything is numpy (no pandas). Errors are ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from dispersion.measure.metrics import as_numpy, cosine_dispersion

MIN_POINTS = 3  # the fewest paired values (bins) a correlation is computed over
EXACT_MAX = 9  # up to this many pairs Spearman's p counts every ordering (9! = 362,880)

__all__ = [
    "BinTable",
    "Bins",
    "bin_dispersion",
    "bin_table",
    "correlations",
    "make_bins",
    "uniform_perplexity_bins",
]


def _as_vector(x: Any, name: str, min_len: int = 1) -> np.ndarray:
    """Validate a finite real 1-D array and return it as float64."""
    a = as_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got ndim={a.ndim} with shape {a.shape}")
    if a.shape[0] < min_len:
        raise ValueError(f"{name} needs at least {min_len} values, got {a.shape[0]}")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be real numeric, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        first = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} contains non-finite values (first at index {first})")
    return a


# --------------------------------------------------------------------------- #
# steps 3-4: bins of consecutive segments in perplexity order
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Bins:
    """Fixed-size perplexity bins (paper A.1.2, steps 3-4).

    Attributes:
        members: per bin, the original segment indices (in ascending-perplexity order).
        mean_ppl: (n_bins,) mean perplexity of each bin; non-decreasing.
        median_ppl: (n_bins,) median perplexity of each bin.
        n_segments: number of segments that were binned (before dropping a partial bin).
        bin_size: nominal bin size.
        values: per-bin means of the extra per-segment arrays given to :func:`make_bins`.
    """

    members: list[np.ndarray]
    mean_ppl: np.ndarray
    median_ppl: np.ndarray
    n_segments: int
    bin_size: int
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_bins(self) -> int:
        return len(self.members)

    @property
    def sizes(self) -> np.ndarray:
        """(n_bins,) number of segments per bin."""
        return np.array([m.size for m in self.members], dtype=np.int64)

    def mean_of(self, per_segment: Any) -> np.ndarray:
        """Per-bin mean of a per-segment array (first axis = segment, length ``n_segments``).

        ``out[b] = mean_{i in members[b]} per_segment[i]``; extra trailing axes are kept.
        """
        a = as_numpy(per_segment)
        if a.ndim < 1 or a.shape[0] != self.n_segments:
            raise ValueError(f"per-segment array must have length {self.n_segments}, got shape {a.shape}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("per-segment array contains non-finite values")
        if not self.members:
            return np.empty((0,) + a.shape[1:])
        return np.stack([a[m].mean(axis=0) for m in self.members])


def make_bins(
    ppl: Any,
    values: dict[str, Any] | None = None,
    bin_size: int = 100,
    keep_partial: bool = False,
) -> Bins:
    """Sort segments by perplexity and group them into bins of ``bin_size`` (paper A.1.2, steps 3-4).

    The sort is stable, so ties in perplexity are broken by the original index.
    Bin b holds sorted positions ``[b*bin_size, (b+1)*bin_size)``. When N is not a
    multiple of ``bin_size`` the last, smaller bin is dropped unless
    ``keep_partial=True`` (then it is kept as a smaller final bin).

    Args:
        ppl: (N,) per-segment perplexities (finite).
        values: optional named per-segment arrays (length N); their per-bin means
            are stored in ``Bins.values``.
        bin_size: segments per bin (>= 1).
        keep_partial: keep the trailing partial bin.

    Raises:
        ValueError: if no bin can be formed (N < bin_size and not ``keep_partial``).
    """
    p = _as_vector(ppl, "ppl")
    if isinstance(bin_size, bool) or int(bin_size) != bin_size or bin_size < 1:
        raise ValueError(f"bin_size must be a positive integer, got {bin_size!r}")
    bin_size = int(bin_size)
    n = p.size
    order = np.argsort(p, kind="stable")
    n_full = n // bin_size
    edges = [i * bin_size for i in range(n_full + 1)]
    if keep_partial and n % bin_size:
        edges.append(n)
    if len(edges) < 2:
        raise ValueError(
            f"N={n} segments is fewer than bin_size={bin_size}; no full bin (use keep_partial=True)"
        )
    members = [order[a:b] for a, b in zip(edges[:-1], edges[1:])]
    mean_ppl = np.array([p[m].mean() for m in members])
    median_ppl = np.array([np.median(p[m]) for m in members])
    bins = Bins(members=members, mean_ppl=mean_ppl, median_ppl=median_ppl, n_segments=n, bin_size=bin_size)
    for name, arr in (values or {}).items():
        a = as_numpy(arr)
        if a.ndim < 1 or a.shape[0] != n:
            raise ValueError(f"values[{name!r}] must have length {n}, got shape {a.shape}")
        bins.values[name] = bins.mean_of(a)
    return bins


# --------------------------------------------------------------------------- #
# step 5: Algorithm 1
# --------------------------------------------------------------------------- #
def uniform_perplexity_bins(mean_ppl: Any, K: int) -> np.ndarray:
    r"""Select K bins uniformly in perplexity (paper A.1.2, Algorithm 1), exactly as written.

    Given sorted bin means :math:`m_1 \le \dots \le m_G`:

    1. :math:`m_{min} = m_1,\ m_{max} = m_G`;
    2. targets :math:`t_k = m_{min} + \frac{k-1}{K-1}(m_{max} - m_{min})`, k = 1..K;
    3. for each target, add to the selected *set* the j whose :math:`m_j` is
       closest to :math:`t_k` (ties -> the smaller j);
    4. if fewer than K distinct bins were selected (several targets hit the same
       bin), add extra bins from the sorted list, smallest index first, skipping
       those already selected, until there are K.

    Conventions not fixed by the paper: K = 1 uses the single target
    :math:`m_{min}` (the formula is 0/0), so it returns ``[0]``; K >= G returns
    all bins.

    Args:
        mean_ppl: (G,) bin means, sorted non-decreasing.
        K: number of bins wanted (>= 1).

    Returns:
        Sorted int64 array of selected (0-based) bin indices, length min(K, G).
    """
    m = _as_vector(mean_ppl, "mean_ppl")
    if isinstance(K, bool) or int(K) != K or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    K = int(K)
    if np.any(np.diff(m) < 0):
        raise ValueError("mean_ppl must be sorted in non-decreasing order")
    G = m.size
    if K >= G:
        return np.arange(G, dtype=np.int64)
    m_min, m_max = m[0], m[-1]
    if K == 1:
        targets = [m_min]
    else:
        targets = [m_min + ((k - 1) / (K - 1)) * (m_max - m_min) for k in range(1, K + 1)]
    selected: set[int] = set()
    for t in targets:
        selected.add(int(np.argmin(np.abs(m - t))))  # argmin -> first (smallest) j on ties
    j = 0
    while len(selected) < K:
        if j not in selected:
            selected.add(j)
        j += 1
    return np.array(sorted(selected), dtype=np.int64)


# --------------------------------------------------------------------------- #
# step 6: per-bin dispersion
# --------------------------------------------------------------------------- #
def bin_dispersion(
    vectors: Any,
    bins: Bins,
    metric: Callable[[np.ndarray], float] = cosine_dispersion,
    indices: Any = None,
) -> np.ndarray:
    """"Across" scope: dispersion of the pooled vectors of each bin's members (paper Eq. 1 per bin).

    ``out[b] = metric(vectors[bins.members[b]])``.

    Args:
        vectors: (N, d) one vector per segment (row i = segment i).
        bins: result of :func:`make_bins` on the same N segments.
        metric: callable (n, d) -> float; default :func:`~dispersion.measure.metrics.cosine_dispersion`.
        indices: optional bin indices to evaluate (e.g. from :func:`uniform_perplexity_bins`);
            other bins get NaN. Default: all bins.

    Returns:
        (n_bins,) float64 array.
    """
    V = as_numpy(vectors)
    if V.ndim != 2:
        raise ValueError(f"vectors must be 2-D (N, d), got ndim={V.ndim} with shape {V.shape}")
    if V.shape[0] != bins.n_segments:
        raise ValueError(f"vectors has {V.shape[0]} rows but the bins cover {bins.n_segments} segments")
    idx = np.arange(bins.n_bins) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= bins.n_bins):
        raise ValueError(f"bin indices must be in 0..{bins.n_bins - 1}")
    out = np.full(bins.n_bins, np.nan)
    for b in idx:
        out[b] = float(metric(V[bins.members[b]]))
    return out


@dataclass(frozen=True)
class BinTable:
    """Column-oriented per-bin table produced by :func:`bin_table`.

    Columns (all length n_bins): ``bin`` (index), ``n`` (segments), ``mean_ppl``,
    ``median_ppl``, ``across`` (pooled dispersion, or None), ``within`` (mean
    per-segment within-segment dispersion, or None), ``selected`` (bool).
    """

    bin: np.ndarray
    n: np.ndarray
    mean_ppl: np.ndarray
    median_ppl: np.ndarray
    selected: np.ndarray
    across: np.ndarray | None = None
    within: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """Columns as a dict (None columns omitted)."""
        cols = ("bin", "n", "mean_ppl", "median_ppl", "across", "within", "selected")
        return {c: getattr(self, c) for c in cols if getattr(self, c) is not None}

    def only_selected(self) -> "BinTable":
        """The rows with ``selected == True``."""
        s = self.selected
        return BinTable(
            bin=self.bin[s],
            n=self.n[s],
            mean_ppl=self.mean_ppl[s],
            median_ppl=self.median_ppl[s],
            selected=self.selected[s],
            across=None if self.across is None else self.across[s],
            within=None if self.within is None else self.within[s],
        )


def bin_table(
    ppl: Any,
    *,
    bin_size: int = 100,
    vectors: Any = None,
    within: Any = None,
    metric: Callable[[np.ndarray], float] = cosine_dispersion,
    select_k: int | None = None,
    keep_partial: bool = False,
) -> BinTable:
    """Per-bin perplexity / dispersion table (paper A.1.2 steps 3-6).

    Bins are made with :func:`make_bins`; when ``select_k`` is given the
    ``selected`` column marks the bins chosen by Algorithm 1
    (:func:`uniform_perplexity_bins` on the bin means), otherwise all bins are
    selected.

    * ``across`` (if ``vectors`` is given): ``metric`` of the pooled vectors of
      each bin's members (paper Eq. 1 per bin), computed only for selected bins;
      unselected bins hold NaN.
    * ``within`` (if ``within`` is given): per bin, the mean of the given
      per-segment within-segment dispersion values (computed for all bins).

    Args:
        ppl: (N,) per-segment perplexities.
        bin_size: segments per bin.
        vectors: optional (N, d) one embedding per segment.
        within: optional (N,) per-segment within-segment dispersion values.
        metric: dispersion callable for ``across``; default cosine (Eq. 1).
        select_k: optional K for Algorithm 1.
        keep_partial: keep a trailing partial bin (see :func:`make_bins`).
    """
    bins = make_bins(ppl, bin_size=bin_size, keep_partial=keep_partial)
    if select_k is None:
        sel_idx = np.arange(bins.n_bins)
    else:
        sel_idx = uniform_perplexity_bins(bins.mean_ppl, select_k)
    selected = np.zeros(bins.n_bins, dtype=bool)
    selected[sel_idx] = True
    across = None if vectors is None else bin_dispersion(vectors, bins, metric=metric, indices=sel_idx)
    within_col = None
    if within is not None:
        w = _as_vector(within, "within")
        if w.size != bins.n_segments:
            raise ValueError(f"within has length {w.size} but ppl has {bins.n_segments}")
        within_col = bins.mean_of(w)
    return BinTable(
        bin=np.arange(bins.n_bins, dtype=np.int64),
        n=bins.sizes,
        mean_ppl=bins.mean_ppl,
        median_ppl=bins.median_ppl,
        selected=selected,
        across=across,
        within=within_col,
    )


# --------------------------------------------------------------------------- #
# step 7: correlation of the mapping
# --------------------------------------------------------------------------- #
def correlations(x: Any, y: Any) -> dict[str, float | int]:
    """Pearson and Spearman correlation of two paired 1-D samples (scipy.stats; Spearman's p
    exact up to :data:`EXACT_MAX` pairs, :func:`spearman_exact_p`).

    Returns ``{"pearson_r", "pearson_p", "spearman_r", "spearman_p", "n"}``.

    Raises:
        ValueError: if lengths differ, n < 3, values are non-finite, or x / y is constant.
    """
    from scipy import stats

    a = _as_vector(x, "x")
    b = _as_vector(y, "y")
    if a.size != b.size:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    if a.size < MIN_POINTS:
        raise ValueError(f"need at least {MIN_POINTS} paired values for a correlation, got n={a.size}")
    for name, v in (("x", a), ("y", b)):
        if np.all(v == v[0]):
            raise ValueError(f"{name} is constant; correlation is undefined")
    pr = stats.pearsonr(a, b)
    sr = stats.spearmanr(a, b)
    return {
        "pearson_r": float(pr[0]),
        "pearson_p": float(pr[1]),
        "spearman_r": float(sr[0]),
        "spearman_p": spearman_exact_p(a, b) if a.size <= EXACT_MAX else float(sr[1]),
        "n": int(a.size),
    }


@lru_cache(maxsize=EXACT_MAX)
def _orderings(n: int) -> np.ndarray:
    """int64 (n!, n): every permutation of 0..n-1."""
    from itertools import chain, permutations

    return np.fromiter(chain.from_iterable(permutations(range(n))), dtype=np.int64,
                       count=n * math.factorial(n)).reshape(-1, n)


def spearman_exact_p(x: Any, y: Any) -> float:
    """Two-sided p of Spearman's rho from its exact null distribution: the share of all n!
    orderings of ``y`` against ``x`` whose |rho| is at least the observed one (average ranks,
    so ties are conditioned on). For the few pairs where the t approximation of
    ``scipy.stats.spearmanr`` is wrong: with 4 pairs and rho = 1 it gives p = 0, the exact p is
    2 / 24. At most :data:`EXACT_MAX` pairs."""
    from scipy.stats import rankdata

    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.size > EXACT_MAX:
        raise ValueError(f"spearman_exact_p: {a.size} pairs; at most {EXACT_MAX}")
    ca, cb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (a.size + 1) / 2  # (n,) centred ranks
    scale = float(np.linalg.norm(ca) * np.linalg.norm(cb))
    if scale == 0:
        return float("nan")
    rho = cb[_orderings(a.size)] @ ca / scale  # (n!,): rho of every ordering
    observed = float(cb @ ca / scale)
    return float(np.mean(np.abs(rho) >= abs(observed) - 1e-12))
