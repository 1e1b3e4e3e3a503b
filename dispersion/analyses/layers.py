"""Layer-wise perplexity-dispersion relation (paper 001 Sec. 2.2(2), Fig. 5).

With ``extraction.layers: all`` the main analysis already bins every layer. This module
summarises it per layer, ``layers`` table: for each (model, revision, dataset, layer, scope,
pool), the correlation of bin mean perplexity with dispersion over all bins and the mean
dispersion, so one can see at which depth the (negative, in the paper) correlation emerges,
and compare an untrained (initial) checkpoint with a trained one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dispersion.analyses.registry import Section, Step, StepContext
from dispersion.core.ids import revision_order
from dispersion.report.figures import Figure, revision_colors, rows_of
from dispersion.report.markdown import md_table

LAYER_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("dataset", pa.string()), ("layer", pa.string()),
    ("depth", pa.int32()), ("site", pa.string()), ("scope", pa.string()), ("pool", pa.string()),
    ("n_bins", pa.int32()), ("mean_dispersion", pa.float64()), ("pearson_r", pa.float64()),
    ("spearman_r", pa.float64()), ("spearman_p", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()),  # Spearman's bootstrap interval (correlations)
])


def depth(layer: str, n_layers: int) -> int:
    """Plot position of a layer name: ``0..n`` as is, ``final`` (post-norm) at n + 1."""
    return n_layers + 1 if layer == "final" else int(layer)


def layer_table(bins: pa.Table, corr: pa.Table, *, site: str = "block") -> pa.Table:
    """Per-layer correlation and mean dispersion from the main analysis' tables."""
    numeric = [int(x) for x in set(bins["layer"].to_pylist()) if x != "final"]
    n_layers = max(numeric, default=0)
    corr_by = {(r["model"], r["revision"], r["dataset"], r["layer"], r["scope"], r["pool"]): r
               for r in rows_of(corr, site=site, bins="all")}
    groups: dict[tuple, list[float]] = {}
    for r in rows_of(bins, site=site):
        groups.setdefault((r["model"], r["revision"], r["dataset"], r["layer"], r["scope"], r["pool"]),
                          []).append(r["dispersion"])
    rows = []
    for key, disp in sorted(groups.items()):
        c = corr_by.get(key, {})
        rows.append({"model": key[0], "revision": key[1], "dataset": key[2], "layer": key[3],
                     "depth": depth(key[3], n_layers), "site": site, "scope": key[4], "pool": key[5],
                     "n_bins": len(disp), "mean_dispersion": float(np.mean(disp)),
                     "pearson_r": c.get("pearson_r"), "spearman_r": c.get("spearman_r"),
                     "spearman_p": c.get("spearman_p"), "ci_low": c.get("ci_low"), "ci_high": c.get("ci_high")})
    return pa.Table.from_pylist(rows, schema=LAYER_SCHEMA)


def compared_revisions(revisions: list[str], chosen: list[str] | None = None) -> list[str]:
    """The initial and the trained checkpoint: ``chosen`` when given, else first and last by step."""
    if chosen:
        return [r for r in chosen if r in revisions]
    revs = sorted(set(revisions), key=revision_order)
    return [revs[0], revs[-1]] if len(revs) > 1 else revs


