r"""Ranking example hardness without labels, and calibration by dispersion (paper 001
Sec. 3.1, Fig. 8; B.1.2-B.1.4, Tables 3-8).

For one model and one query set with correctness labels (:mod:`dispersion.measure.queries`:
lm-eval sample logs, a table, or the embedded multiple-choice cloze the model answers itself),
every query i has an embedding E_i (default: the final layer's state at the query's last
token, the paper's choice), a perplexity ppl_i of its text, and a label.

**Controlled slicing (Sec. 3.1, B.1.2).** For each target fraction f = 0, 0.1, ..., 1, a slice
of S queries holds exactly round(f S) correct and S - round(f S) incorrect queries, drawn
without replacement, R times (seeds). Per slice

.. math::
    \bar D = \binom{S}{2}^{-1}\sum_{i<j}\Big[1 - \frac{E_i\cdot E_j}{\|E_i\|\|E_j\|}\Big]
    \quad\text{(Eq. 1)}, \qquad \overline{\mathrm{ppl}} = \frac1S \sum_i \mathrm{ppl}_i,

reported as mean +- standard error (std / sqrt(R)) over the seeds; Spearman's rho of f against
each (over the per-fraction means, and over every slice) says which signal is monotone in
correctness. With ``scope: within`` the slice's value is the mean within-query token dispersion
instead. When the pool holds fewer than S correct or incorrect queries, S becomes the largest
size every fraction can be drawn at, min(S, #correct, #incorrect), recorded in ``slice_size``
and logged: never sampled with replacement.

**Calibration by dispersion (B.1.3).** Per seed the pool is split 20/10/70 into calibration,
validation and test parts. Dense slices (f = 0, 0.02, ..., 1) of the calibration part train
regressors accuracy = g(dispersion): linear, polynomial (degree 2 and 3), isotonic (direction
from the data) and random forest (scikit-learn); the one with the least mean absolute error on
the validation part's slices (f = 0, 0.1, ..., 1) predicts the accuracy of the test part's
slices from their dispersion alone. MAE in percentage points, over ``calibration_seeds`` seeds;
beside it the MAE of the constant predictor (the calibration slices' mean accuracy) and the
prediction for the whole test part (its natural accuracy).

**Distribution shift (B.1.4).** The slicing runs on every query set; the calibration fitted on
query set A (per seed: its chosen regressor) is applied to the test slices of query set B of
the same model, with its MAE.

**Per-example ranking (beyond the paper).** Dispersion is a property of a set; a single query
is scored by its mean cosine distance to the rest of the set,
m_i = 1 - (u_i . s - 1) / (N - 1) with unit rows u and s = sum_j u_j (O(N d),
:func:`dispersion.measure.metrics.mean_cosine_distance_to_rest`), and by its perplexity. Per
score: the AUROC for predicting a **wrong** answer in the paper's direction (low m_i flags a
wrong answer; high perplexity flags a wrong answer: an AUROC above 0.5 supports that direction,
below 0.5 the opposite), and the error rate of the flagged ``tail`` (default 10%) against the
pool's error rate.

Differences from the paper: see docs/ANALYSES.md (the embedded cloze instead of MMLU/ARC on
models without a hub; the S cap; the test-part slices and natural accuracy; the constant
baseline; the per-example scores).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from dispersion.analyses.registry import Planned, Section, Step, StepContext
from dispersion.core.config import LayerRef, Pool, Site, Strict
from dispersion.core.errors import ConfigError, DataError
from dispersion.measure.metrics import mean_cosine_distance_to_rest
from dispersion.report.figures import Figure, category_colors, spearman
from dispersion.report.markdown import md_table

FIELD = "analysis.hardness"
Regressor = Literal["linear", "poly2", "poly3", "isotonic", "forest"]
REGRESSORS: tuple[Regressor, ...] = ("linear", "poly2", "poly3", "isotonic", "forest")


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #
class ClozeSet(Strict):
    """The embedded multiple-choice cloze (:func:`dispersion.measure.queries.build_cloze`):
    ``n`` queries from one domain's ``split`` (held-out by default), a context of ``context``
    tokens (T), the true continuation of ``continuation`` tokens (K) among ``choices`` (C)
    options. Every model answers it itself; ``name`` defaults to ``cloze-{domain}``."""

    kind: Literal["embedded_cloze"]
    domain: Literal["prose", "code"]
    split: Literal["train", "validation", "test"] = "validation"
    context: Annotated[int, Field(ge=1)] = 64
    continuation: Annotated[int, Field(ge=1)] = 8
    choices: Annotated[int, Field(ge=2)] = 4
    n: Annotated[int, Field(ge=4)] = 1000
    seed: int = 0
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None

    @property
    def set_name(self) -> str:
        return self.name or f"cloze-{self.domain}"


class LmEvalSet(Strict):
    """lm-evaluation-harness sample logs (``samples_<task>_<date>.jsonl``, written by
    ``lm_eval ... --log_samples --output_path P``) of the configured model ``model`` (at
    ``revision``, default its last): ``paths`` are files, folders (searched recursively) or
    globs. ``metric`` is the per-document 0/1 metric read as the label (``acc``, ``acc_norm``,
    ``exact_match``...), ``filter`` the lm-eval filter for tasks logged under several. One query
    set per task, or one set ``name`` over all files (e.g. MMLU's 57 subtasks)."""

    kind: Literal["lm_eval"]
    paths: Annotated[list[str], Field(min_length=1)]
    model: str
    revision: str | None = None
    metric: str = "acc"
    filter: str | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None


class TableSet(Strict):
    """A CSV/Parquet table (``query_id``, ``text``, ``correct``; optional ``task``,
    ``slice``) of answers by the configured model ``model`` (at ``revision``, default its
    last); ``name`` defaults to the file's stem."""

    kind: Literal["table"]
    path: str
    model: str
    revision: str | None = None
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None


QuerySetOption = Annotated[ClozeSet | LmEvalSet | TableSet, Field(discriminator="kind")]


def _default_sets() -> list:
    return [ClozeSet(kind="embedded_cloze", domain="prose"), ClozeSet(kind="embedded_cloze", domain="code")]


class HardnessOptions(Strict):
    """Options of the ``hardness`` step (``analysis.hardness``); paper values are the defaults.

    Attributes:
        query_sets: what is sliced (``kind: embedded_cloze | lm_eval | table``); default the
            cloze on both embedded domains.
        revisions: which revisions of each configured model answer the cloze: ``last``
            (default), ``all`` or a list. lm-eval and table sets belong to the model they name.
        slice_size: S, queries per slice (paper: 100); capped per query set to what fits.
        seeds: R, slices drawn per fraction (paper: 10).
        fraction_step: step of the target fractions, in percent (paper: 10).
        layers, site, pools: which states embed a query (paper: final layer, last token).
        scopes: ``across`` (Eq. 1 over the slice's query vectors, the paper) and/or ``within``
            (mean within-query token dispersion).
        prepend_bos: feed a BOS before each query (default: ``extraction.prepend_bos``).
        max_tokens: longer query texts keep their last ``max_tokens`` tokens.
        calibration: run the calibration (B.1.3) and distribution-shift (B.1.4) parts.
        calibration_seeds: splits of the pool (paper: 10).
        calibration_step: step of the dense calibration fractions, in percent (paper: 2).
        calibration_split: calibration / validation / test shares (paper: 0.2 / 0.1 / 0.7).
        regressors: the candidates (paper: linear, polynomial, isotonic, random forest).
        tail: share of queries flagged by each per-example score (default 10%).
        shard_size: queries per stored measurement shard (a rerun resumes per shard).
        seed: seeds every draw of slices and splits.
    """

    query_sets: Annotated[list[QuerySetOption], Field(min_length=1)] = Field(default_factory=_default_sets)
    revisions: Literal["last", "all"] | Annotated[list[str], Field(min_length=1)] = "last"
    slice_size: Annotated[int, Field(ge=2)] = 100
    seeds: Annotated[int, Field(ge=1)] = 10
    fraction_step: Annotated[int, Field(ge=1, le=50)] = 10
    layers: Annotated[list[LayerRef], Field(min_length=1)] = ["final"]
    site: Site = "block"
    pools: Annotated[list[Pool], Field(min_length=1)] = ["last"]
    scopes: Annotated[list[Literal["across", "within"]], Field(min_length=1)] = ["across"]
    prepend_bos: bool | None = None
    max_tokens: Annotated[int, Field(ge=2)] = 512
    calibration: bool = True
    calibration_seeds: Annotated[int, Field(ge=1)] = 10
    calibration_step: Annotated[int, Field(ge=1, le=50)] = 2
    calibration_split: tuple[float, float, float] = (0.2, 0.1, 0.7)
    regressors: Annotated[list[Regressor], Field(min_length=1)] = list(REGRESSORS)
    tail: Annotated[float, Field(gt=0, lt=1)] = 0.1
    shard_size: Annotated[int, Field(ge=1)] = 256
    seed: int = 0

    @field_validator("fraction_step", "calibration_step")
    @classmethod
    def _divides_100(cls, v: int) -> int:
        if 100 % v:
            raise ValueError(f"must divide 100 (a grid from 0% to 100%), got {v}")
        return v

    @field_validator("calibration_split")
    @classmethod
    def _split(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0 or abs(sum(v) - 1) > 1e-6:
            raise ValueError(f"three positive shares summing to 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> HardnessOptions:
        names = [s.set_name for s in self.query_sets if isinstance(s, ClozeSet)]
        names += [s.name for s in self.query_sets if not isinstance(s, ClozeSet) and s.name]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"query_sets: two query sets named {dup!r} (give each a name)")
        return self


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


def _se(v: np.ndarray) -> float | None:
    return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


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


def _rho(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[float | None, float | None]:
    r = spearman(list(x), list(y))
    return (r.rho, r.p) if r is not None else (None, None)


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


def _mae(pred: np.ndarray, true: np.ndarray) -> float:
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
              base_seed: int = 0) -> Calibration:
    """B.1.3 for one seed: split the pool (a seeded permutation, ``split`` shares), fit every
    regressor on dense calibration slices, pick the least validation MAE, score the test slices.

    Slice sizes are min(size, #correct, #incorrect) within each part.

    Raises:
        DataError: a part holds fewer than 2 correct or incorrect queries.
    """
    c = np.asarray(correct, bool)
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
    val = {r: _mae(_predict(m, xv), yv) for r, m in fitted.items()}
    chosen = min(regressors, key=lambda r: val[r])  # first of ties, in the given order
    test = {r: _mae(_predict(m, xt), yt) for r, m in fitted.items()}
    constant = float(yc.mean())
    test["constant"] = _mae(np.full_like(yt, constant), yt)
    nat_true = float(c[parts[2]].mean())
    nat_pred = float(_predict(fitted[chosen], np.array([signal(parts[2])]))[0])
    return Calibration(seed, chosen, fitted, val, xt, yt, test, constant, sizes,  # type: ignore[arg-type]
                       (nat_true, nat_pred), _predict(fitted[chosen], xt))


# --------------------------------------------------------------------------- #
# per-example ranking
# --------------------------------------------------------------------------- #
def rank_scores(score: np.ndarray, correct: np.ndarray, *, flag: Literal["low", "high"], tail: float = 0.1
                ) -> dict[str, float | int | None]:
    """How well one per-example score flags wrong answers.

    ``flag = "low"``: low scores are predicted wrong (mean cosine distance, within-query
    dispersion); ``"high"``: high scores are (perplexity). Returns ``auroc`` (scikit-learn's
    ``roc_auc_score`` of *wrong* against the score oriented that way: > 0.5 supports the
    direction; None with one class only), ``tail_n`` = ceil(tail N) flagged queries (the lowest
    or highest, stable order) and their ``tail_error_rate``, and the pool's ``error_rate``.
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(score, np.float64)
    wrong = ~np.asarray(correct, bool)
    oriented = -s if flag == "low" else s
    auroc = float(roc_auc_score(wrong, oriented)) if 0 < wrong.sum() < wrong.size else None
    k = max(1, int(math.ceil(tail * s.size - 1e-9)))
    flagged = np.argsort(-oriented, kind="stable")[:k]
    return {"auroc": auroc, "tail_n": k, "tail_error_rate": float(wrong[flagged].mean()),
            "error_rate": float(wrong.mean()), "n": int(s.size)}


# --------------------------------------------------------------------------- #
# tables
# --------------------------------------------------------------------------- #
_KEY = [("model", pa.string()), ("revision", pa.string()), ("queryset", pa.string()), ("layer", pa.string()),
        ("site", pa.string()), ("pool", pa.string()), ("scope", pa.string())]
SLICES_SCHEMA = pa.schema(_KEY + [
    ("fraction", pa.float64()), ("slice_size", pa.int32()), ("seeds", pa.int32()), ("n_correct", pa.float64()),
    ("dispersion", pa.float64()), ("dispersion_se", pa.float64()), ("ppl", pa.float64()), ("ppl_se", pa.float64()),
])
"""Sec. 3.1 / B.1.2 (Fig. 8, Tables 3-4, 6-8): one row per target fraction; ``n_correct`` is the
mean correct count per slice (round(fraction * slice_size))."""
SPEARMAN_SCHEMA = pa.schema(_KEY + [
    ("n_queries", pa.int32()), ("accuracy", pa.float64()), ("slice_size", pa.int32()), ("signal", pa.string()),
    ("spearman_r", pa.float64()), ("spearman_p", pa.float64()), ("n_fractions", pa.int32()),
    ("spearman_slices_r", pa.float64()), ("spearman_slices_p", pa.float64()), ("n_slices", pa.int32()),
])
"""B.1.2: Spearman of the target fraction against each signal (``dispersion`` or ``perplexity``),
over the per-fraction means and over every slice."""
CALIBRATION_SCHEMA = pa.schema(_KEY + [
    ("seed", pa.int32()), ("regressor", pa.string()), ("val_mae", pa.float64()), ("mae", pa.float64()),
    *[(f"mae_{r}", pa.float64()) for r in REGRESSORS], ("mae_constant", pa.float64()),
    ("calibration_size", pa.int32()), ("validation_size", pa.int32()), ("test_size", pa.int32()),
    ("test_accuracy", pa.float64()), ("test_predicted", pa.float64()),
])
"""B.1.3 (Table 5): one row per seed; ``mae`` (percentage points) is the chosen ``regressor`` on
the test slices, ``mae_*`` every candidate (null when not fitted) and the constant predictor;
``test_accuracy`` / ``test_predicted``: the whole test part's accuracy and its prediction."""
SHIFT_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("fit_on", pa.string()), ("applied_to", pa.string()),
    ("layer", pa.string()), ("site", pa.string()), ("pool", pa.string()), ("scope", pa.string()),
    ("seeds", pa.int32()), ("mae", pa.float64()), ("mae_se", pa.float64()), ("mae_in_domain", pa.float64()),
    ("mae_constant", pa.float64()),
])
"""B.1.4: calibration fitted on ``fit_on`` applied to the test slices of ``applied_to`` (mean
MAE over seeds, percentage points), beside ``applied_to``'s own calibration (``mae_in_domain``)
and the constant predictor fitted on ``fit_on``."""
RANKING_SCHEMA = pa.schema(_KEY + [
    ("signal", pa.string()), ("flags", pa.string()), ("n", pa.int32()), ("error_rate", pa.float64()),
    ("auroc", pa.float64()), ("tail", pa.float64()), ("tail_n", pa.int32()), ("tail_error_rate", pa.float64()),
])
"""Per-example ranking: ``signal`` ``mean_distance`` (scope across), ``within`` or
``perplexity``; ``flags`` which end is predicted wrong; AUROC for a wrong answer in that
direction; the error rate of the flagged tail against the pool's."""
QUERIES_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("queryset", pa.string()), ("query_id", pa.string()),
    ("task", pa.string()), ("slice", pa.string()), ("correct", pa.bool_()), ("ppl", pa.float64()),
    ("layer", pa.string()), ("site", pa.string()), ("pool", pa.string()), ("scope", pa.string()),
    ("score", pa.float64()), ("text", pa.string()),
])
"""Every query with its per-example score (mean cosine distance to the rest of its set, or its
within-query dispersion): sort ascending to read the low-dispersion tail."""


