"""The paper's analyses as selectable steps over a scan (``analysis.steps``).

Each step is a plain function ``(StepContext) -> Section``: it reads the scan's stored shards
or main tables, and returns result tables (published as ``results/{table}/{run}.parquet``,
one DuckDB view per table), figures (``results/report/{run}/{name}.png``) and a markdown
section for the report. ``run_steps`` runs the enabled ones in order; the report
(``dispersion.report.publish_full_report``) gathers every section. docs/ANALYSES.md maps
each paper figure/table to its step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from dispersion.config import RunConfig
from dispersion.errors import ConfigError
from dispersion.storage import Store


@dataclass
class StepContext:
    config: RunConfig
    store: Store
    units: list                      # dispersion.scan.WorkUnit, all done
    tables: dict[str, pa.Table]      # main tables (bins, correlations) and earlier steps' tables
    log: Callable[[str], None] = print


@dataclass
class Section:
    name: str
    title: str
    paper: str
    tables: dict[str, pa.Table] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    markdown: str = ""


def _md_table(table: pa.Table, columns: list[str], limit: int = 40) -> str:
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


def _main(ctx: StepContext) -> tuple[pa.Table, pa.Table, str, str, str]:
    a = ctx.config.analysis
    return ctx.tables["bins"], ctx.tables["correlations"], str(a.layer), a.site, a.pool


# -- steps ------------------------------------------------------------------------------------

def step_domains(ctx: StepContext) -> Section:
    from dispersion.comparisons import plot_domains

    bins, corr, layer, site, _ = _main(ctx)
    view = corr.filter(pc.and_(pc.equal(corr["layer"], layer), pc.equal(corr["bins"], "all")))
    return Section("domains", "Perplexity vs dispersion across models and domains", "001 Sec. 2.2(1), A.1.2-A.1.3",
                   tables={"domains": view},
                   figures={"domains": plot_domains(bins, layer=layer, site=site)},
                   markdown=_md_table(view, ["model", "revision", "dataset", "scope", "pool", "n_bins",
                                             "pearson_r", "spearman_r"]))


def step_context(ctx: StepContext) -> Section:
    from dispersion.context import context_analysis, plot_context

    cfg = ctx.config
    if "context" not in cfg.extraction.pools or not cfg.extraction.context_lengths:
        raise ConfigError("analysis.steps: 'context' needs extraction.pools to include 'context' "
                          "and extraction.context_lengths")
    _, _, layer, site, _ = _main(ctx)
    tables = context_analysis(ctx.store, ctx.units, cfg.extraction.context_lengths, layer=layer, site=site,
                              bin_size=cfg.analysis.bin_size, select_bins=cfg.analysis.select_bins)
    corr = tables["context_correlations"]
    corr = corr.filter(pc.equal(corr["bins"], "all"))
    return Section("context", "Last-token perplexity at context lengths", "001 Sec. 2.2, Fig. 4", tables=tables,
                   figures={"context": plot_context(tables["context_bins"], alignment="segment"),
                            "context_next": plot_context(tables["context_bins"], alignment="next")},
                   markdown=_md_table(corr, ["model", "revision", "dataset", "context", "alignment", "n_bins",
                                             "pearson_r", "spearman_r"]))


def step_layers(ctx: StepContext) -> Section:
    from dispersion.layerwise import layer_table, plot_layers

    bins, corr, _, site, pool = _main(ctx)
    table = layer_table(bins, corr, site=site)
    revs = ctx.config.analysis.compare_revisions
    across = table.filter(pc.equal(table["scope"], "across"))
    return Section("layers", "Layer-wise perplexity vs dispersion", "001 Sec. 2.2(2), Fig. 5",
                   tables={"layers": table},
                   figures={"layers": plot_layers(bins, table, scope="across", pool=pool, revisions=revs),
                            "layers_within": plot_layers(bins, table, scope="within", revisions=revs)},
                   markdown=_md_table(across.filter(pc.equal(across["pool"], pool)),
                                      ["model", "revision", "dataset", "layer", "mean_dispersion", "spearman_r"], 60))


def step_heldout(ctx: StepContext) -> Section:
    from dispersion.comparisons import heldout_pairs, heldout_table, plot_heldout

    bins, corr, layer, site, _ = _main(ctx)
    pairs = heldout_pairs(ctx.config.datasets)
    if not pairs:
        raise ConfigError("analysis.steps: 'heldout' needs two datasets of one source with different splits "
                          "(e.g. embedded prose validation and test)")
    table = heldout_table(bins, corr, pairs, layer=layer, site=site)
    return Section("heldout", "Held-out check: validation vs test", "001 A.4, Fig. 22", tables={"heldout": table},
                   figures={"heldout": plot_heldout(bins, pairs, layer=layer, site=site)},
                   markdown=_md_table(table, ["model", "revision", "source", "split", "scope", "pool", "mean_ppl",
                                              "mean_dispersion", "spearman_r"]))


def step_vendi(ctx: StepContext) -> Section:
    from dispersion.comparisons import plot_vendi, vendi_table

    bins, _, layer, site, pool = _main(ctx)
    table = vendi_table(bins)
    return Section("vendi", "Vendi score vs cosine dispersion", "001 A.5", tables={"vendi": table},
                   figures={"vendi": plot_vendi(bins, layer=layer, site=site, pool=pool)},
                   markdown=_md_table(table.filter(pc.equal(table["layer"], layer)),
                                      ["model", "revision", "dataset", "pool", "spearman_vendi_vs_dispersion",
                                       "spearman_ppl_vs_dispersion", "spearman_ppl_vs_vendi"]))


def step_trajectory(ctx: StepContext) -> Section:
    from dispersion.sweep import trajectory
    from dispersion.trajectories import measures, plot_trajectory, spearman_over_trajectory

    _, _, layer, site, pool = _main(ctx)
    traj = trajectory(ctx.store, ctx.units, layer=layer, site=site, pool=pool)
    scores = _scores(ctx)
    rows = measures(traj, ctx.tables.get("gap"))
    rho = spearman_over_trajectory(rows, scores)
    return Section("trajectory", "Checkpoint trajectories", "001 B.2.2",
                   tables={"trajectory": traj, "trajectory_spearman": rho},
                   figures={"trajectory": plot_trajectory(rows, scores)},
                   markdown=_md_table(rho, ["model", "dataset", "measure", "task", "n_checkpoints", "spearman_r",
                                            "spearman_p"], 60))


def _scores(ctx: StepContext) -> pa.Table:
    """Zoo models' validation loss per checkpoint plus the user's scores table, if any."""
    from dispersion.trajectories import zoo_scores

    scores = zoo_scores(ctx.config)
    if ctx.config.analysis.scores:
        from dispersion.gap import read_scores

        user = read_scores(ctx.config.analysis.scores)
        scores = pa.concat_tables([scores, user.select(scores.column_names).cast(scores.schema)])
    return scores


def step_gap(ctx: StepContext) -> Section:
    from dispersion.errors import DataError
    from dispersion.gap import GAP_SCHEMA, gap_of_source, plot_gap, rank_models, spearman_vs_scores
    from dispersion.scan import model_revisions

    spec = ctx.config.analysis.gap
    rows: list[dict] = []
    for mr in model_revisions(ctx.config):
        rows += gap_of_source(mr.model, mr.revision, mr.source, spec, field=mr.field, log_fn=ctx.log)
    table = pa.Table.from_pylist(rows, schema=GAP_SCHEMA)
    domains = sorted(set(table["domain"].to_pylist()))
    ranks = pa.concat_tables([_ranked(rank_models(table, d, m), d, m) for d in domains for m in spec.metrics])
    scores = _scores(ctx)
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
    png = _png(plot_gap, table)
    return Section("gap", "Dispersion gap for model selection", "001 Sec. 3.2, B.2.1, Tables 9-12",
                   tables={"gap": table, "gap_rank": ranks, "gap_spearman": rho}, figures={"gap": png},
                   markdown=_md_table(table, ["model", "revision", "domain", "metric", "within", "reference_within",
                                              "between", "gap"], 60) + "\n" +
                   _md_table(rho, ["task", "domain", "metric", "n", "spearman_r", "spearman_p"]))


def _png(plot, *args, **kwargs) -> bytes:
    """Bytes of a PNG that ``plot(..., path)`` writes to a file."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    try:
        plot(*args, tmp, **kwargs)
        with open(tmp, "rb") as fh:
            return fh.read()
    finally:
        os.remove(tmp)