def plot_layers(bins: pa.Table, layers: pa.Table, *, scope: str = "across", pool: str = "last",
                revisions: list[str] | None = None) -> bytes:
    """PNG (with its SVG) like Fig. 5, one row per (model, dataset): dispersion across
    perplexity bins with one line per layer (coloured by depth), for the initial and the
    trained checkpoint (one panel for a model with a single revision), and the Spearman
    correlation per layer of both (filled markers: p < 0.05)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    pool = pool if scope == "across" else "tokens"
    lt = rows_of(layers, scope=scope, pool=pool)
    panels = sorted({(r["model"], r["dataset"]) for r in lt})
    compared = {p: compared_revisions([r["revision"] for r in lt if (r["model"], r["dataset"]) == p], revisions)[:2]
                for p in panels}
    n_line = max((len(v) for v in compared.values()), default=1)
    fig = Figure(len(panels), n_line + 1)
    colors = revision_colors({rev for v in compared.values() for rev in v})
    depth_map = matplotlib.colormaps["plasma"]
    max_depth = max((r["depth"] for r in lt), default=1)
    norm = Normalize(0, max(max_depth, 1))
    line_axes = []
    for i, (model, ds) in enumerate(panels):
        sub = [r for r in lt if r["model"] == model and r["dataset"] == ds]
        revs = compared[(model, ds)]
        order = sorted({(r["depth"], r["layer"]) for r in sub})
        for j in range(n_line):
            ax = fig.ax(i, j)
            if j >= len(revs):
                fig.off(ax)
                continue
            rev = revs[j]
            for d, layer in order:
                pts = sorted((r["mean_ppl"], r["dispersion"]) for r in rows_of(
                    bins, model=model, dataset=ds, revision=rev, layer=layer, scope=scope, pool=pool))
                if pts:
                    ax.plot(*zip(*pts), "-", lw=0.9, color=depth_map(norm(d) * 0.9))
            fig.style(ax, f"{model} · {ds} · {rev}", "bin mean perplexity", f"dispersion ({scope})", logx=True)
            line_axes.append(ax)
        ax = fig.ax(i, n_line)
        for rev in revs:
            by_depth = sorted((r["depth"], r["spearman_r"], r["spearman_p"]) for r in sub
                              if r["revision"] == rev and r["spearman_r"] is not None)
            if by_depth:
                x, y, p = (np.array([pt[k] for pt in by_depth], dtype=np.float64) for k in range(3))
                ax.plot(x, y, "-", lw=1, color=colors[rev], label=rev)
                sig = np.nan_to_num(p, nan=1.0) < 0.05
                ax.plot(x[sig], y[sig], "o", ms=3.5, color=colors[rev], label="_")
                ax.plot(x[~sig], y[~sig], "o", ms=3.5, mfc="white", mec=colors[rev], label="_")
        ax.axhline(0, color="grey", lw=0.6)
        step = max(1, -(-len(order) // 9))
        shown = [o for k, o in enumerate(order) if k % step == 0 or o[1] == "final"]
        if len(shown) > 1 and shown[-1][1] == "final" and shown[-1][0] - shown[-2][0] < step:
            shown.pop(-2)  # keep "final" clear of its neighbour
        ax.set_xticks([d for d, _ in shown], [lay for _, lay in shown])
        ax.set_ylim(-1.05, 1.05)
        n_bins = "/".join(map(str, sorted({r["n_bins"] for r in sub})))
        fig.style(ax, f"{model} · {ds}\nSpearman ρ per layer (n = {n_bins} bins)", "layer (final = after final norm)",
                  "Spearman ρ (perplexity, dispersion)")
    if line_axes:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=matplotlib.colors.ListedColormap(
            depth_map(np.linspace(0, 0.9, 256)))), line_axes, "layer (0 = embeddings)", shrink=0.6)
        named = sorted({(r["depth"], r["layer"]) for r in lt})
        step = max(1, -(-len(named) // 10))
        named = [o for k, o in enumerate(named) if k % step == 0 or o[1] == "final"]
        cb.set_ticks([d for d, _ in named], labels=[lay for _, lay in named])
    marks = [Line2D([], [], ls="none", marker="o", ms=4, color="grey", label="p < 0.05"),
             Line2D([], [], ls="none", marker="o", ms=4, mfc="white", mec="grey", label="p ≥ 0.05")]
    fig.legend("revision (ρ panel)", handles=[*(Line2D([], [], color=c, lw=1.2, marker="o", ms=3.5)
                                                for c in colors.values()), *marks],
               labels=[*colors, "p < 0.05", "p ≥ 0.05"])
    return fig.render(f"Layer-wise perplexity vs dispersion ({scope}, pool {pool})")


# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    bins, corr, _, site, pool = ctx.main()
    table = layer_table(bins, corr, site=site)
    revs = ctx.config.analysis.compare_revisions
    across = table.filter(pc.equal(table["scope"], "across"))
    return STEP.section(tables={"layers": table},
                   figures={"layers": plot_layers(bins, table, scope="across", pool=pool, revisions=revs),
                            "layers_within": plot_layers(bins, table, scope="within", revisions=revs)},
                   markdown=md_table(across.filter(pc.equal(across["pool"], pool)),
                                      ["model", "revision", "dataset", "layer", "mean_dispersion", "spearman_r"], 60))


STEP = Step(name="layers", title="Layer-wise perplexity vs dispersion", paper="001 Sec. 2.2(2), Fig. 5",
            tables=("layers",), run=run)
