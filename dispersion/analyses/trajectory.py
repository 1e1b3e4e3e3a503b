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
from dispersion.core.integrity import recorded
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
        sums = recorded(markers)
        feats = pa.concat_tables([store.read_shard(m["features"], sums.get(m["features"])) for m in markers])
        want = f"layer={layer}/site={site}/pool={pool}/"
        files = [f for m in markers for f in m["vectors"] if want in f]
        vec_tab = pa.concat_tables([store.read_shard(f, sums.get(f)) for f in files]) if files else None
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
    """Spearman rho of each measure against each task's score, per (model, dataset)
    (:func:`dispersion.measure.binning.correlations`: the exact p over a few checkpoints)."""
    from dispersion.measure.binning import correlations

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
                c = correlations(*zip(*pairs))
                out.append({"model": model, "dataset": ds, "measure": name, "task": task,
                            "n_checkpoints": len(pairs), "spearman_r": float(c["spearman_r"]),
                            "spearman_p": float(c["spearman_p"])})
    return pa.Table.from_pylist(out, schema=SPEARMAN_SCHEMA)


def plot_trajectory(rows: list[dict], scores: pa.Table) -> bytes:
    """One row of panels per model along its checkpoints (by step), one quantity per panel:
    cosine dispersion and within-segment dispersion (a line per dataset), the gaps (a line per
    domain; cosine and Euclidean apart) and each task's score. Each geometry line carries its
    Spearman rho, p and n against the first task's score over the checkpoints (the
    ``trajectory_spearman`` table). PNG (with its SVG)."""
    from matplotlib.lines import Line2D

    from dispersion.report.figures import Rho, category_colors

    models = sorted({r["model"] for r in rows})
    datasets = sorted({r["dataset"] for r in rows})
    score_rows = scores.to_pylist()
    tasks = sorted({s["task"] for s in score_rows if s["model"] in models})
    gaps = sorted({k for r in rows for k in r if k.startswith("gap_") and r[k] is not None})
    metrics = sorted({g.rsplit("_", 1)[1] for g in gaps})
    domains = sorted({g[len("gap_"):].rsplit("_", 1)[0] for g in gaps})
    panels = ([("dispersion", "dispersion", "avg pairwise cosine distance"),
               ("within", "within-segment", "within-segment dispersion")]
              + [(f"gap:{m}", f"gap G ({m})", f"gap G ({m} distance)") for m in metrics]
              + [(f"task:{t}", t, f"score: {t}") for t in tasks])
    colors = category_colors([*datasets, *domains])
    rho = {(r["model"], r["dataset"], r["measure"]): Rho(r["spearman_r"], r["spearman_p"], r["n_checkpoints"])
           for r in spearman_over_trajectory(rows, scores).to_pylist() if tasks and r["task"] == tasks[0]}
    fig = Figure(len(models), len(panels), width=3.0, height=2.5)
    for i, model in enumerate(models):
        sub = sorted((r for r in rows if r["model"] == model), key=lambda r: revision_order(r["revision"]))
        revs = list(dict.fromkeys(r["revision"] for r in sub))  # without a step: placed by their order
        at = {rev: next((r["step"] for r in sub if r["revision"] == rev and r["step"] is not None), k)
              for k, rev in enumerate(revs)}
        for j, (key, label, ylabel) in enumerate(panels):
            ax = fig.ax(i, j)
            notes = []
            if key in ("dispersion", "within"):
                for ds in datasets:
                    pts = [(at[r["revision"]], r[key]) for r in sub if r["dataset"] == ds]
                    if pts:
                        ax.plot(*zip(*pts), "o-", ms=3.5, lw=1.2, color=colors[ds], label=f"dataset {ds}")
                        notes.append((None, colors[ds], rho.get((model, ds, key))))
            elif key.startswith("gap:"):
                metric = key[4:]
                first = [r for r in sub if r["dataset"] == datasets[0]]  # a gap is per model@revision
                for dom in domains:
                    col = f"gap_{dom}_{metric}"
                    pts = [(at[r["revision"]], r[col]) for r in first if r.get(col) is not None]
                    if pts:
                        ax.plot(*zip(*pts), "s-", ms=3.5, lw=1.2, color=colors[dom], label=f"gap domain {dom}")
                        notes.append((None, colors[dom], rho.get((model, datasets[0], col))))
            else:
                task = key[5:]
                sc = {s["revision"]: s["score"] for s in score_rows if s["model"] == model and s["task"] == task}
                pts = [(at[r["revision"]], sc[r["revision"]]) for r in sub
                       if r["dataset"] == datasets[0] and r["revision"] in sc]
                if pts:
                    ax.plot(*zip(*pts), "D-", ms=3.5, lw=1.2, color="black")
            fig.style(ax, f"{model} · {label}", "training step", ylabel)
            fig.annotate(ax, notes)
    handles = [Line2D([], [], color=colors[d], marker="o", ms=3.5, lw=1.2) for d in datasets]
    handles += [Line2D([], [], color=colors[d], marker="s", ms=3.5, lw=1.2) for d in domains]
    labels = [f"dataset {d}" for d in datasets] + [f"gap domain {d}" for d in domains]
    if tasks:
        handles.append(Line2D([], [], color="black", marker="D", ms=3.5, lw=1.2))
        labels.append("score (last column)")
    title = f"ρ, p, n: Spearman against {tasks[0]} over the checkpoints" if tasks else None
    fig.legend(title, handles=handles, labels=labels)
    return fig.render("Checkpoint trajectories: geometry vs score")


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
