"""The ``hardness`` step's tables: one query set's slices, calibrations and ranking
(:func:`analyse_set`), the distribution shift between sets, and the published schemas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dispersion.analyses.hardness.calibration import Calibration, calibrate, mean_abs_error
from dispersion.analyses.hardness.options import REGRESSORS, HardnessOptions
from dispersion.analyses.hardness.ranking import rank_scores
from dispersion.analyses.hardness.slices import (
    Signal,
    Slices,
    controlled_slices,
    fitting_size,
    fraction_grid,
    spearman_rho,
)
from dispersion.core.errors import DataError
from dispersion.measure.bootstrap import permutation_p, standard_error
from dispersion.measure.metrics import mean_cosine_distance_to_rest

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
    ("perm_p", pa.float64()), ("n_perm", pa.int32()),  # rho over the fractions, labels permuted (options)
])
"""B.1.2: Spearman of the target fraction against each signal (``dispersion`` or ``perplexity``),
over the per-fraction means and over every slice."""
CALIBRATION_SCHEMA = pa.schema(_KEY + [
    ("seed", pa.int32()), ("regressor", pa.string()), ("val_mae", pa.float64()), ("mae", pa.float64()),
    *[(f"mae_{r}", pa.float64()) for r in REGRESSORS], ("mae_constant", pa.float64()),
    ("calibration_size", pa.int32()), ("validation_size", pa.int32()), ("test_size", pa.int32()),
    ("test_accuracy", pa.float64()), ("test_predicted", pa.float64()),
    ("test_error", pa.float64()), ("test_error_constant", pa.float64()),
    ("mae_shuffled", pa.float64()), ("test_error_shuffled", pa.float64()),
])
"""B.1.3 (Table 5): one row per seed; ``mae`` (percentage points) is the chosen ``regressor`` on
the test slices (of ``test_size`` queries each), ``mae_*`` every candidate (null when not fitted)
and the constant predictor; ``test_accuracy`` / ``test_predicted``: the whole test part's
accuracy and its prediction, ``test_error`` their distance in percentage points (the paper's
Table 5 most likely reports this one), ``test_error_constant`` that of the calibration part's own
accuracy; ``mae_shuffled`` / ``test_error_shuffled``: the same procedure on permuted correctness
labels (the shuffled-label baseline: what fitting noise reaches)."""
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
    from dispersion.measure.answering import within_name
    from dispersion.measure.queries import query_arrays

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


def permuted_p(sig, ppl: np.ndarray, correct: np.ndarray, fractions: np.ndarray, size: int,
               opts: HardnessOptions) -> np.ndarray | None:
    """Permutation p-values of Spearman's rho over the fraction means, (dispersion, perplexity):
    the correctness labels permuted among the queries ``opts.permutations`` times, the slices
    drawn again each time (:func:`dispersion.measure.bootstrap.permutation_p`); None without."""
    if not opts.permutations:
        return None

    def rhos(labels: np.ndarray) -> np.ndarray:
        sl = controlled_slices(sig, ppl, labels, fractions=fractions, size=size, seeds=opts.seeds, seed=opts.seed)
        return np.array([spearman_rho(fractions, v.mean(1))[0] for v in (sl.dispersion, sl.ppl)], dtype=np.float64)

    p, _ = permutation_p(rhos, np.asarray(correct, bool), n_perm=opts.permutations, seed=opts.seed)
    return p


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
                                       "dispersion_se": standard_error(sl.dispersion[i]),
                                       "ppl": float(sl.ppl[i].mean()), "ppl_se": standard_error(sl.ppl[i])})
            perm = permuted_p(sig, ppl, correct, fr, size, opts)
            for j, (signal, values) in enumerate((("dispersion", sl.dispersion), ("perplexity", sl.ppl))):
                r, p = spearman_rho(fr, values.mean(1))
                rs, ps = spearman_rho(np.repeat(fr, values.shape[1]), values.reshape(-1))
                rows["spearman"].append({**key, "n_queries": n, "accuracy": acc, "slice_size": size, "signal": signal,
                                         "spearman_r": r, "spearman_p": p, "n_fractions": len(fr),
                                         "spearman_slices_r": rs, "spearman_slices_p": ps, "n_slices": values.size,
                                         "perm_p": None if perm is None else float(perm[j]),
                                         "n_perm": opts.permutations if perm is not None else None})
        cals: list[Calibration] = []
        if opts.calibration and size >= 2:
            skipped: list[str] = []
            fit = functools.partial(calibrate, sig, correct, size=opts.slice_size, split=opts.calibration_split,
                                    calibration_step=opts.calibration_step, eval_step=opts.fraction_step,
                                    regressors=opts.regressors, base_seed=opts.seed)
            for s in range(opts.calibration_seeds):
                try:
                    cal = fit(seed=s)
                except DataError as err:  # this seed's split left a part without both labels
                    skipped.append(str(err).split(": ", 1)[-1])
                    continue
                cals.append(cal)
                try:  # the shuffled-label baseline of this seed
                    null: Calibration | None = fit(seed=s, shuffle=True)
                except DataError:  # its split left a part without both labels
                    null = None
                rows["calibration"].append({
                    **key, "seed": s, "regressor": cal.chosen, "val_mae": cal.val_mae[cal.chosen], "mae": cal.mae,
                    **{f"mae_{r}": cal.test_mae.get(r) for r in REGRESSORS},
                    "mae_constant": cal.test_mae["constant"],
                    "calibration_size": cal.sizes[0], "validation_size": cal.sizes[1], "test_size": cal.sizes[2],
                    "test_accuracy": cal.natural[0], "test_predicted": cal.natural[1],
                    "test_error": 100 * abs(cal.natural[1] - cal.natural[0]),
                    "test_error_constant": 100 * abs(cal.natural_constant - cal.natural[0]),
                    "mae_shuffled": null.mae if null else None,
                    "test_error_shuffled": 100 * abs(null.natural[1] - null.natural[0]) if null else None})
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
                maes = np.array([mean_abs_error(ca.apply(cb.test_x), cb.test_y) for ca, cb in pairs])
                const = np.array([mean_abs_error(np.full_like(cb.test_y, ca.constant), cb.test_y) for ca, cb in pairs])
                rows.append({"model": model, "revision": rev, "fit_on": a, "applied_to": b, **v.key(),
                             "seeds": len(pairs), "mae": float(maes.mean()), "mae_se": standard_error(maes),
                             "mae_in_domain": float(np.mean([c.mae for c in rb.calibrations])),
                             "mae_constant": float(const.mean())})
    return rows


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def last_revisions(results: Sequence[SetResult]) -> list[SetResult]:
    """The results of each model's last revision (by training step), in model order."""
    from dispersion.core.ids import revision_order

    last: dict[str, str] = {}
    for r in results:
        if r.model not in last or revision_order(r.revision) > revision_order(last[r.model]):
            last[r.model] = r.revision
    return [r for r in results if r.revision == last[r.model]]


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