@dataclass(frozen=True)
class Variant:
    """Which embedding a query set is measured by: (layer, site, pool, scope)."""

    layer: str
    site: str
    pool: str
    scope: str

    def key(self) -> dict[str, str]:
        return {"layer": self.layer, "site": self.site, "pool": self.pool, "scope": self.scope}


def variants(table: pa.Table, opts: HardnessOptions) -> list[Variant]:
    """The (layer, site, pool, scope) combinations a measured query table holds for ``opts``."""
    layers: list[str] = []
    for name in table.column_names:
        if name.startswith("vec/"):
            _, layer, site, pool = name.split("/", 3)
            if site == opts.site and pool in opts.pools and layer not in layers:
                layers.append(layer)
    layers.sort(key=lambda s: (s == "final", int(s) if s.isdigit() else 0))
    out = []
    for layer in layers:
        if "across" in opts.scopes:
            out += [Variant(layer, opts.site, p, "across") for p in opts.pools]
        if "within" in opts.scopes:
            out.append(Variant(layer, opts.site, "tokens", "within"))
    return out


def signal_of(table: pa.Table, v: Variant) -> Signal:
    from dispersion.measure.queries import query_arrays, within_name

    if v.scope == "across":
        return Signal(vectors=query_arrays(table, v.layer, v.site, v.pool))
    return Signal(within=table.column(within_name(v.layer, v.site)).to_numpy(zero_copy_only=False))