def step_clusters(ctx: StepContext) -> Section:
    from dispersion.clusters import find_ngram_clusters, plot_clusters, run_clusters, token_docs_from_texts
    from dispersion.corpus import documents
    from dispersion.modeling import load_tokenizer, resolve_device, resolve_dtype
    from dispersion.sampling import tokenizer_fingerprint
    from dispersion.scan import model_revisions

    cfg = ctx.config
    spec = cfg.analysis.clusters
    names = [d.name for d in cfg.datasets]
    if spec.dataset is not None and spec.dataset not in names:
        raise ConfigError(f"analysis.clusters.dataset: {spec.dataset!r} is not a configured dataset ({names})")
    ds = next(d for d in cfg.datasets if d.name == (spec.dataset or names[0]))
    texts = [d.text for d in documents(ds)]
    by_tok: dict[str, tuple[list, list]] = {}
    for mr in model_revisions(cfg):
        tok = load_tokenizer(mr.source, field=mr.field)
        by_tok.setdefault(tokenizer_fingerprint(tok), (tok, []))[1].append(mr)
    device = resolve_device(cfg.extraction.device)
    tables = []
    for tok, mrs in by_tok.values():
        token_docs = token_docs_from_texts(texts, tok)
        clusters = find_ngram_clusters(token_docs, spec)
        ctx.log(f"clusters: {len(clusters.ngrams)} clusters of {spec.n}-grams, {len(clusters.labels)} contexts "
                f"from {ds.name}")
        for mr in mrs:  # one model@revision at a time, each with its own dtype
            tables.append(run_clusters([(mr.model, mr.source, mr.revision)], token_docs, spec, clusters=clusters,
                                       dataset=ds.name, dtype=resolve_dtype(mr.dtype, device),
                                       device=cfg.extraction.device, batch_size=cfg.extraction.batch_size))
    table = pa.concat_tables(tables)
    return Section("clusters", "Within- and between-cluster dispersion of n-gram clusters", "001 Sec. 2.3, Fig. 7",
                   tables={"clusters": table}, figures={"clusters": _png(plot_clusters, table)},
                   markdown=_md_table(table, ["model", "revision", "layer", "n_clusters", "n_occurrences", "within",
                                              "between", "ratio", "train_loss"], 60))


