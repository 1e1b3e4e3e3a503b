"""Controlled slicing (paper 001 Sec. 3.1, B.1.2): slices of S queries with a fixed fraction
correct, and the dispersion or perplexity of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dispersion.analyses.hardness.options import FIELD
from dispersion.core.errors import DataError
from dispersion.report.figures import spearman


# --------------------------------------------------------------------------- #
# slices
# --------------------------------------------------------------------------- #
def fraction_grid(step_percent: int) -> np.ndarray:
    """Target fractions 0, step, ..., 1 (``step_percent`` divides 100)."""
    return np.arange(0, 100 + step_percent, step_percent)[: 100 // step_percent + 1] / 100.0


def fitting_size(correct: np.ndarray, size: int) -> int:
    """The largest slice size <= ``size`` at which every fraction 0..1 can be drawn without
    replacement: min(size, #correct, #incorrect)."""
    c = np.asarray(correct, bool)
    return int(min(size, c.sum(), (~c).sum()))


def mixed_slice(correct: np.ndarray, fraction: float, size: int, rng: np.random.Generator,
                pool: np.ndarray | None = None) -> np.ndarray:
    """Indices of a slice of ``size`` queries of which exactly round(fraction * size) are
    correct, drawn without replacement from ``pool`` (default: every query).

    Raises:
        DataError: the pool holds too few correct or incorrect queries.
    """
    c = np.asarray(correct, bool)
    idx = np.arange(c.size) if pool is None else np.asarray(pool)
    pos, neg = idx[c[idx]], idx[~c[idx]]
    k = int(round(fraction * size))
    if k > pos.size or size - k > neg.size:
        raise DataError(f"{FIELD}: a slice of {size} at {fraction:.0%} correct needs {k} correct and {size - k} "
                        f"incorrect queries; the pool has {pos.size} and {neg.size}")
    return np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, size - k, replace=False)])


class Signal:
    """The dispersion of any subset of one query set's embeddings, in O(|subset| d).

    ``across``: Eq. 1 over the subset's vectors, 1 - (|sum_i u_i|^2 - n) / (n (n - 1)) with unit
    rows u (as :func:`dispersion.measure.metrics.cosine_dispersion`); ``within``: the mean of the
    queries' within-query token dispersion.
    """

    def __init__(self, vectors: np.ndarray | None = None, within: np.ndarray | None = None):
        if (vectors is None) == (within is None):
            raise ValueError("give vectors (scope across) or within (scope within)")
        if vectors is not None:
            X = np.asarray(vectors, np.float64)
            norms = np.linalg.norm(X, axis=1)
            if (norms == 0).any():
                raise DataError(f"{FIELD}: query {int(np.argmax(norms == 0))} has a zero vector")
            self.unit: np.ndarray | None = X / norms[:, None]
            self.within = None
        else:
            self.unit = None
            self.within = np.asarray(within, np.float64)

    def __call__(self, idx: np.ndarray) -> float:
        if self.unit is not None:
            n = len(idx)
            s = self.unit[idx].sum(0)
            return max(0.0, 1.0 - (float(s @ s) - n) / (n * (n - 1)))
        assert self.within is not None
        return float(self.within[idx].mean())

    @property
    def n(self) -> int:
        return len(self.unit if self.unit is not None else self.within)  # type: ignore[arg-type]


@dataclass
class Slices:
    """The controlled slices of one query set: per fraction x seed, the slice's dispersion,
    mean perplexity and correct count (arrays of shape (F, R))."""

    fractions: np.ndarray
    size: int
    dispersion: np.ndarray
    ppl: np.ndarray
    n_correct: np.ndarray


def controlled_slices(signal: Signal, ppl: np.ndarray, correct: np.ndarray, *, fractions: np.ndarray,
                      size: int, seeds: int, seed: int = 0) -> Slices:
    """Slices of ``size`` with exactly round(f size) correct queries for every f, ``seeds``
    draws each (seed r draws every fraction from ``default_rng([seed, r])``)."""
    F = len(fractions)
    disp, mp, nc = np.empty((F, seeds)), np.empty((F, seeds)), np.empty((F, seeds), np.int64)
    c = np.asarray(correct, bool)
    for r in range(seeds):
        rng = np.random.default_rng([seed, r])
        for i, f in enumerate(fractions):
            idx = mixed_slice(c, f, size, rng)
            disp[i, r], mp[i, r], nc[i, r] = signal(idx), float(np.mean(ppl[idx])), int(c[idx].sum())
    return Slices(np.asarray(fractions), size, disp, mp, nc)


def spearman_rho(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[float | None, float | None]:
    r = spearman(list(x), list(y))
    return (r.rho, r.p) if r is not None else (None, None)