@dataclass
class SetResult:
    """Everything the step computes for one (model@revision, query set, variant)."""

    model: str
    revision: str
    queryset: str
    variant: Variant
    correct: np.ndarray
    slices: Slices | None
    calibrations: list[Calibration]


def analyse_set(table: pa.Table, *, model: str, revision: str, queryset: str, opts: HardnessOptions,
                log: Callable[[str], None]) -> tuple[list[SetResult], dict[str, list[dict]]]:
    """Slices, calibration and ranking of one measured query set (every variant): the
    results for the shift and the figures, and the rows of each table."""
    correct = np.asarray(table.column("correct").to_pylist(), bool)
    ppl = table.column("ppl").to_numpy(zero_copy_only=False).astype(np.float64)
    rows: dict[str, list[dict]] = {k: [] for k in ("slices", "spearman", "calibration", "ranking", "queries")}
    base = {"model": model, "revision": revision, "queryset": queryset}
    size = fitting_size(correct, opts.slice_size)
    n, acc = int(correct.size), float(correct.mean()) if correct.size else float("nan")
    if size < 2:
        log(f"hardness: {model}@{revision} {queryset}: {int(correct.sum())} correct and "
            f"{int((~correct).sum())} incorrect queries: no slices")
    elif size < opts.slice_size:
        log(f"hardness: {model}@{revision} {queryset}: {int(correct.sum())} correct / {int((~correct).sum())} "
            f"incorrect of {n}: slices of {size} instead of {opts.slice_size}")
    results: list[SetResult] = []
    fr = fraction_grid(opts.fraction_step)
    texts = None
    for v in variants(table, opts):
        sig = signal_of(table, v)
        key = {**base, **v.key()}
        sl = None
        if size >= 2:
            sl = controlled_slices(sig, ppl, correct, fractions=fr, size=size, seeds=opts.seeds, seed=opts.seed)
            for i, f in enumerate(fr):
                rows["slices"].append({**key, "fraction": float(f), "slice_size": size, "seeds": opts.seeds,
                                       "n_correct": float(sl.n_correct[i].mean()),
                                       "dispersion": float(sl.dispersion[i].mean()),
                                       "dispersion_se": _se(sl.dispersion[i]),
                                       "ppl": float(sl.ppl[i].mean()), "ppl_se": _se(sl.ppl[i])})
            for signal, values in (("dispersion", sl.dispersion), ("perplexity", sl.ppl)):
                r, p = _rho(fr, values.mean(1))
                rs, ps = _rho(np.repeat(fr, values.shape[1]), values.reshape(-1))
                rows["spearman"].append({**key, "n_queries": n, "accuracy": acc, "slice_size": size, "signal": signal,
                                         "spearman_r": r, "spearman_p": p, "n_fractions": len(fr),
                                         "spearman_slices_r": rs, "spearman_slices_p": ps, "n_slices": values.size})
        cals: list[Calibration] = []
        if opts.calibration and size >= 2:
            skipped: list[str] = []
            for s in range(opts.calibration_seeds):
                try:
                    cal = calibrate(sig, correct, seed=s, size=opts.slice_size, split=opts.calibration_split,
                                    calibration_step=opts.calibration_step, eval_step=opts.fraction_step,
                                    regressors=opts.regressors, base_seed=opts.seed)
                except DataError as err:  # this seed's split left a part without both labels
                    skipped.append(str(err).split(": ", 1)[-1])
                    continue
                cals.append(cal)
                rows["calibration"].append({
                    **key, "seed": s, "regressor": cal.chosen, "val_mae": cal.val_mae[cal.chosen], "mae": cal.mae,
                    **{f"mae_{r}": cal.test_mae.get(r) for r in REGRESSORS},
                    "mae_constant": cal.test_mae["constant"],
                    "calibration_size": cal.sizes[0], "validation_size": cal.sizes[1], "test_size": cal.sizes[2],
                    "test_accuracy": cal.natural[0], "test_predicted": cal.natural[1]})
            if skipped and not results:  # the split does not depend on the variant: say it once
                log(f"hardness: {model}@{revision} {queryset}: calibration skips {len(skipped)} of "
                    f"{opts.calibration_seeds} seeds ({skipped[0]})")
        # per-example scores
        score = mean_cosine_distance_to_rest(query_vectors(table, v)) if v.scope == "across" else sig.within
        assert score is not None
        rows["ranking"].append({**key, "signal": "mean_distance" if v.scope == "across" else "within",
                                "flags": "low", "tail": opts.tail,
                                **rank_scores(score, correct, flag="low", tail=opts.tail)})
        rows["ranking"].append({**key, "signal": "perplexity", "flags": "high", "tail": opts.tail,
                                **rank_scores(ppl, correct, flag="high", tail=opts.tail)})
        if texts is None:
            texts = _texts(table)
        ids, tasks, slc = (table.column(c).to_pylist() for c in ("query_id", "task", "slice"))
        rows["queries"] += [{**key, "query_id": ids[i], "task": tasks[i], "slice": slc[i], "correct": bool(correct[i]),
                             "ppl": float(ppl[i]), "score": float(score[i]), "text": texts[i]} for i in range(n)]
        results.append(SetResult(model, revision, queryset, v, correct, sl, cals))
    return results, rows


