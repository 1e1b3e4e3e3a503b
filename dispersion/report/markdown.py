"""Human-facing output of a scan: plots of mean perplexity vs dispersion per model and
checkpoint, a markdown summary, and console tables."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dispersion.core.ids import revision_order
from dispersion.core.layout import report_path
from dispersion.core.storage import Store


def md_table(table: pa.Table, columns: list[str], limit: int = 40) -> str:
    """A markdown table of ``columns`` (first ``limit`` rows), floats signed to 3 decimals."""
    rows = table.select(columns).to_pylist()[:limit]
    if not rows:
        return "_(no rows)_\n"

    def fmt(v):
        if isinstance(v, float):
            return f"{v:+.3f}" if abs(v) < 1e4 else f"{v:.3g}"
        return "" if v is None else str(v)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    more = table.num_rows - limit
    return "\n".join(out) + (f"\n\n_… {more} more rows in the table_" if more > 0 else "") + "\n"


def _filter(table: pa.Table, **eq) -> pa.Table:
    mask = None
    for k, v in eq.items():
        m = pc.equal(table[k], v)
        mask = m if mask is None else pc.and_(mask, m)
    return table.filter(mask) if mask is not None else table


def _unique(table: pa.Table, col: str) -> list:
    return sorted(set(table[col].to_pylist()))


def _model_rank(order: Sequence[str]) -> Callable[[str], tuple[int, str]]:
    """Sort key for model names: those in ``order`` first, in that order, then the rest by name."""
    pos = {m: i for i, m in enumerate(order)}
    return lambda m: (pos.get(m, len(pos)), m)


def main_view(table: pa.Table, layer: str, site: str, pool: str, scope: str) -> pa.Table:
    return _filter(table, layer=layer, site=site, pool=pool if scope == "across" else "tokens", scope=scope)


def plot_bins(bins: pa.Table, *, layer: str, site: str, pool: str, model_order: Sequence[str] = ()) -> bytes:
    """PNG: one panel per (scope, model) x dataset; one line per revision (ordered by step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scopes = [s for s in ("across", "within") if len(main_view(bins, layer, site, pool, s))]
    models = sorted(_unique(bins, "model"), key=_model_rank(model_order))
    datasets = _unique(bins, "dataset")
    rows = [(s, m) for m in models for s in scopes]  # the first model (the config's first) leads
    fig, axes = plt.subplots(max(len(rows), 1), max(len(datasets), 1), squeeze=False,
                             figsize=(4.2 * max(len(datasets), 1), 3.2 * max(len(rows), 1)))
    for r, (scope, model) in enumerate(rows):
        view = _filter(main_view(bins, layer, site, pool, scope), model=model)
        revisions = sorted(_unique(view, "revision"), key=revision_order)
        cmap = matplotlib.colormaps["viridis"]
        for c, ds in enumerate(datasets):
            ax = axes[r][c]
            for i, rev in enumerate(revisions):
                t = _filter(view, dataset=ds, revision=rev)
                if not len(t):
                    continue
                x = t["mean_ppl"].to_numpy()
                y = t["dispersion"].to_numpy()
                ax.plot(x, y, "o-", ms=3, lw=1, color=cmap(i / max(len(revisions) - 1, 1)), label=rev)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{model} · {ds} · {scope}", fontsize=9)
            ax.set_xlabel("bin mean perplexity", fontsize=8)
            ax.set_ylabel("avg pairwise cosine distance" if scope == "across" else "within-segment dispersion",
                          fontsize=8)
            ax.tick_params(labelsize=7)
            if revisions:
                ax.legend(fontsize=6, title="revision", title_fontsize=6)
    fig.suptitle(f"Perplexity vs dispersion (layer {layer}, site {site}, pool {pool})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: float | None) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def markdown_summary(bins: pa.Table, corr: pa.Table, *, layer: str, site: str, pool: str, title: str,
                     model_order: Sequence[str] = ()) -> str:
    rank = _model_rank(model_order)
    lines = [f"# {title}", "",
             f"Correlation of bin mean perplexity with dispersion (layer `{layer}`, site `{site}`, "
             f"pool `{pool}`; `across` = Eq. 1 over pooled vectors per bin, `within` = mean within-segment "
             "token dispersion per bin).", "",
             "| model | revision | dataset | scope | bins | n | Pearson r | Spearman ρ |",
             "|---|---|---|---|---|---|---|---|"]
    for scope in ("across", "within"):
        view = main_view(corr, layer, site, pool, scope)
        rows = sorted(view.to_pylist(),
                      key=lambda r: (rank(r["model"]), revision_order(r["revision"]), r["dataset"], r["bins"]))
        for r in rows:
            lines.append(f"| {r['model']} | {r['revision']} | {r['dataset']} | {scope} | {r['bins']} | "
                         f"{r['n_bins']} | {_fmt(r['pearson_r'])} | {_fmt(r['spearman_r'])} |")
    layers = _filter(corr, site=site, scope="across", pool=pool, bins="all")
    if len(_unique(layers, "layer")) > 1:
        lines += ["", "## Spearman ρ by layer (across, all bins)", ""]
        lay = sorted(_unique(layers, "layer"), key=lambda s: (s == "final", int(s) if s.isdigit() else 0))
        lines += ["| model | revision | dataset | " + " | ".join(lay) + " |", "|---" * (3 + len(lay)) + "|"]
        for key in sorted({(r["model"], r["revision"], r["dataset"]) for r in layers.to_pylist()},
                          key=lambda k: (rank(k[0]), revision_order(k[1]), k[2])):
            t = _filter(layers, model=key[0], revision=key[1], dataset=key[2])
            by = {r["layer"]: r["spearman_r"] for r in t.to_pylist()}
            lines.append(f"| {' | '.join(key)} | " + " | ".join(_fmt(by.get(x)) for x in lay) + " |")
    lines += ["", "## Bins", "", "| model | revision | dataset | scope | bin | n | mean ppl | dispersion | Alg. 1 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for scope in ("across", "within"):
        for r in sorted(main_view(bins, layer, site, pool, scope).to_pylist(),
                        key=lambda r: (rank(r["model"]), revision_order(r["revision"]), r["dataset"], r["bin"])):
            lines.append(f"| {r['model']} | {r['revision']} | {r['dataset']} | {scope} | {r['bin']} | {r['n']} | "
                         f"{r['mean_ppl']:.2f} | {r['dispersion']:.4f} | {'✓' if r['selected'] else ''} |")
    return "\n".join(lines) + "\n"


def print_tables(bins: pa.Table, corr: pa.Table, *, layer: str, site: str, pool: str, console=None,
                 model_order: Sequence[str] = ()) -> None:
    """Per model and dataset: selected bins (mean ppl → dispersion) per revision, then correlations."""
    rank = _model_rank(model_order)
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for scope in ("across", "within"):
        view = main_view(bins, layer, site, pool, scope)
        for model in sorted(_unique(view, "model"), key=rank):
            for ds in _unique(view, "dataset"):
                t = _filter(view, model=model, dataset=ds)
                revisions = sorted(_unique(t, "revision"), key=revision_order)
                sel = _filter(t, selected=True) if pc.any(t["selected"]).as_py() else t
                table = Table(title=f"{model} · {ds} · {scope}: bin mean perplexity → dispersion", title_justify="left")
                table.add_column("#", justify="right")
                per_rev = {rev: sorted(_filter(sel, revision=rev).to_pylist(), key=lambda r: r["bin"])
                           for rev in revisions}
                for rev in revisions:
                    table.add_column(rev, justify="right")
                for k in range(max((len(v) for v in per_rev.values()), default=0)):
                    table.add_row(str(k + 1), *[f"{v[k]['mean_ppl']:.1f} → {v[k]['dispersion']:.4f}"
                                                if k < len(v) else "" for v in per_rev.values()])
                console.print(table)
    table = Table(title="Correlation of bin mean perplexity with dispersion (all bins)", title_justify="left")
    for col in ("model", "revision", "dataset", "scope", "n bins", "Pearson r", "Spearman ρ"):
        table.add_column(col, justify="left" if col in ("model", "revision", "dataset", "scope") else "right")
    for scope in ("across", "within"):
        rows = _filter(main_view(corr, layer, site, pool, scope), bins="all").to_pylist()
        for r in sorted(rows, key=lambda r: (rank(r["model"]), revision_order(r["revision"]), r["dataset"])):
            table.add_row(r["model"], r["revision"], r["dataset"], scope, str(r["n_bins"]),
                          _fmt(r["pearson_r"]), _fmt(r["spearman_r"]))
    console.print(table)


def sections_markdown(name: str, sections) -> str:
    """The analyses' sections (dispersion.analyses.registry.Section), each with its figures linked
    relative to ``results/report/{name}.md``."""
    out = []
    for s in sections:
        out += ["", f"## {s.title}", "", f"_Paper {s.paper}; step `{s.name}`; tables: "
                f"{', '.join(f'`{t}`' for t in s.tables) or '(figure only)'}_", ""]
        out += [f"![{fig}]({name}/{fig}.png)" for fig in s.figures]
        out += ["", s.markdown]
    return "\n".join(out)


def publish_report(store: Store, name: str, bins: pa.Table, corr: pa.Table, *, layer: str, site: str,
                   pool: str, sections=(), model_order: Sequence[str] = ()) -> dict[str, str]:
    """Write the PNG and markdown under ``results/report/`` (the analyses' sections after the
    main summary, their figures beside it); returns their URLs."""
    png = report_path(name, "png")
    md = report_path(name)
    store.write_bytes(png, plot_bins(bins, layer=layer, site=site, pool=pool, model_order=model_order))
    summary = markdown_summary(bins, corr, layer=layer, site=site, pool=pool, title=f"dispersion scan `{name}`",
                               model_order=model_order)
    head, _, tail = summary.partition("\n## Bins")
    title, _, rest = head.partition("\n")
    body = (f"{title}\n\n![bins]({name}.png)\n{rest}" + sections_markdown(name, sections)
            + ("\n## Bins" + tail if tail else ""))
    store.write_text(md, body)
    return {"plot": store.url(png), "summary": store.url(md)}
