"""Vendi score (paper 001 A.5, cosine kernel) against the cosine dispersion per bin; the table
gives their rank agreement and each one's correlation with perplexity."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dispersion.analyses.bins import last_revisions
from dispersion.analyses.registry import Section, Step, StepContext
from dispersion.measure.binning import correlations
from dispersion.report.figures import Figure, rows_of, spearman
from dispersion.report.markdown import md_table

VENDI_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("dataset", pa.string()), ("layer", pa.string()),
    ("pool", pa.string()), ("n_bins", pa.int32()), ("spearman_vendi_vs_dispersion", pa.float64()),
    ("spearman_ppl_vs_dispersion", pa.float64()), ("spearman_ppl_vs_vendi", pa.float64()),
    ("mean_vendi", pa.float64()), ("mean_dispersion", pa.float64()),
])


def vendi_table(bins: pa.Table) -> pa.Table:
    """Per (model, revision, dataset, layer, pool) of the across scope with a Vendi column."""
    groups: dict[tuple, list[dict]] = {}
    for r in bins.to_pylist():
        if r["scope"] == "across" and r.get("vendi") is not None and np.isfinite(r["vendi"]):
            groups.setdefault((r["model"], r["revision"], r["dataset"], r["layer"], r["pool"]), []).append(r)
    rows = []
    for (model, rev, ds, layer, pool), rs in sorted(groups.items()):
        ppl = [r["mean_ppl"] for r in rs]
        disp = [r["dispersion"] for r in rs]
        vendi = [r["vendi"] for r in rs]

        def rho(a, b):
            try:
                return correlations(a, b)["spearman_r"]
            except ValueError:
                return None
        rows.append({"model": model, "revision": rev, "dataset": ds, "layer": layer, "pool": pool,
                     "n_bins": len(rs), "spearman_vendi_vs_dispersion": rho(vendi, disp),
                     "spearman_ppl_vs_dispersion": rho(ppl, disp), "spearman_ppl_vs_vendi": rho(ppl, vendi),
                     "mean_vendi": float(np.mean(vendi)), "mean_dispersion": float(np.mean(disp))})
    return pa.Table.from_pylist(rows, schema=VENDI_SCHEMA)


def plot_vendi(bins: pa.Table, *, layer: str, site: str, pool: str) -> bytes:
    """Per (model, dataset) at the last revision: cosine dispersion (left axis) and Vendi score
    (right axis) against bin mean perplexity, each with its Spearman rho, p and n. PNG (with
    its SVG)."""
    final = last_revisions(bins)
    datasets = sorted(set(bins["dataset"].to_pylist()))
    fig = Figure(len(final), len(datasets), width=3.8)
    disp_color, vendi_color = "#1f77b4", "#d62728"
    for i, (model, rev) in enumerate(sorted(final.items())):
        for j, ds in enumerate(datasets):
            ax = fig.ax(i, j)
            rs = sorted(rows_of(bins, model=model, revision=rev, dataset=ds, layer=layer, site=site,
                                scope="across", pool=pool), key=lambda r: r["mean_ppl"])
            rs = [r for r in rs if r["vendi"] is not None]
            fig.style(ax, f"{model}@{rev} · {ds}", "bin mean perplexity", "avg pairwise cosine distance", logx=True)
            if not rs:
                continue
            x = [r["mean_ppl"] for r in rs]
            disp, vendi = [r["dispersion"] for r in rs], [r["vendi"] for r in rs]
            ax.plot(x, disp, "o-", ms=3, lw=1, color=disp_color, label="cosine dispersion (left axis)")
            ax.yaxis.label.set_color(disp_color)
            ax2 = fig.twin(ax)
            ax2.plot(x, vendi, "s--", ms=3, lw=1, color=vendi_color, label="Vendi score (right axis)")
            ax2.set_ylabel("Vendi score", color=vendi_color)
            fig.annotate(ax, [("dispersion", disp_color, spearman(x, disp)),
                              ("Vendi", vendi_color, spearman(x, vendi))])
    fig.legend()
    return fig.render(f"Vendi score vs cosine dispersion per bin (layer {layer}, pool {pool})")


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    bins, _, layer, site, pool = ctx.main()
    table = vendi_table(bins)
    return STEP.section(tables={"vendi": table},
                   figures={"vendi": plot_vendi(bins, layer=layer, site=site, pool=pool)},
                   markdown=md_table(table.filter(pc.equal(table["layer"], layer)),
                                      ["model", "revision", "dataset", "pool", "spearman_vendi_vs_dispersion",
                                       "spearman_ppl_vs_dispersion", "spearman_ppl_vs_vendi"]))


STEP = Step(name="vendi", title="Vendi score vs cosine dispersion", paper="001 A.5",
            tables=("vendi",), run=run)