def query_vectors(table: pa.Table, v: Variant) -> np.ndarray:
    from dispersion.measure.queries import query_arrays

    return query_arrays(table, v.layer, v.site, v.pool)


def _texts(table: pa.Table) -> list[str | None]:
    return table.column("text").to_pylist() if "text" in table.column_names else [None] * table.num_rows


def shift_rows(results: Sequence[SetResult]) -> list[dict]:
    """B.1.4: every ordered pair of query sets of one model@revision and variant: the
    calibration of the first (per seed) applied to the test slices of the second."""
    groups: dict[tuple, dict[str, SetResult]] = {}
    for r in results:
        if r.calibrations:
            groups.setdefault((r.model, r.revision, r.variant), {})[r.queryset] = r
    rows = []
    for (model, rev, v), sets in groups.items():
        for a, ra in sets.items():
            for b, rb in sets.items():
                if a == b:
                    continue
                by_seed = {c.seed: c for c in rb.calibrations}
                pairs = [(ca, by_seed[ca.seed]) for ca in ra.calibrations if ca.seed in by_seed]
                if not pairs:
                    continue
                maes = np.array([_mae(ca.apply(cb.test_x), cb.test_y) for ca, cb in pairs])
                const = np.array([_mae(np.full_like(cb.test_y, ca.constant), cb.test_y) for ca, cb in pairs])
                rows.append({"model": model, "revision": rev, "fit_on": a, "applied_to": b, **v.key(),
                             "seeds": len(pairs), "mae": float(maes.mean()), "mae_se": _se(maes),
                             "mae_in_domain": float(np.mean([c.mae for c in rb.calibrations])),
                             "mae_constant": float(const.mean())})
    return rows


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def _last_revisions(results: Sequence[SetResult]) -> list[SetResult]:
    """The results of each model's last revision (by training step), in model order."""
    from dispersion.core.ids import revision_order

    last: dict[str, str] = {}
    for r in results:
        if r.model not in last or revision_order(r.revision) > revision_order(last[r.model]):
            last[r.model] = r.revision
    return [r for r in results if r.revision == last[r.model]]


