"""Human-facing output of a scan: plots of mean perplexity vs dispersion per model and
checkpoint, a markdown summary, and console tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dispersion.core.ids import revision_order
from dispersion.core.layout import REPORT, report_path
from dispersion.core.storage import Store
from dispersion.report.figures import MARKERS, Figure, Rho, figure_files, revision_colors, spearman


def md_table(table: pa.Table, columns: list[str], limit: int = 40) -> str:
    """A markdown table of ``columns`` (first ``limit`` rows), floats to 3 decimals."""
    rows = table.select(columns).to_pylist()[:limit]
    if not rows:
        return "_(no rows)_\n"

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
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


def plot_bins(bins: pa.Table, *, layer: str, site: str, pool: str, model_order: Sequence[str] = (),
              corr: pa.Table | None = None) -> bytes:
    """PNG (with its SVG, :class:`dispersion.report.figures.FigureBytes`): one panel per
    (scope, model) x dataset; one line per revision (ordered by step), each bin with its
    standard error (``dispersion_se``) as an error bar, each line annotated with Spearman's rho
    of bin mean perplexity and dispersion, its interval, p and n (from ``corr``, the
    ``correlations`` table, where given; else rho and its asymptotic p from the bins)."""
    rho_of = {(r["model"], r["revision"], r["dataset"], r["scope"]): r
              for r in (_filter(corr, layer=layer, site=site, bins="all").to_pylist() if corr is not None else [])
              if r["pool"] == (pool if r["scope"] == "across" else "tokens")}
    scopes = [s for s in ("across", "within") if len(main_view(bins, layer, site, pool, s))]
    models = sorted(_unique(bins, "model"), key=_model_rank(model_order))
    datasets = _unique(bins, "dataset")
    rows = [(s, m) for m in models for s in scopes]  # the first model (the config's first) leads
    colors = revision_colors(_unique(bins, "revision"))
    markers = {rev: MARKERS[i % len(MARKERS)] for i, rev in enumerate(sorted(colors, key=revision_order))}
    fig = Figure(len(rows), len(datasets))
    for r, (scope, model) in enumerate(rows):
        view = _filter(main_view(bins, layer, site, pool, scope), model=model)
        revisions = sorted(_unique(view, "revision"), key=revision_order)
        for c, ds in enumerate(datasets):
            ax = fig.ax(r, c)
            rhos = []
            for rev in revisions:
                t = _filter(view, dataset=ds, revision=rev)
                if not len(t):
                    continue
                x = t["mean_ppl"].to_numpy()
                y = t["dispersion"].to_numpy()
                se = t["dispersion_se"].to_numpy(zero_copy_only=False) if "dispersion_se" in t.column_names else None
                ax.errorbar(x, y, yerr=se, ls="-", marker=markers[rev], ms=3.5, lw=1, color=colors[rev], label=rev,
                            elinewidth=0.7, capsize=1.5)
                row = rho_of.get((model, rev, ds, scope))
                rhos.append((None, colors[rev], _rho(row) if row else spearman(x, y)))
            what = f"across segments, {pool} pool" if scope == "across" else "within segments, token states"
            fig.style(ax, f"{model} · {ds} · {what}", "bin mean perplexity (log scale)",
                      "avg pairwise cosine distance" if scope == "across" else "within-segment dispersion", logx=True)
            fig.annotate(ax, rhos)
    fig.legend("revision")
    return fig.render(f"Perplexity vs dispersion (layer {layer}, site {site})")


def _rho(row: dict) -> Rho:
    """The rho box of a ``correlations`` row: rho, its interval, the bootstrap p (else the
    asymptotic one) and the number of bins."""
    p = row["boot_p"] if row.get("boot_p") is not None else row["spearman_p"]
    return Rho(row["spearman_r"], p, row["n_bins"], row.get("ci_low"), row.get("ci_high"))


def _fmt(x: float | None) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def markdown_summary(bins: pa.Table, corr: pa.Table, *, layer: str, site: str, pool: str, title: str,
                     model_order: Sequence[str] = ()) -> str:
    rank = _model_rank(model_order)
    lines = [f"# {title}", "",
             f"Correlation of bin mean perplexity with dispersion (layer `{layer}`, site `{site}`, "
             f"pool `{pool}`; `across` = Eq. 1 over pooled vectors per bin, `within` = mean within-segment "
             "token dispersion per bin).", "",
             "| model | revision | dataset | scope | bins | n | Pearson r | p | Spearman ρ | p |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for scope in ("across", "within"):
        view = main_view(corr, layer, site, pool, scope)
        rows = sorted(view.to_pylist(),
                      key=lambda r: (rank(r["model"]), revision_order(r["revision"]), r["dataset"], r["bins"]))
        for r in rows:
            lines.append(f"| {r['model']} | {r['revision']} | {r['dataset']} | {scope} | {r['bins']} | "
                         f"{r['n_bins']} | {_fmt(r['pearson_r'])} | {_p(r.get('pearson_p'))} | "
                         f"{_fmt(r['spearman_r'])} | {_p(r.get('spearman_p'))} |")
    layers = _filter(corr, site=site, scope="across", pool=pool, bins="all")
    if len(_unique(layers, "layer")) > 1:
        lines += ["", "### Spearman ρ by layer (across, all bins)", ""]
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

    console = console or Console(markup=False)
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
    for col in ("model", "revision", "dataset", "scope", "n bins", "Pearson r", "Spearman ρ", "interval"):
        table.add_column(col, justify="left" if col in ("model", "revision", "dataset", "scope") else "right")
    for scope in ("across", "within"):
        rows = _filter(main_view(corr, layer, site, pool, scope), bins="all").to_pylist()
        for r in sorted(rows, key=lambda r: (rank(r["model"]), revision_order(r["revision"]), r["dataset"])):
            table.add_row(r["model"], r["revision"], r["dataset"], scope, str(r["n_bins"]),
                          _fmt(r["pearson_r"]), _fmt(r["spearman_r"]), _ci(r.get("ci_low"), r.get("ci_high")))
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


def _ci(low: float | None, high: float | None) -> str:
    """An interval as ``[low, high]``, or ``n/a`` without one."""
    if low is None or high is None:
        return "n/a"
    return f"[{low:+.2f}, {high:+.2f}]"


def _p(p: float | None) -> str:
    """A p-value to two digits, below 0.001 as ``< 0.001`` (the asymptotic p of a correlation over
    a few bins is not meaningful to 60 decimals)."""
    if p is None or not np.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 1e-3 else f"{p:.2g}"


def findings_markdown(corr: pa.Table, *, layer: str, site: str, pool: str, model_order: Sequence[str] = (),
                      alpha: float = 0.05) -> str:
    """The summary's findings: Spearman rho (with p and n) of bin mean perplexity vs dispersion
    over all bins, at each model's last revision, both scopes; and how many are negative or
    positive at ``alpha``."""
    rank = _model_rank(model_order)
    rows = []
    for scope in ("across", "within"):
        view = _filter(main_view(corr, layer, site, pool, scope), bins="all").to_pylist()
        last: dict[str, str] = {}
        for r in view:
            if r["model"] not in last or revision_order(r["revision"]) > revision_order(last[r["model"]]):
                last[r["model"]] = r["revision"]
        rows += [dict(r, scope=scope) for r in view if r["revision"] == last[r["model"]]]
    rows.sort(key=lambda r: (rank(r["model"]), r["dataset"], r["scope"]))
    if not rows:
        return "_(no correlations: too few bins)_\n"

    def sig(r: dict, sign: int) -> bool:
        rho, p = r["spearman_r"], r.get("boot_p") if r.get("boot_p") is not None else r["spearman_p"]
        return rho is not None and p is not None and np.isfinite(rho) and p < alpha and np.sign(rho) == sign

    neg, pos = sum(sig(r, -1) for r in rows), sum(sig(r, 1) for r in rows)
    out = [f"Spearman ρ of bin mean perplexity vs dispersion over all bins, at each model's last revision "
           f"(layer `{layer}`, site `{site}`, pool `{pool}`): negative at p < {alpha} in {neg} of {len(rows)}, "
           f"positive in {pos}, not significant in {len(rows) - neg - pos}, each cell on its own (the claims "
           "above correct for the number tested). The paper (001 Sec. 2) reports negative correlations: more "
           "dispersed bins have lower perplexity. The interval resamples the segments (bootstrap, "
           "`analysis.bootstrap`); p is the bootstrap p of ρ = 0 where there is one.", "",
           "| model | revision | dataset | scope | bins | Spearman ρ | interval | p | Pearson r | interval |",
           "|---|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['revision']} | {r['dataset']} | {r['scope']} | {r['n_bins']} | "
                   f"{_fmt(r['spearman_r'])} | {_ci(r.get('ci_low'), r.get('ci_high'))} | "
                   f"{_p(r.get('boot_p') if r.get('boot_p') is not None else r['spearman_p'])} | "
                   f"{_fmt(r['pearson_r'])} | {_ci(r.get('pearson_ci_low'), r.get('pearson_ci_high'))} |")
    return "\n".join(out) + "\n"


def meta_markdown(meta: dict) -> str:
    """The run's metadata as a two-column table (what was measured, with what, when)."""
    rows = [(k, v) for k, v in meta.items() if v not in (None, "", [])]
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]) + "\n"


