"""Calibration by dispersion (paper 001 B.1.3): regressors accuracy = g(dispersion) fitted on
calibration slices, chosen on validation slices, scored on test slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dispersion.analyses.hardness.options import FIELD, REGRESSORS
from dispersion.analyses.hardness.slices import Signal, fitting_size, fraction_grid, mixed_slice
from dispersion.core.errors import ConfigError, DataError


# --------------------------------------------------------------------------- #
# calibration
# --------------------------------------------------------------------------- #
def make_regressor(name: str, seed: int = 0):
    """A scikit-learn regressor of accuracy on dispersion (one feature)."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    if name == "linear":
        return make_pipeline(StandardScaler(), LinearRegression())
    if name in ("poly2", "poly3"):
        return make_pipeline(StandardScaler(), PolynomialFeatures(int(name[-1]), include_bias=False),
                             LinearRegression())
    if name == "isotonic":
        return IsotonicRegression(increasing="auto", out_of_bounds="clip")
    if name == "forest":
        return RandomForestRegressor(n_estimators=100, random_state=seed, n_jobs=1)
    raise ConfigError(f"{FIELD}.regressors: unknown regressor {name!r} (known: {', '.join(REGRESSORS)})")


def _fit(reg, x: np.ndarray, y: np.ndarray):
    import warnings

    from sklearn.isotonic import IsotonicRegression

    with warnings.catch_warnings():  # isotonic's "increasing='auto'" doubts a flat curve: the MAE says so too
        warnings.simplefilter("ignore", UserWarning)
        reg.fit(x if isinstance(reg, IsotonicRegression) else x.reshape(-1, 1), y)
    return reg


def _predict(reg, x: np.ndarray) -> np.ndarray:
    from sklearn.isotonic import IsotonicRegression

    p = reg.predict(x if isinstance(reg, IsotonicRegression) else np.asarray(x).reshape(-1, 1))
    return np.clip(np.asarray(p, np.float64), 0.0, 1.0)


def mean_abs_error(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(true))) * 100.0)


@dataclass
class Calibration:
    """One seed of B.1.3 on one query set: the fitted regressors, the chosen one, and the
    test part's slices (x = dispersion, y = fraction correct) with every MAE (percentage points)."""

    seed: int
    chosen: str
    fitted: dict[str, Any]
    val_mae: dict[str, float]
    test_x: np.ndarray
    test_y: np.ndarray
    test_mae: dict[str, float]       # regressor -> MAE on the test slices
    constant: float                  # the calibration slices' mean accuracy
    sizes: tuple[int, int, int]      # slice sizes in the calibration, validation, test parts
    natural: tuple[float, float]     # (true, predicted) accuracy of the whole test part
    natural_constant: float          # the calibration part's own accuracy: the constant guess of the test part's
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0))  # chosen regressor on test_x

    @property
    def mae(self) -> float:
        return self.test_mae[self.chosen]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return _predict(self.fitted[self.chosen], x)


def _part_slices(signal: Signal, correct: np.ndarray, part: np.ndarray, fractions: np.ndarray, size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.empty(len(fractions)), np.empty(len(fractions))
    for i, f in enumerate(fractions):
        idx = mixed_slice(correct, f, size, rng, pool=part)
        xs[i], ys[i] = signal(idx), float(correct[idx].mean())
    return xs, ys


def calibrate(signal: Signal, correct: np.ndarray, *, seed: int, size: int, split=(0.2, 0.1, 0.7),
              calibration_step: int = 2, eval_step: int = 10, regressors: Sequence[str] = REGRESSORS,
              base_seed: int = 0, shuffle: bool = False) -> Calibration:
    """B.1.3 for one seed: split the pool (a seeded permutation, ``split`` shares), fit every
    regressor on dense calibration slices, pick the least validation MAE, score the test slices.

    Slice sizes are min(size, #correct, #incorrect) within each part. ``shuffle``: the
    shuffled-label baseline -- the correctness labels are permuted among the queries first
    (seeded), so dispersion carries no information about them and every MAE is what the
    procedure reaches by fitting noise.

    Raises:
        DataError: a part holds fewer than 2 correct or incorrect queries.
    """
    c = np.asarray(correct, bool)
    if shuffle:
        c = np.random.default_rng([base_seed, 0x5F1E, seed]).permutation(c)
    rng = np.random.default_rng([base_seed, 0xCA1, seed])
    perm = rng.permutation(c.size)
    n_cal, n_val = int(round(split[0] * c.size)), int(round(split[1] * c.size))
    parts = perm[:n_cal], perm[n_cal:n_cal + n_val], perm[n_cal + n_val:]
    sizes = tuple(fitting_size(c[p], size) for p in parts)
    for name, s in zip(("calibration", "validation", "test"), sizes):
        if s < 2:
            raise DataError(f"{FIELD}: the {name} part has fewer than 2 correct or incorrect queries")
    xc, yc = _part_slices(signal, c, parts[0], fraction_grid(calibration_step), sizes[0], rng)
    xv, yv = _part_slices(signal, c, parts[1], fraction_grid(eval_step), sizes[1], rng)
    xt, yt = _part_slices(signal, c, parts[2], fraction_grid(eval_step), sizes[2], rng)
    fitted = {r: _fit(make_regressor(r, seed), xc, yc) for r in regressors}
    val = {r: mean_abs_error(_predict(m, xv), yv) for r, m in fitted.items()}
    chosen = min(regressors, key=lambda r: val[r])  # first of ties, in the given order
    test = {r: mean_abs_error(_predict(m, xt), yt) for r, m in fitted.items()}
    constant = float(yc.mean())
    test["constant"] = mean_abs_error(np.full_like(yt, constant), yt)
    nat_true = float(c[parts[2]].mean())
    nat_pred = float(_predict(fitted[chosen], np.array([signal(parts[2])]))[0])
    return Calibration(seed, chosen, fitted, val, xt, yt, test, constant, sizes,  # type: ignore[arg-type]
                       (nat_true, nat_pred), float(c[parts[0]].mean()), _predict(fitted[chosen], xt))