def step_finetune(ctx: StepContext) -> Section:
    """Each ``analysis.finetune`` entry (default: LoRA and full fine-tuning of the first zoo
    model on prose) is trained into ``{zoo.cache}/finetuned/{run}/{i}-{model}-{base key}/{method}``
    (local; resumable, skipped when done) and measured before and after on its domain and the control."""
    import hashlib
    import shutil
    from pathlib import Path

    from dispersion.finetune import (base_source, dispersion_before_after, finetune, parse_finetune_spec,
                                     plot_finetune)
    from dispersion.modeling import source_fingerprint

    cfg = ctx.config
    specs = list(cfg.analysis.finetune)
    if not specs:
        zoo_models = [m for m in cfg.models if m.zoo is not None]
        if not zoo_models:
            raise ConfigError("analysis.finetune: give the models to fine-tune (no zoo model to default to)")
        specs = [parse_finetune_spec({"method": m, "zoo": zoo_models[0].zoo}) for m in ("lora", "full")]
    tables = []
    L = min(cfg.sampling.segment_length, 128)
    for i, spec in enumerate(specs):
        name = spec.zoo or Path(spec.id).name
        # keyed by the base weights: a rebuilt zoo fine-tunes afresh (older folders are removed)
        base_key = hashlib.blake2b(source_fingerprint(base_source(spec, cfg.zoo)).encode(), digest_size=6).hexdigest()
        out = Path(cfg.zoo.cache) / "finetuned" / cfg.name / f"{i}-{name}-{base_key}"
        for old in [out.parent / f"{i}-{name}", *out.parent.glob(f"{i}-{name}-*")]:
            if old != out and old.is_dir() and len(old.name) - len(f"{i}-{name}") in (0, 13):
                shutil.rmtree(old, ignore_errors=True)
        final = finetune(spec, out, zoo=cfg.zoo)
        ctx.log(f"finetune: {name} {spec.method} on {spec.domain} -> {final}")
        tables.append(dispersion_before_after(spec, final, zoo=cfg.zoo, num_segments=min(cfg.sampling.num_segments, 256),
                                              segment_length=L, pool=cfg.analysis.pool, seed=cfg.sampling.seed,
                                              batch_size=cfg.extraction.batch_size, device=cfg.extraction.device))
    table = pa.concat_tables(tables)
    return Section("finetune", "Fine-tuning effect on dispersion", "001 Sec. 2.2(3), A.2, Fig. 6",
                   tables={"finetune": table}, figures={"finetune": _png(plot_finetune, table)},
                   markdown=_md_table(table, ["model", "method", "domain", "role", "checkpoint", "ppl", "dispersion",
                                              "within"]))


