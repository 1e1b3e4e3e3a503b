"""Held-out check (paper 001 A.4, Fig. 22): the binned analysis on a validation and a test
split of the same source side by side; datasets pair up when they share a source and differ
in split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dispersion.analyses.bins import last_revisions, scope_pool_panels
from dispersion.analyses.registry import Section, Step, StepContext
from dispersion.core.errors import ConfigError
from dispersion.report.figures import Figure, category_colors, rows_of, spearman
from dispersion.report.markdown import md_table

HELDOUT_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("source", pa.string()), ("split", pa.string()),
    ("dataset", pa.string()), ("layer", pa.string()), ("scope", pa.string()), ("pool", pa.string()),
    ("n_bins", pa.int32()), ("mean_ppl", pa.float64()), ("mean_dispersion", pa.float64()),
    ("pearson_r", pa.float64()), ("spearman_r", pa.float64()), ("spearman_p", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()),  # Spearman's bootstrap interval (correlations)
])


def heldout_pairs(datasets) -> dict[str, dict[str, str]]:
    """``{source: {split: dataset name}}`` for sources configured with several splits
    (``datasets``: dispersion.core.config.DatasetSpec list)."""
    by: dict[str, dict[str, str]] = {}
    for d in datasets:
        if d.embedded is not None:
            source, split = f"embedded:{d.embedded}", d.split
        elif d.synthetic is not None:
            source, split = f"synthetic:{d.synthetic.model_dump_json()}", d.split
        else:
            source, split = f"{d.hf.path}:{d.hf.name or ''}", d.hf.split
        by.setdefault(source, {})[split] = d.name
    return {s: splits for s, splits in by.items() if len(splits) > 1}


def heldout_table(bins: pa.Table, corr: pa.Table, pairs: dict[str, dict[str, str]], *, layer: str,
                  site: str) -> pa.Table:
    rows = []
    corr_by = {(r["model"], r["revision"], r["dataset"], r["scope"], r["pool"]): r
               for r in rows_of(corr, layer=layer, site=site, bins="all")}
    for source, splits in sorted(pairs.items()):
        for split, ds in sorted(splits.items()):
            groups: dict[tuple, list[dict]] = {}
            for r in rows_of(bins, dataset=ds, layer=layer, site=site):
                groups.setdefault((r["model"], r["revision"], r["scope"], r["pool"]), []).append(r)
            for (model, rev, scope, pool), rs in sorted(groups.items()):
                c = corr_by.get((model, rev, ds, scope, pool), {})
                rows.append({"model": model, "revision": rev, "source": source, "split": split, "dataset": ds,
                             "layer": layer, "scope": scope, "pool": pool, "n_bins": len(rs),
                             "mean_ppl": float(np.mean([r["mean_ppl"] for r in rs])),
                             "mean_dispersion": float(np.mean([r["dispersion"] for r in rs])),
                             "pearson_r": c.get("pearson_r"), "spearman_r": c.get("spearman_r"),
                             "spearman_p": c.get("spearman_p"), "ci_low": c.get("ci_low"), "ci_high": c.get("ci_high")})
    return pa.Table.from_pylist(rows, schema=HELDOUT_SCHEMA)


def plot_heldout(bins: pa.Table, pairs: dict[str, dict[str, str]], *, layer: str, site: str) -> bytes:
    """Like Fig. 22: per source and model (last revision), each split's bins with its Spearman
    rho, p and n, scope across and within. PNG (with its SVG)."""
    final = last_revisions(bins)
    panels = [(s, m) for s in sorted(pairs) for m in sorted(final)]
    scopes = scope_pool_panels(bins, layer, site)
    fig = Figure(len(panels), len(scopes))
    palette = category_colors(["validation", "test", "train"])
    for i, (source, model) in enumerate(panels):
        for j, (scope, pool) in enumerate(scopes):
            ax = fig.ax(i, j)
            rhos = []
            for split, ds in sorted(pairs[source].items()):
                pts = sorted((r["mean_ppl"], r["dispersion"]) for r in rows_of(
                    bins, model=model, revision=final[model], dataset=ds, layer=layer, site=site, scope=scope,
                    pool=pool))
                if pts:
                    color = palette.get(split, "grey")
                    ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=color, label=f"{split} ({ds})")
                    rhos.append((None, color, spearman(*zip(*pts))))
            fig.style(ax, f"{source} · {model}@{final[model]}\n{scope} · {pool}", "bin mean perplexity",
                      "avg pairwise cosine distance" if scope == "across" else "within-segment dispersion", logx=True)
            fig.annotate(ax, rhos)
    fig.legend("split (dataset)")
    return fig.render(f"Held-out check: validation vs test splits (layer {layer})")


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    bins, corr, layer, site, _ = ctx.main()
    pairs = heldout_pairs(ctx.config.datasets)
    if not pairs:
        raise ConfigError("analysis.steps: 'heldout' needs two datasets of one source with different splits "
                          "(e.g. embedded prose validation and test)")
    table = heldout_table(bins, corr, pairs, layer=layer, site=site)
    return STEP.section(tables={"heldout": table},
                   figures={"heldout": plot_heldout(bins, pairs, layer=layer, site=site)},
                   markdown=md_table(table, ["model", "revision", "source", "split", "scope", "pool", "mean_ppl",
                                              "mean_dispersion", "spearman_r"]))


STEP = Step(name="heldout", title="Held-out check: validation vs test", paper="001 A.4, Fig. 22",
            tables=("heldout",), run=run)