def publish_report(store: Store, name: str, bins: pa.Table, corr: pa.Table, *, layer: str, site: str,
                   pool: str, sections: str = "", model_order: Sequence[str] = (), meta: dict | None = None,
                   claims: str = "") -> dict[str, str]:
    """Write the report under ``results/report/``: ``{name}.md`` and a self-contained
    ``{name}.html`` (figures inlined), the main figure ``{name}.png``/``.svg`` and the analyses'
    figures beside it. The first page holds the run's metadata, the claims ledger (``claims``,
    markdown of :func:`dispersion.analyses.claims.claims_markdown`), the findings (rho with its
    interval, p, n) and the figure; then the analyses' ``sections`` (rendered markdown, see :func:`sections_markdown`);
    then appendices (every revision, every bin).
    Returns the URLs of the figure, the markdown and the HTML."""
    from dispersion.report.html import render_html

    png = report_path(name, "png")
    md = report_path(name)
    figure = plot_bins(bins, layer=layer, site=site, pool=pool, model_order=model_order, corr=corr)
    summary = markdown_summary(bins, corr, layer=layer, site=site, pool=pool, title="", model_order=model_order)
    appendix = summary.split("\n", 2)[2] if summary.startswith("# ") else summary
    correlations, _, bin_rows = appendix.partition("\n## Bins")
    body = "\n".join([
        f"# dispersion scan `{name}`", "", meta_markdown(meta or {}),
        *(["## Claims of paper 001 in this run", "", claims] if claims else []), "## Findings", "",
        findings_markdown(corr, layer=layer, site=site, pool=pool, model_order=model_order),
        f"![perplexity vs dispersion]({name}.png)", "",
        sections, "",
        "## Appendix A: correlations at every revision", "", correlations.strip(), "",
        *(["## Appendix B: bins" + bin_rows] if bin_rows else []),
    ])
    for ext, data in figure_files(figure).items():
        store.write_bytes(report_path(name, ext), data)
    store.write_text(md, body)

    def read(rel: str) -> bytes | None:
        path = f"results/{REPORT}/{rel}"
        return store.read_bytes(path) if store.exists(path) else None

    html = report_path(name, "html")
    store.write_text(html, render_html(body, f"dispersion scan {name}", read))
    return {"plot": store.url(png), "summary": store.url(md), "html": store.url(html)}