def plot_hardness(results: Sequence[SetResult], variant: Variant) -> bytes:
    """Like paper 001 Fig. 8 with Tables 3-4 beside it: per query set (rows) and model at its
    last revision (columns), the slices' mean dispersion +- s.e. (left axis) and mean
    perplexity +- s.e. (right axis) against the fraction correct, each with Spearman's rho over
    the fractions. Every revision's numbers are in the tables."""
    rs = [r for r in _last_revisions(results) if r.variant == variant and r.slices is not None]
    sets = list(dict.fromkeys(r.queryset for r in rs))
    models = list(dict.fromkeys(r.model for r in rs))
    fig = Figure(max(len(sets), 1), max(len(models), 1), width=3.8)
    colors = category_colors(["dispersion", "perplexity"])
    ylabel = "avg pairwise cosine distance" if variant.scope == "across" else "mean within-query dispersion"
    for i, qs in enumerate(sets):
        for j, model in enumerate(models):
            ax = fig.ax(i, j)
            r = next((r for r in rs if r.queryset == qs and r.model == model), None)
            if r is None or r.slices is None:
                fig.off(ax)
                continue
            x, rhos = r.slices.fractions * 100, []
            ax2 = fig.twin(ax)
            for a, what, fmt in ((ax, "dispersion", "o-"), (ax2, "perplexity", "s--")):
                vals = r.slices.dispersion if what == "dispersion" else r.slices.ppl
                mean = vals.mean(1)
                se = vals.std(1, ddof=1) / math.sqrt(vals.shape[1]) if vals.shape[1] > 1 else None
                a.errorbar(x, mean, yerr=se, fmt=fmt, ms=3, lw=1, capsize=2, color=colors[what], label=what)
                rhos.append((what, colors[what], spearman(list(r.slices.fractions), list(mean))))
            ax2.set_ylabel("mean perplexity of the query text")
            fig.style(ax, f"{qs} · {model}@{r.revision} · S = {r.slices.size}", "fraction correct in the slice (%)",
                      ylabel)
            fig.annotate(ax, rhos)
    fig.legend("mean ± s.e. over seeds")
    return fig.render(f"Hardness: dispersion and perplexity vs fraction correct (layer {variant.layer}, "
                      f"{variant.scope}, pool {variant.pool})")


