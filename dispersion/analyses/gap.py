"""The ``gap`` analysis step: the dispersion gap for model selection (paper 001 §3.2, B.2.1,
B.2.2). What is measured (token sets, the statistics, reading the output embedding matrix) is
:mod:`dispersion.measure.gap`; this module ranks models by the gap, correlates it with task
scores and draws it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from dispersion.analyses.registry import Planned, Section, Step, StepContext
from dispersion.analyses.scores import read_scores, scores_table
from dispersion.core.errors import DataError
from dispersion.measure.gap import GAP_SCHEMA, GapSpec, Metric, measure_table
from dispersion.measure.units import TableUnit, source_of
from dispersion.report.figures import Figure, category_colors, write_figure
from dispersion.report.markdown import md_table

__all__ = [
    "SpearmanResult",
    "figure_gap",
    "plot_gap",
    "rank_models",
    "read_scores",
    "spearman_vs_scores",
]

# --------------------------------------------------------------------------- model selection
def _select(table: pa.Table, domain: str, metric: str) -> list[dict]:
    rows = [r for r in table.to_pylist() if r["domain"] == domain and r["metric"] == metric]
    if not rows:
        have = sorted({(r["domain"], r["metric"]) for r in table.to_pylist()})
        raise DataError(f"gap table has no rows for domain {domain!r} and metric {metric!r} (has: {have})")
    return rows


RANK_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("model", pa.string()), ("revision", pa.string()), ("step", pa.int64()),
    ("gap", pa.float64()), ("within", pa.float64()), ("between", pa.float64()),
    ("reference_within", pa.float64()),
])


def rank_models(table: pa.Table, domain: str, metric: Metric = "cosine") -> pa.Table:
    """Models (model, revision) ranked by gap G, largest first (rank 1), ties by model, revision.

    §3.2: within a family and tokenizer, a larger G flags the better candidate.
    """
    rows = _select(table, domain, metric)
    rows.sort(key=lambda r: (-r["gap"], r["model"], r["revision"]))
    out = [{"rank": i + 1, **{k: r[k] for k in RANK_SCHEMA.names if k != "rank"}} for i, r in enumerate(rows)]
    return pa.Table.from_pylist(out, schema=RANK_SCHEMA)


@dataclass(frozen=True)
class SpearmanResult:
    """Spearman rank correlation of gap vs score over the joined (model, revision) rows."""

    rho: float
    p_value: float
    n: int
    rows: pa.Table = field(repr=False)


def spearman_vs_scores(gap_table: pa.Table, scores: str | os.PathLike | pa.Table, *, task: str | None = None,
                       domain: str, metric: Metric = "cosine") -> SpearmanResult:
    """Spearman ρ (:func:`dispersion.measure.binning.correlations`: scipy, the exact p over a
    few models) between G and a task score (§3.2, B.2.2).

    ``scores`` (see :func:`read_scores`) is filtered to ``task`` (``None``: it must hold
    exactly one task) and joined with the gap rows of ``domain`` / ``metric`` on
    (model, revision); rows with a null or NaN score are left out. ``rows`` holds the
    joined rows (model, revision, step, gap, score), in gap-table order.
    """
    from dispersion.measure.binning import correlations

    sc = read_scores(scores)
    tasks = sorted(set(sc.column("task").to_pylist()) - {None})
    if task is None:
        if len(tasks) != 1:
            raise DataError(f"scores: give task= (tasks present: {', '.join(tasks) or 'none'})")
        task = tasks[0]
    elif task not in tasks:
        raise DataError(f"scores: no rows for task {task!r} (tasks present: {', '.join(tasks) or 'none'})")
    score_of: dict[tuple[str, str], float] = {}
    for r in sc.to_pylist():
        if r["task"] != task or r["score"] is None or math.isnan(r["score"]):
            continue
        key = (r["model"], r["revision"])
        if key in score_of:
            raise DataError(f"scores: task {task!r} has two scores for model {key[0]!r} revision {key[1]!r}")
        score_of[key] = r["score"]
    joined, seen = [], set()
    for r in _select(gap_table, domain, metric):
        key = (r["model"], r["revision"])
        if key in seen:
            raise DataError(f"gap table has two rows for model {key[0]!r} revision {key[1]!r} "
                            f"(domain {domain!r}, metric {metric!r})")
        seen.add(key)
        if key in score_of:
            joined.append({"model": key[0], "revision": key[1], "step": r["step"], "gap": r["gap"],
                           "score": score_of[key]})
    if len(joined) < 3:
        raise DataError(f"spearman: need at least 3 (model, revision) pairs in both the gap table and the "
                        f"scores of task {task!r}, got {len(joined)}")
    gaps, vals = [j["gap"] for j in joined], [j["score"] for j in joined]
    try:
        c = correlations(gaps, vals)
        rho_p = (float(c["spearman_r"]), float(c["spearman_p"]))
    except ValueError:  # a constant side: undefined
        rho_p = (float("nan"), float("nan"))
    rows = pa.Table.from_pylist(joined, schema=pa.schema([
        ("model", pa.string()), ("revision", pa.string()), ("step", pa.int64()),
        ("gap", pa.float64()), ("score", pa.float64())]))
    return SpearmanResult(*rho_p, len(joined), rows)


# --------------------------------------------------------------------------- plot
_BARS = (("within", "within(T)"), ("reference_within", "within(T̄)"), ("between", "between(T, T̄)"),
         ("gap", "gap G"))


def figure_gap(table: pa.Table, *, domains: Sequence[str] | None = None) -> bytes:
    """Bar chart per model (model@revision): within(T), within(T̄), between and G (cf. Fig. 9),
    one panel per metric (columns) and domain set (rows), with the SE as error bars. PNG
    bytes with the same figure as SVG (:class:`dispersion.report.figures.FigureBytes`)."""
    data = table.to_pylist()
    if not data:
        raise DataError("plot_gap: the gap table is empty")
    doms = list(domains) if domains else list(dict.fromkeys(r["domain"] for r in data))
    metrics = list(dict.fromkeys(r["metric"] for r in data))
    n_bars = len(dict.fromkeys((r["model"], r["revision"]) for r in data))
    fig = Figure(len(doms), len(metrics), width=max(3.4, 0.5 * n_bars + 1.2), height=2.6 if n_bars <= 3 else 3.0)
    colors = category_colors([legend for _, legend in _BARS])
    for i, dom in enumerate(doms):
        for j, metric in enumerate(metrics):
            ax = fig.ax(i, j)
            rows = [r for r in data if r["domain"] == dom and r["metric"] == metric]
            labels = [r["model"] if r["revision"] == "main" else f"{r['model']}@{r['revision']}" for r in rows]
            x = np.arange(len(rows))
            w = 0.8 / len(_BARS)
            for k, (col, legend) in enumerate(_BARS):
                err = [r.get(f"{col}_se") for r in rows] if col != "gap" else None
                ax.bar(x + (k - 1.5) * w, [r[col] for r in rows], w, label=legend, color=colors[legend],
                       yerr=None if err is None or any(e is None for e in err) else err, capsize=1.5,
                       error_kw={"elinewidth": 0.6, "ecolor": "#333333"})
            ref = rows[0]["reference"] if rows else ""
            if len(rows) > 3:
                ax.set_xticks(x, labels, rotation=35, ha="right", rotation_mode="anchor")
            else:
                ax.set_xticks(x, labels)
            fig.style(ax, f"{dom} vs {ref} ({metric})", "", f"mean {metric} distance")
    fig.legend("T = domain words, T̄ = reference words; error bars: SE")
    return fig.render("Dispersion gap G of domain word sets against a reference set (cf. paper 001 Fig. 9)")


def plot_gap(table: pa.Table, path: str | os.PathLike, *, domains: Sequence[str] | None = None) -> Path:
    """:func:`figure_gap` written to ``path`` (PNG; SVG when it ends in ``.svg``)."""
    write_figure(figure_gap(table, domains=domains), path)
    return Path(path)


# -- the step ------------------------------------------------------

def plan_step(ctx: StepContext) -> Planned:
    """One :class:`TableUnit` per configured model@revision: its gap rows
    (:func:`dispersion.measure.gap.measure_table`; no model is loaded, one tensor is read)."""
    from dispersion.core.ids import digest
    from dispersion.measure.sources import model_revisions

    spec = ctx.options("gap")
    key = digest(spec.model_dump(mode="json"))
    return Planned(units=[TableUnit("gap", mr, (mr.model, mr.revision, spec, mr.field), key, measure_table,
                                    load_with=source_of) for mr in model_revisions(ctx.config)])


def run(ctx: StepContext) -> Section:
    """From the published rows of :func:`plan_step`: the gap table, the ranking per domain and
    metric, Spearman against task scores, the figure."""
    spec = ctx.options("gap")
    table = pa.concat_tables([u.read(ctx.store) for u in ctx.planned["gap"].units]).cast(GAP_SCHEMA)
    domains = sorted(set(table["domain"].to_pylist()))
    ranks = pa.concat_tables([_ranked(rank_models(table, d, m), d, m) for d in domains for m in spec.metrics])
    scores = scores_table(ctx.config)
    rho_rows = []
    for task in sorted(set(scores["task"].to_pylist())):
        for d in domains:
            for m in spec.metrics:
                try:
                    r = spearman_vs_scores(table, scores, task=task, domain=d, metric=m)
                except DataError:  # fewer than 3 (model, revision) rows with this score
                    continue
                rho_rows.append({"task": task, "domain": d, "metric": m, "n": r.n, "spearman_r": r.rho,
                                 "spearman_p": r.p_value})
    rho = pa.Table.from_pylist(rho_rows, schema=pa.schema([
        ("task", pa.string()), ("domain", pa.string()), ("metric", pa.string()), ("n", pa.int64()),
        ("spearman_r", pa.float64()), ("spearman_p", pa.float64())]))
    png = figure_gap(table)
    return STEP.section(tables={"gap": table, "gap_rank": ranks, "gap_spearman": rho}, figures={"gap": png},
                   markdown=md_table(table, ["model", "revision", "domain", "metric", "within", "reference_within",
                                              "between", "gap"], 60) + "\n" +
                   md_table(rho, ["task", "domain", "metric", "n", "spearman_r", "spearman_p"]))


def _ranked(table: pa.Table, domain: str, metric: str) -> pa.Table:
    return table.append_column("domain", pa.array([domain] * table.num_rows, pa.string())) \
                .append_column("metric", pa.array([metric] * table.num_rows, pa.string()))


STEP = Step(name="gap", title="Dispersion gap for model selection", paper="001 Sec. 3.2, B.2.1, Tables 9-12",
            tables=("gap", "gap_rank", "gap_spearman"), run=run, options=GapSpec, default=GapSpec, plan=plan_step,
            unit_name="models")
