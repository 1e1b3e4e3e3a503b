"""Checkpoint trajectories joined with scores (paper 001 B.2.2).

Per checkpoint of a model: corpus perplexity, dispersion of the pooled vectors (Eq. 1 over
all segments), mean within-segment dispersion (:func:`trajectory`), and, when
the ``gap`` step ran, the dispersion gap of each token set; joined with a scores table
(model, revision, task, score). Over the trajectory, the Spearman correlation of each
measure with each task's score tells whether geometry tracks quality along training.

Zoo models bring their own score: the validation loss logged at each checkpoint
(task ``val_loss``; lower is better, so a useful measure has a negative rho with it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dispersion.analyses.registry import Section, Step, StepContext
from dispersion.analyses.scores import scores_table
from dispersion.core.ids import revision_order, step_of
from dispersion.core.storage import Store
from dispersion.measure.metrics import cosine_dispersion
from dispersion.report.figures import Figure
from dispersion.report.markdown import md_table

TRAJECTORY_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("step", pa.int64()), ("dataset", pa.string()),
    ("layer", pa.string()), ("site", pa.string()), ("pool", pa.string()), ("segments", pa.int64()),
    ("corpus_ppl", pa.float64()), ("mean_ppl", pa.float64()), ("dispersion", pa.float64()),
    ("within", pa.float64()),
])
SPEARMAN_SCHEMA = pa.schema([
    ("model", pa.string()), ("dataset", pa.string()), ("measure", pa.string()), ("task", pa.string()),
    ("n_checkpoints", pa.int32()), ("spearman_r", pa.float64()), ("spearman_p", pa.float64()),
])

def trajectory(store: Store, units, *, layer: str, site: str, pool: str) -> pa.Table:
    """One row per (model, revision, dataset) of the done units (dispersion.measure.scan.WorkUnit)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for u in units:
        groups.setdefault((u.mr.model, u.mr.revision, u.segments.dataset), []).append(store.read_json(u.marker_rel))
    rows = []
    for (model, revision, dataset), markers in groups.items():
        feats = pa.concat_tables([store.read_table(m["features"]) for m in markers])
        want = f"layer={layer}/site={site}/pool={pool}/"
        files = [f for m in markers for f in m["vectors"] if want in f]
        vec_tab = pa.concat_tables([store.read_table(f) for f in files]) if files else None
        disp = within = float("nan")
        if vec_tab is not None:
            col = vec_tab.column("vec").combine_chunks()
            vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
            disp = cosine_dispersion(vecs)
            within = float(np.nanmean(vec_tab.column("within").to_numpy(zero_copy_only=False)))
        nll = feats.column("nll_sum").to_numpy()
        n = feats.column("n_scored").to_numpy()
        rows.append({"model": model, "revision": revision, "step": step_of(revision), "dataset": dataset,
                     "layer": layer, "site": site, "pool": pool, "segments": feats.num_rows,
                     "corpus_ppl": float(np.exp(nll.sum() / n.sum())),
                     "mean_ppl": float(feats.column("ppl").to_numpy().mean()), "dispersion": disp,
                     "within": within})
    rows.sort(key=lambda r: (r["model"], r["dataset"], r["step"] if r["step"] is not None else -1, r["revision"]))
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


def measures(trajectory: pa.Table, gap: pa.Table | None = None) -> list[dict]:
    """One row per (model, revision, dataset) with every measure as a column: ``corpus_ppl``,
    ``dispersion``, ``within`` and, from the gap table, ``gap_{domain}_{metric}``."""
    rows = [dict(r) for r in trajectory.to_pylist()]
    if gap is not None and gap.num_rows:
        by: dict[tuple[str, str], dict] = {}
        for g in gap.to_pylist():
            by.setdefault((g["model"], g["revision"]), {})[f"gap_{g['domain']}_{g['metric']}"] = g["gap"]
        for r in rows:
            r.update(by.get((r["model"], r["revision"]), {}))
    return rows


def spearman_over_trajectory(rows: list[dict], scores: pa.Table) -> pa.Table:
    """Spearman rho (scipy) of each measure against each task's score, per (model, dataset)."""
    from scipy import stats

    score = {(s["model"], s["revision"], s["task"]): s["score"] for s in scores.to_pylist()}
    tasks = sorted({s["task"] for s in scores.to_pylist()})
    names = sorted({k for r in rows for k in r if k in ("corpus_ppl", "dispersion", "within") or k.startswith("gap_")})
    out = []
    for model, ds in sorted({(r["model"], r["dataset"]) for r in rows}):
        sub = [r for r in rows if r["model"] == model and r["dataset"] == ds]
        for task in tasks:
            for name in names:
                pairs = [(r[name], score[(model, r["revision"], task)]) for r in sub
                         if (model, r["revision"], task) in score and r.get(name) is not None
                         and np.isfinite(r[name])]
                if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
                    continue
                res = stats.spearmanr(*zip(*pairs))
                out.append({"model": model, "dataset": ds, "measure": name, "task": task,
                            "n_checkpoints": len(pairs), "spearman_r": float(res[0]), "spearman_p": float(res[1])})
    return pa.Table.from_pylist(out, schema=SPEARMAN_SCHEMA)


def plot_trajectory(rows: list[dict], scores: pa.Table) -> bytes:
    """Per model: dispersion, within-segment dispersion and gaps along the checkpoints (by step),
    with each task's score on a twin axis."""
    models = sorted({r["model"] for r in rows})
    datasets = sorted({r["dataset"] for r in rows})
    fig = Figure(len(models), len(datasets))
    score_rows = scores.to_pylist()
    for i, model in enumerate(models):
        for j, ds in enumerate(datasets):
            ax = fig.ax(i, j)
            sub = sorted((r for r in rows if r["model"] == model and r["dataset"] == ds),
                         key=lambda r: revision_order(r["revision"]))
            x = [r["step"] if r["step"] is not None else k for k, r in enumerate(sub)]
            names = ["dispersion", "within"] + sorted({k for r in sub for k in r if k.startswith("gap_")})
            for name in names:
                ax.plot(x, [r.get(name, np.nan) for r in sub], "o-", ms=3, lw=1, label=name)
            ax2 = ax.twinx()
            for task in sorted({s["task"] for s in score_rows if s["model"] == model}):
                sc = {s["revision"]: s["score"] for s in score_rows if s["model"] == model and s["task"] == task}
                ax2.plot(x, [sc.get(r["revision"], np.nan) for r in sub], "k--", lw=1, label=task)
                ax2.set_ylabel(task, fontsize=8)
            ax2.tick_params(labelsize=7)
            fig.style(ax, f"{model} · {ds}", "training step", "dispersion / gap")
    return fig.png("Checkpoint trajectories: geometry vs score")


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    _, _, layer, site, pool = ctx.main()
    traj = trajectory(ctx.store, ctx.units, layer=layer, site=site, pool=pool)
    scores = scores_table(ctx.config)
    rows = measures(traj, ctx.tables.get("gap"))
    rho = spearman_over_trajectory(rows, scores)
    return STEP.section(tables={"trajectory": traj, "trajectory_spearman": rho},
                   figures={"trajectory": plot_trajectory(rows, scores)},
                   markdown=md_table(rho, ["model", "dataset", "measure", "task", "n_checkpoints", "spearman_r",
                                            "spearman_p"], 60))


STEP = Step(name="trajectory", title="Checkpoint trajectories", paper="001 B.2.2",
            tables=("trajectory", "trajectory_spearman"), run=run, uses=("gap",),)