def plot_calibration(results: Sequence[SetResult], variant: Variant) -> bytes:
    """B.1.3: predicted vs true accuracy of the test slices (every seed), per query set, one
    colour per model at its last revision, with the diagonal and the mean MAE."""
    rs = [r for r in _last_revisions(results) if r.variant == variant and r.calibrations]
    sets = list(dict.fromkeys(r.queryset for r in rs))
    fig = Figure(1, max(len(sets), 1), width=3.2, height=3.0)
    colors = category_colors(f"{r.model}@{r.revision}" for r in rs)
    for j, qs in enumerate(sets):
        ax = fig.ax(0, j)
        ax.plot([0, 100], [0, 100], "--", color="grey", lw=0.8)
        maes = []
        for r in (r for r in rs if r.queryset == qs):
            name = f"{r.model}@{r.revision}"
            x = np.concatenate([c.test_y for c in r.calibrations]) * 100
            y = np.concatenate([c.predictions for c in r.calibrations]) * 100
            ax.plot(x, y, "o", ms=2.5, alpha=0.6, color=colors[name], label=name)
            maes.append(f"{r.model} {np.mean([c.mae for c in r.calibrations]):.1f}")
        fig.style(ax, f"{qs}\nMAE (pp): {', '.join(maes)}", "true accuracy of the test slice (%)",
                  "predicted from dispersion (%)")
    fig.legend("model@revision")
    return fig.render(f"Calibration by dispersion on held-out test slices (layer {variant.layer}, "
                      f"{variant.scope}, pool {variant.pool})")


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _fmt_rho(r: float | None, p: float | None) -> str:
    if r is None:
        return "-"
    ptxt = "p < 0.001" if p is not None and p < 1e-3 else f"p = {p:.3f}" if p is not None else ""
    return f"{r:+.2f} ({ptxt})"


def summary_markdown(tables: dict[str, pa.Table], variant: Variant) -> str:
    """One row per model@revision and query set at the main variant, then the shift."""
    def match(r: dict) -> bool:
        return all(r.get(k) == val for k, val in variant.key().items())
    spear = [r for r in tables["hardness_spearman"].to_pylist() if match(r)]
    cal = [r for r in tables["hardness_calibration"].to_pylist() if match(r)]
    rank = [r for r in tables["hardness_ranking"].to_pylist() if match(r)]
    keys = list(dict.fromkeys((r["model"], r["revision"], r["queryset"]) for r in spear + rank))
    out = [f"Layer {variant.layer}, site {variant.site}, pool {variant.pool}, scope {variant.scope}. "
           "ρ: Spearman of the fraction correct against the slice means; calibration: mean ± s.e. over "
           "seeds of the test-slice MAE (percentage points), the regressor most often chosen, and the "
           "constant predictor's MAE; AUROC for a wrong answer (low mean distance / high perplexity "
           "flag it; > 0.5 supports that direction); tail: error rate of the flagged 10% vs the pool.", "",
           "| model@revision | query set | N | accuracy | S | ρ(fraction, dispersion) | ρ(fraction, ppl) | "
           "calibration MAE | constant MAE | AUROC dispersion | AUROC ppl | tail error (dispersion / ppl / pool) |",
           "|---|---|---:|---:|---:|---|---|---|---:|---:|---:|---|"]
    for m, rev, qs in keys:
        sp = {r["signal"]: r for r in spear if (r["model"], r["revision"], r["queryset"]) == (m, rev, qs)}
        cs = [r for r in cal if (r["model"], r["revision"], r["queryset"]) == (m, rev, qs)]
        rk = {r["signal"]: r for r in rank if (r["model"], r["revision"], r["queryset"]) == (m, rev, qs)}
        d, p = sp.get("dispersion", {}), sp.get("perplexity", {})
        if cs:
            maes = np.array([r["mae"] for r in cs])
            chosen = max(set(r["regressor"] for r in cs), key=[r["regressor"] for r in cs].count)
            se = _se(maes)
            cal_txt = f"{maes.mean():.1f} ± {se:.1f} ({chosen})" if se is not None else f"{maes.mean():.1f} ({chosen})"
            const_txt = f"{np.mean([r['mae_constant'] for r in cs]):.1f}"
        else:
            cal_txt, const_txt = "-", "-"
        dr = rk.get("mean_distance") or rk.get("within") or {}
        pr = rk.get("perplexity", {})

        def au(r: dict) -> str:
            return f"{r['auroc']:.3f}" if r.get("auroc") is not None else "-"
        tail = (f"{dr.get('tail_error_rate', float('nan')):.2f} / {pr.get('tail_error_rate', float('nan')):.2f} / "
                f"{pr.get('error_rate', float('nan')):.2f}")
        n = d.get("n_queries") or dr.get("n")
        acc = d.get("accuracy")
        if acc is None and dr.get("error_rate") is not None:
            acc = 1 - dr["error_rate"]
        out.append(f"| {m}@{rev} | {qs} | {n} | {acc:.3f} | {d.get('slice_size', '-')} | "
                   f"{_fmt_rho(d.get('spearman_r'), d.get('spearman_p'))} | "
                   f"{_fmt_rho(p.get('spearman_r'), p.get('spearman_p'))} | {cal_txt} | {const_txt} | "
                   f"{au(dr)} | {au(pr)} | {tail} |")
    shift = tables["hardness_shift"]
    if shift.num_rows:
        same = pc.and_(pc.equal(shift["layer"], variant.layer), pc.equal(shift["pool"], variant.pool))
        shift = shift.filter(pc.and_(same, pc.equal(shift["scope"], variant.scope)))
    if shift.num_rows:
        out += ["", "Distribution shift (B.1.4): calibration fitted on one query set, applied to another "
                "(MAE in percentage points):", "",
                md_table(shift, ["model", "revision", "fit_on", "applied_to", "mae", "mae_in_domain", "mae_constant"])]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- #