def step_condensation(ctx: StepContext) -> Section:
    """Condensation maps (papers 002/003) of each model's untrained and trained checkpoint
    (``analysis.compare_revisions``, default first and last), on the scan's own segments of
    the first dataset: the zoo's sizes side by side."""
    import numpy as np

    from dispersion.condensation import condensation_histograms, depth_table, plot_condensation
    from dispersion.layerwise import compared_revisions
    from dispersion.modeling import load_model, resolve_device, resolve_dtype, resolve_source

    cfg = ctx.config
    spec = cfg.analysis.condensation
    if "prepend_bos" not in spec.model_fields_set:  # as the scan's segments were sized for
        spec = spec.model_copy(update={"prepend_bos": cfg.extraction.prepend_bos})
    ds = cfg.datasets[0].name
    device = resolve_device(cfg.extraction.device)
    revs: dict[str, list[str]] = {}
    for u in ctx.units:
        revs.setdefault(u.mr.model, []).append(u.mr.revision)

    def sequences(unit) -> list:
        seqs: list = []
        for k in range(len(unit.segments.shard_rows)):
            seqs += [np.asarray(t, np.int64) for t in
                     ctx.store.read_table(unit.segments.shard_rel(k)).column("token_ids").to_pylist()]
            if len(seqs) >= spec.num_sequences:
                break
        return seqs

    maps = []
    for model, rs in revs.items():
        for rev in compared_revisions(rs, cfg.analysis.compare_revisions):
            unit = next(u for u in ctx.units if u.mr.model == model and u.mr.revision == rev
                        and u.segments.dataset == ds)
            m = load_model(unit.mr.source, dtype=resolve_dtype(unit.mr.dtype, device), device=device,
                           field=unit.mr.field)
            maps.append(condensation_histograms(m, sequences(unit), spec, name=model, revision=rev, label=ds))
            del m
    if spec.zoo_models:  # more zoo sizes, on the segments of a scanned zoo model (same tokenizer)
        from dispersion.zoo import build_zoo, zoo_model_dir, zoo_revisions

        zoo_names = {m.name for m in cfg.models if m.zoo}
        unit = next((u for u in ctx.units if u.mr.model in zoo_names and u.segments.dataset == ds), None)
        if unit is None:
            raise ConfigError("analysis.condensation.zoo_models: needs a zoo model among the scanned models "
                              "(its segments are in the zoo tokenizer)")
        seqs = sequences(unit)
        build_zoo(cfg.zoo, list(spec.zoo_models), progress=False)
        for name in spec.zoo_models:
            for rev in compared_revisions(zoo_revisions(cfg.zoo.cache, name), cfg.analysis.compare_revisions):
                src = resolve_source(str(zoo_model_dir(cfg.zoo.cache, name)), rev)
                m = load_model(src, dtype=resolve_dtype(unit.mr.dtype, device), device=device)
                maps.append(condensation_histograms(m, seqs, spec, name=name, revision=rev, label=ds))
                del m
    table = pa.concat_tables([m.to_table() for m in maps])
    depth = depth_table(maps)
    return Section("condensation", "Embedding condensation maps", "002/003 (condensation), issue 5",
                   tables={"condensation": table, "condensation_depth": depth},
                   figures={"condensation": plot_condensation(maps)},
                   markdown=_md_table(depth, ["model", "revision", "label", "n_layers", "spearman_r", "kendall_tau"]))


def _ranked(table: pa.Table, domain: str, metric: str) -> pa.Table:
    return table.append_column("domain", pa.array([domain] * table.num_rows, pa.string())) \
                .append_column("metric", pa.array([metric] * table.num_rows, pa.string()))


STEPS: dict[str, Callable[[StepContext], Section]] = {
    "domains": step_domains,
    "context": step_context,
    "layers": step_layers,
    "heldout": step_heldout,
    "vendi": step_vendi,
    "gap": step_gap,
    "clusters": step_clusters,
    "finetune": step_finetune,
    "condensation": step_condensation,
    "trajectory": step_trajectory,
}


def run_steps(ctx: StepContext, only: list[str] | None = None) -> list[Section]:
    """Run the enabled steps (or ``only`` these), publish their tables and figures."""
    from dispersion.config import ANALYSIS_STEPS

    names = only if only is not None else [s for s in ANALYSIS_STEPS if ctx.config.analysis.enabled(s)]
    sections = []
    for name in names:
        if name not in STEPS:
            raise ConfigError(f"analysis.steps: unknown or unavailable step {name!r} (known: {sorted(STEPS)})")
        import time

        t0 = time.perf_counter()
        section = STEPS[name](ctx)
        publish_section(ctx.store, ctx.config.name, section)
        ctx.tables.update(section.tables)
        ctx.log(f"analysis {name}: {', '.join(section.tables) or 'figure only'} in {time.perf_counter() - t0:.1f} s")
        sections.append(section)
    return sections


def publish_section(store: Store, run: str, section: Section) -> None:
    for table_name, table in section.tables.items():
        store.write_table(f"results/{table_name}/{run}.parquet", table)
    for fig_name, png in section.figures.items():
        store.write_bytes(f"results/report/{run}/{fig_name}.png", png)
