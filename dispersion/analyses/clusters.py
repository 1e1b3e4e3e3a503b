"""The ``clusters`` analysis step: within- and between-cluster dispersion of n-gram clusters
over checkpoints (paper 001 section 2.3, Fig. 7). What is clustered and measured is
:mod:`dispersion.measure.clusters`; this module plans one measurement per model@revision,
draws Fig. 7 and writes the report section.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from dispersion.analyses.registry import Planned, Section, Step, StepContext
from dispersion.core.errors import ConfigError, DataError
from dispersion.measure.clusters import FIELD, ClusterSpec, find_ngram_clusters, measure_table, token_docs_from_texts
from dispersion.measure.units import TableUnit
from dispersion.report.figures import Figure, category_colors, write_figure
from dispersion.report.markdown import md_table

__all__ = ["figure_clusters", "plot_clusters", "zoo_token_docs"]


def zoo_token_docs(cache: str | os.PathLike, vocab_size: int, split: str = "validation",
                   domain: str | None = None) -> list[np.ndarray]:
    """Documents of the embedded corpus as tokenized (and cached) for the zoo (``zoo.token_splits``).

    ``split``: a split of the cache (``train``, ``validation``, ...) or ``all``; ``domain``:
    ``prose``, ``code`` or None (both).
    The cached arrays join documents with eos; they are split there and the eos dropped.
    """
    from dispersion.training.zoo import DOMAINS, SPECIAL_TOKEN, build_tokenizer, load_raw_tokenizer, token_splits

    if domain is not None and domain not in DOMAINS:
        raise DataError(f"embedded: unknown domain {domain!r} (expected one of {', '.join(DOMAINS)})")
    splits = token_splits(cache, vocab_size)
    if split != "all" and split not in splits:
        raise DataError(f"split: unknown split {split!r} for the embedded corpus (expected one of "
                        f"{', '.join([*splits, 'all'])})")
    eos = load_raw_tokenizer(build_tokenizer(cache, vocab_size)).token_to_id(SPECIAL_TOKEN)
    out: list[np.ndarray] = []
    for s in (tuple(splits) if split == "all" else (split,)):
        ts = splits[s]
        for dom in (DOMAINS if domain is None else (domain,)):
            a, b = ts.domains[dom]
            part = ts.ids[a:b]
            cuts = np.flatnonzero(part == eos) + 1
            out.extend(d[:-1] if d.size and d[-1] == eos else d for d in np.split(part, cuts) if d.size)
    return [d.astype(np.int64) for d in out if d.size]


# --------------------------------------------------------------------------- #
# plot
# --------------------------------------------------------------------------- #
def figure_clusters(table: pa.Table, *, layer: str | None = None, site: str | None = None) -> bytes:
    """Like paper 001 Fig. 7: within- (left) and between-cluster (right) cosine distance vs
    training step, one line per model, and the training loss (dashed) on a twin axis. PNG
    bytes with the same figure as SVG (:class:`dispersion.report.figures.FigureBytes`).

    ``layer``/``site`` default to ``final``/``block`` when present, else the table's first row.
    Revisions without a step number are placed by their order in the table.
    """
    from matplotlib.lines import Line2D

    rows = table.to_pylist()
    if not rows:
        raise DataError(f"{FIELD}: nothing to plot (empty table)")
    layers = {r["layer"] for r in rows}
    layer = layer or ("final" if "final" in layers else rows[0]["layer"])
    sites = {r["site"] for r in rows if r["layer"] == layer}
    site = site or ("block" if "block" in sites else sorted(sites)[0])
    rows = [r for r in rows if r["layer"] == layer and r["site"] == site]
    if not rows:
        raise DataError(f"{FIELD}.layer: no rows for layer {layer!r} site {site!r}")
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = category_colors(models)
    fig = Figure(1, 2, width=4.2, height=3.0)
    has_loss = False
    for col, (metric, title) in enumerate((("within", "within-cluster distance"),
                                           ("between", "between-cluster distance"))):
        ax = fig.ax(0, col)
        twin = fig.twin(ax)
        loss_here = False
        for m in models:
            mr = [r for r in rows if r["model"] == m]
            xs = [r["step"] if r["step"] is not None else j for j, r in enumerate(mr)]
            order = np.argsort(xs, kind="stable")
            x = [xs[j] for j in order]
            ax.plot(x, [mr[j][metric] for j in order], "o-", color=colors[m], lw=1.5, ms=4, label=m)
            loss = [mr[j]["train_loss"] for j in order]
            if any(v is not None for v in loss):
                loss_here = True
                twin.plot(x, [np.nan if v is None else v for v in loss], "s--", color=colors[m],
                          lw=1, ms=3, alpha=0.6)
        has_loss = has_loss or loss_here
        fig.style(ax, f"{title} ({layer}/{site})", "training step", "avg cosine distance")
        if loss_here:
            twin.set_ylabel("training loss (dashed)")
        else:
            twin.set_yticks([])
    handles = [Line2D([], [], color=colors[m], marker="o", ms=4, lw=1.5) for m in models]
    labels = list(models)
    if has_loss:
        handles.append(Line2D([], [], color="grey", marker="s", ms=3, lw=1, ls="--", alpha=0.8))
        labels.append("training loss (right axis)")
    fig.legend(handles=handles, labels=labels)
    r0 = rows[0]
    return fig.render(f"{r0['n_clusters']} clusters of {r0['n']}-gram contexts "
                      f"({r0['n_occurrences']} contexts, T={r0['context']}, anchor={r0['anchor']})")


def plot_clusters(table: pa.Table, path: str | os.PathLike, *, layer: str | None = None,
                  site: str | None = None) -> Path:
    """:func:`figure_clusters` written to ``path`` (PNG; SVG when it ends in ``.svg``)."""
    write_figure(figure_clusters(table, layer=layer, site=site), path)
    return Path(path)


# -- the step ------------------------------------------------------

def plan_step(ctx: StepContext) -> Planned:
    """Clusters found once per tokenizer in the documents of ``analysis.clusters.dataset`` (the
    first dataset by default), then one :class:`TableUnit` per configured model@revision: the
    states of the same windows and their cluster dispersion
    (:func:`dispersion.measure.clusters.measure_table`)."""
    from dispersion.core.ids import digest
    from dispersion.measure.corpus import dataset_key, documents
    from dispersion.measure.modeling import load_tokenizer, resolve_device, resolve_dtype
    from dispersion.measure.sampling import tokenizer_fingerprint
    from dispersion.measure.sources import model_revisions

    cfg = ctx.config
    spec: ClusterSpec = ctx.options("clusters")
    names = [d.name for d in cfg.datasets]
    if spec.dataset is not None and spec.dataset not in names:
        raise ConfigError(f"{FIELD}.dataset: {spec.dataset!r} is not a configured dataset ({names})")
    ds = next(d for d in cfg.datasets if d.name == (spec.dataset or names[0]))
    texts = [d.text for d in documents(ds)]
    by_tok: dict[str, tuple[object, list]] = {}
    for mr in model_revisions(cfg):
        tok = load_tokenizer(mr.source, field=mr.field)
        by_tok.setdefault(tokenizer_fingerprint(tok), (tok, []))[1].append(mr)
    device = resolve_device(cfg.extraction.device)
    batch = cfg.extraction.batch_size
    units = []
    for fp, (tok, mrs) in by_tok.items():
        token_docs = token_docs_from_texts(texts, tok)
        clusters = find_ngram_clusters(token_docs, spec)
        ctx.log(f"clusters: {len(clusters.ngrams)} clusters of {spec.n}-grams, {len(clusters.labels)} contexts "
                f"from {ds.name}")
        windows = clusters.token_windows(token_docs)
        if windows is None:
            raise DataError(f"{FIELD}.dataset: no windows to feed")
        key = digest([spec.model_dump(mode="json"), dataset_key(ds), fp, batch])
        units += [TableUnit("clusters", mr, (mr.model, mr.revision, mr.source, windows, clusters, spec, ds.name, batch),
                            key, measure_table, dtype=resolve_dtype(mr.dtype, device), device=cfg.extraction.device)
                  for mr in mrs]  # one model@revision at a time, each with its own dtype
    return Planned(units=units)


def run(ctx: StepContext) -> Section:
    """From the published tables of :func:`plan_step`: the cluster table, Fig. 7, the section."""
    table = pa.concat_tables([u.read(ctx.store) for u in ctx.planned["clusters"].units])
    return STEP.section(tables={"clusters": table}, figures={"clusters": figure_clusters(table)},
                   markdown=md_table(table, ["model", "revision", "layer", "n_clusters", "n_occurrences", "within",
                                              "between", "ratio", "train_loss"], 60))


STEP = Step(name="clusters", title="Within- and between-cluster dispersion of n-gram clusters",
            paper="001 Sec. 2.3, Fig. 7", tables=("clusters",), run=run, options=ClusterSpec, default=ClusterSpec,
            plan=plan_step, unit_name="models")
