"""Perplexity vs dispersion across models and domains (paper 001 Sec. 2.2(1), A.1.2-A.1.3):
one panel per dataset (columns) and (scope, pool) (rows), one line per model at its last
(most trained) revision."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dispersion.analyses.bins import last_revisions, scope_pool_panels
from dispersion.analyses.registry import Section, Step, StepContext
from dispersion.report.figures import Figure, category_colors, rows_of, spearman
from dispersion.report.markdown import md_table


def plot_domains(bins: pa.Table, *, layer: str, site: str) -> bytes:
    """Grid: datasets (columns) x (scope, pool) (rows), one line per model at its last
    revision with its Spearman rho, p and n. PNG (with its SVG)."""
    datasets = sorted(set(bins["dataset"].to_pylist()))
    panels = scope_pool_panels(bins, layer, site)
    final = last_revisions(bins)
    colors = category_colors(sorted(final))
    fig = Figure(len(panels), len(datasets))
    for i, (scope, pool) in enumerate(panels):
        for j, ds in enumerate(datasets):
            ax = fig.ax(i, j)
            rhos = []
            for model, rev in sorted(final.items()):
                pts = sorted((r["mean_ppl"], r["dispersion"]) for r in rows_of(
                    bins, model=model, revision=rev, dataset=ds, layer=layer, site=site, scope=scope, pool=pool))
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=colors[model], label=f"{model}@{rev}")
                    rhos.append((None, colors[model], spearman(*zip(*pts))))
            fig.style(ax, f"{ds} · {scope} · {pool}", "bin mean perplexity",
                      "avg pairwise cosine distance" if scope == "across" else "within-segment dispersion",
                      logx=True)
            fig.annotate(ax, rhos)
    fig.legend("model@revision")
    return fig.render(f"Perplexity vs dispersion across models and domains (layer {layer}, site {site})")


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    bins, corr, layer, site, _ = ctx.main()
    view = corr.filter(pc.and_(pc.equal(corr["layer"], layer), pc.equal(corr["bins"], "all")))
    return STEP.section(tables={"domains": view},
                   figures={"domains": plot_domains(bins, layer=layer, site=site)},
                   markdown=md_table(view, ["model", "revision", "dataset", "scope", "pool", "n_bins",
                                             "pearson_r", "spearman_r"]))


STEP = Step(name="domains", title="Perplexity vs dispersion across models and domains",
            paper="001 Sec. 2.2(1), A.1.2-A.1.3", tables=("domains",), run=run)