# the step
# --------------------------------------------------------------------------- #
def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def hardness_tables(measured: Sequence[tuple[str, str, str, pa.Table]], opts: HardnessOptions,
                    log: Callable[[str], None] = print) -> tuple[dict[str, pa.Table], list[SetResult]]:
    """Every table of the step from measured query sets ``(model, revision, queryset, table)``
    (tables of :func:`dispersion.measure.queries.read_measured`, plus a ``text`` column)."""
    rows: dict[str, list[dict]] = {k: [] for k in ("slices", "spearman", "calibration", "ranking", "queries")}
    results: list[SetResult] = []
    for model, rev, qs, table in measured:
        res, r = analyse_set(table, model=model, revision=rev, queryset=qs, opts=opts, log=log)
        results += res
        for k, v in r.items():
            rows[k] += v
    tables = {
        "hardness_slices": _table(rows["slices"], SLICES_SCHEMA),
        "hardness_spearman": _table(rows["spearman"], SPEARMAN_SCHEMA),
        "hardness_calibration": _table(rows["calibration"], CALIBRATION_SCHEMA),
        "hardness_shift": _table(shift_rows(results), SHIFT_SCHEMA),
        "hardness_ranking": _table(rows["ranking"], RANKING_SCHEMA),
        "hardness_queries": _table(rows["queries"], QUERIES_SCHEMA),
    }
    return tables, results


def _revisions(mrs: list, choice: Any) -> list:
    from dispersion.core.ids import revision_order

    by: dict[str, list] = {}
    for mr in mrs:
        by.setdefault(mr.model, []).append(mr)
    out = []
    for rs in by.values():
        rs = sorted(rs, key=lambda m: revision_order(m.revision))
        if choice == "last":
            out.append(rs[-1])
        elif choice == "all":
            out += rs
        else:
            out += [m for m in rs if m.revision in choice]
    return out


def _named(mrs: list, model: str, revision: str | None, where: str):
    from dispersion.core.ids import revision_order

    rs = sorted((m for m in mrs if m.model == model), key=lambda m: revision_order(m.revision))
    if not rs:
        raise ConfigError(f"{where}.model: {model!r} is not a configured model "
                          f"(models: {', '.join(dict.fromkeys(m.model for m in mrs))})")
    if revision is None:
        return rs[-1]
    hit = [m for m in rs if m.revision == revision]
    if not hit:
        raise ConfigError(f"{where}.revision: {model!r} has no revision {revision!r} "
                          f"(configured: {', '.join(m.revision for m in rs)})")
    return hit[0]


def file_query_sets(opts: HardnessOptions, mrs: list) -> list:
    """The lm-eval and table query sets of ``opts``, each bound to the model@revision it names."""
    from dispersion.measure.queries import QuerySet, read_lm_eval_samples, read_query_table

    out = []
    for i, spec in enumerate(opts.query_sets):
        where = f"{FIELD}.query_sets.{i}"
        if isinstance(spec, ClozeSet):
            continue
        mr = _named(mrs, spec.model, spec.revision, where)
        try:
            if isinstance(spec, LmEvalSet):
                table = read_lm_eval_samples(spec.paths, metric=spec.metric, filter=spec.filter)
                if spec.name:
                    groups = {spec.name: table}
                else:
                    tasks = table.column("task").to_pylist()
                    groups = {t: table.filter(pc.equal(table["task"], t)) for t in dict.fromkeys(tasks)}
            else:
                table = read_query_table(spec.path)
                groups = {spec.name or spec.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]: table}
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        for name, t in groups.items():
            out.append(QuerySet.of_table(name, t, model=mr.model, revision=mr.revision))
    names = [q.name for q in out] + [s.set_name for s in opts.query_sets if isinstance(s, ClozeSet)]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{FIELD}.query_sets: two query sets named {dup!r} (give each a name)")
    return out


@dataclass(frozen=True)
class QueryJob:
    """One model@revision's share of the step: the query sets it answers (the embedded cloze) or
    embeds (lm-eval and table sets naming it), all measured with one spec. Picklable, so a Ray
    task can take it (``tasks/ray_hardness.py``)."""

    mr: Any                      # dispersion.measure.scan.ModelRevision
    sets: tuple                  # dispersion.measure.queries.QuerySet, ...
    spec: Any                    # dispersion.measure.queries.QuerySpec
    device: str

    def set_units(self) -> list[list]:
        """Each query set's shards (:class:`dispersion.measure.queries.QueryUnit`)."""
        from dispersion.measure.queries import query_units

        return [query_units(self.mr, qs, self.spec, self.device) for qs in self.sets]

    @property
    def units(self) -> list:
        return [u for us in self.set_units() for u in us]


def plan_jobs(cfg: Any, opts: HardnessOptions) -> list[QueryJob]:
    """The measurements the step needs, one :class:`QueryJob` per model@revision, in the order
    the step reports them (answering revisions first). Builds the cloze sets (one per tokenizer)
    and reads the query files; loads no model."""
    from dispersion.measure.corpus import embedded_documents
    from dispersion.measure.modeling import load_tokenizer, resolve_device, resolve_dtype
    from dispersion.measure.queries import QuerySet, QuerySpec, build_cloze
    from dispersion.measure.sampling import tokenizer_fingerprint
    from dispersion.measure.scan import model_revisions

    all_mrs = model_revisions(cfg)
    cloze_specs = [s for s in opts.query_sets if isinstance(s, ClozeSet)]
    files = file_query_sets(opts, all_mrs)
    answering = _revisions(all_mrs, opts.revisions) if cloze_specs else []
    if cloze_specs and not answering:
        raise ConfigError(f"{FIELD}.revisions: none of {opts.revisions} is a configured revision")
    order = list(dict.fromkeys([*answering, *(m for m in all_mrs
                                             if any((q.model, q.revision) == (m.model, m.revision) for q in files))]))
    device = resolve_device(cfg.extraction.device)
    bos = cfg.extraction.prepend_bos if opts.prepend_bos is None else opts.prepend_bos
    cloze_cache: dict[str, list] = {}
    jobs = []
    for mr in order:
        sets = []
        if mr in answering:
            tok = load_tokenizer(mr.source, field=mr.field)
            fp = tokenizer_fingerprint(tok)
            if fp not in cloze_cache:
                built = []
                for s in cloze_specs:
                    cz = build_cloze(embedded_documents(s.domain, s.split), tok, name=s.set_name, context=s.context,
                                     continuation=s.continuation, choices=s.choices, n=s.n, seed=s.seed)
                    definition = [s.model_dump(), fp, f"py{sys.version_info[0]}.{sys.version_info[1]}"]
                    built.append(QuerySet.of_cloze(s.set_name, cz, definition))
                cloze_cache[fp] = built
            sets += cloze_cache[fp]
        sets += [q for q in files if (q.model, q.revision) == (mr.model, mr.revision)]
        spec = QuerySpec(layers=tuple(opts.layers), sites=(opts.site,), pools=tuple(opts.pools), prepend_bos=bos,
                         max_tokens=opts.max_tokens, dtype=resolve_dtype(mr.dtype, device),
                         batch_size=cfg.extraction.batch_size, shard_size=opts.shard_size)
        jobs.append(QueryJob(mr, tuple(sets), spec, device))
    return jobs


def read_job(store: Any, job: QueryJob) -> list[tuple[str, str, str, pa.Table]]:
    """Every query set of ``job`` as its published shards (measured by the runner first):
    ``(model, revision, set, table)`` with the queries' text appended."""
    from dispersion.measure.queries import read_measured

    mr = job.mr
    return [(mr.model, mr.revision, qs.name, read_measured(store, us).append_column("text", qs.queries.column("text")))
            for qs, us in zip(job.sets, job.set_units())]


def plan_step(ctx: StepContext) -> Planned:
    """The step's units (every query-set shard of every model@revision), measured by the runner
    before :func:`run`; the jobs are what ``run`` reads besides."""
    jobs = plan_jobs(ctx.config, ctx.options("hardness"))
    return Planned(units=[u for j in jobs for u in j.units], detail=jobs)


def run(ctx: StepContext) -> Section:
    """From the published query-set shards of :func:`plan_step`: slice, calibrate, rank; tables,
    two figures and the report section."""
    opts: HardnessOptions = ctx.options("hardness")
    measured = [m for job in ctx.planned["hardness"].detail for m in read_job(ctx.store, job)]
    tables, results = hardness_tables(measured, opts, log=ctx.log)
    main = next((r.variant for r in results), None)
    figures = {}
    markdown = "_(no query set could be sliced)_\n"
    if main is not None:
        figures["hardness"] = plot_hardness(results, main)
        if any(r.calibrations for r in results):
            figures["hardness_calibration"] = plot_calibration(results, main)
        markdown = summary_markdown(tables, main)
    return STEP.section(tables=tables, figures=figures, markdown=markdown)


STEP = Step(name="hardness", title="Ranking example hardness without labels; calibration by dispersion",
            paper="001 Sec. 3.1, Fig. 8, B.1.2-B.1.4, Tables 3-8",
            tables=("hardness_slices", "hardness_spearman", "hardness_calibration", "hardness_shift",
                    "hardness_ranking", "hardness_queries"),
            run=run, options=HardnessOptions, default=HardnessOptions, plan=plan_step, unit_name="queries")
