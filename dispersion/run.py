"""The main job as plain functions: scan (extract) then aggregate and report.

Prefect flows (``flows/``) call the same pieces, replacing :func:`dispersion.measure.scan.execute`
by Ray actors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dispersion.analyses import STEPS, StepContext
from dispersion.analyses.bins import analyze, first_seed, over_seeds
from dispersion.analyses.claims import claims_markdown, claims_table
from dispersion.analyses.registry import Planned, report_sections, run_steps
from dispersion.config import RunConfig
from dispersion.core.catalog import build_catalog
from dispersion.core.config import ScanConfig
from dispersion.core.ids import revision_order
from dispersion.core.layout import result_path
from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from dispersion.measure.scan import ScanStats, WorkUnit, execute, plan, write_manifest
from dispersion.measure.units import run_units
from dispersion.report.markdown import publish_report
from dispersion.training.zoo import build_zoo


@dataclass
class Aggregated:
    """What :func:`aggregate` published: the result tables, the report's URLs (``plot``,
    ``summary``, ``html``), the catalog's path, and the id of the scan's manifest (``None``
    when no scan was recorded)."""

    tables: dict[str, pa.Table]
    report: dict[str, str]
    catalog: str
    run_id: str | None


@dataclass
class ScanResult(Aggregated):
    """What :func:`run_scan` did: the scan's stats and what it published."""

    stats: ScanStats


def aggregate(config: RunConfig, store: Store, units: list[WorkUnit],
              log: Callable[[str], None] = print,
              only: list[str] | None = None, planned: dict[str, Planned] | None = None,
              progress: bool = False, scan: ScanStats | None = None) -> Aggregated:
    """Bins + correlations (published as results), the enabled analysis steps (the units of the
    steps that measure computed first, unless ``planned`` by a flow whose runner computed them),
    the report, and the catalog. With ``scan`` (what the scan that measured ``units`` did), its
    manifest is recorded first: the run id the report names, and the run the catalog's views
    follow."""
    run_id = write_manifest(config, store, units, scan) if scan is not None else None
    a = config.analysis
    vendi = a.enabled("vendi") if only is None else "vendi" in only
    tables = analyze(store, units, bin_size=a.bin_size, select_bins=a.select_bins, vendi=vendi, boot=a.bootstrap)
    if config.sampling.seeds:  # repeated samples: every seed's rows, and their spread per cell
        tables["correlations_seeds"] = over_seeds(tables["correlations"])
    for name, table in tables.items():
        store.write_table(result_path(name, config.name), table)
    # the steps, the figures and the findings read the first seed's sample
    seed = config.sampling.all_seeds[0]
    main = {name: first_seed(tables[name], seed) for name in ("bins", "correlations")}
    ctx = StepContext(config, store, [u for u in units if u.segments.seed == seed], dict(main), log=log,
                      planned=dict(planned or {}), progress=progress, runner=run_units)
    run_steps(STEPS, ctx, only=only)
    tables["claims"] = claims_table(ctx)  # every claim the run can test, its stored steps' tables included
    store.write_table(result_path("claims", config.name), tables["claims"])
    meta = run_meta(config, store, units, run_id)
    claims = claims_markdown(tables["claims"], a.bootstrap.level)
    sections = report_sections(STEPS, store, config.name)
    report = publish_report(store, config.name, main["bins"], main["correlations"],
                            layer=str(a.layer), site=a.site, pool=a.pool, sections=sections, claims=claims,
                            model_order=[m.name for m in config.models], meta=meta)
    catalog = build_catalog(store)
    if config.tracking.mlflow is not None:
        track(config, store, tables["correlations"], log)
    return Aggregated(tables, report, catalog, run_id)


def track(config: RunConfig, store: Store, correlations: pa.Table, log: Callable[[str], None]) -> str | None:
    """Log the run to MLflow (``tracking.mlflow``): config, correlations, report, tables."""
    from dispersion import __version__
    from dispersion.report.tracking import log_run

    return log_run(config.tracking, config.model_dump(mode="json"), store, correlations, name=config.name,
                   run_id=newest_run_id(store), version=__version__, log=log)


def newest_run_id(store: Store) -> str | None:
    """The id of the newest finished scan of the root (its manifest), ``None`` before the first."""
    from dispersion.core.layout import MANIFESTS, run_of_manifest

    runs = sorted(store.glob(MANIFESTS), key=run_of_manifest)
    return run_of_manifest(runs[-1]) if runs else None


def run_meta(config: RunConfig, store: Store, units: list[WorkUnit], run_id: str | None = None) -> dict[str, str]:
    """What the report's first lines say about a run: name and id (``run_id``, else the newest
    scan's of the root), when, code version, models and revisions, datasets and segments, bins,
    what was measured."""
    from dispersion import __version__

    revisions: dict[str, set[str]] = {}
    for u in units:
        revisions.setdefault(u.mr.model, set()).add(u.mr.revision)

    def revs(r: set[str]) -> str:
        ordered = sorted(r, key=revision_order)
        return ", ".join(ordered) if len(ordered) <= 4 else f"{ordered[0]} … {ordered[-1]}, {len(ordered)} revisions"

    samples = {(u.segments.dataset, u.segments.sample): sum(u.segments.shard_rows) for u in units}
    run_id = run_id or newest_run_id(store)
    a, s = config.analysis, config.sampling
    return {
        "run": f"`{config.name}`" + (f" (run id `{run_id}`)" if run_id else ""),
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f" by dispersion {__version__}",
        "models": "; ".join(f"{m} ({revs(r)})" for m, r in revisions.items()),
        "datasets": ", ".join(f"{d.name} ({d.embedded or (d.hf.path if d.hf else 'synthetic')}, {d.split})"
                              for d in config.datasets),
        "segments": f"{sum(samples.values())} in {len(samples)} samples, {s.segment_length} tokens each, "
                    + (f"seeds {', '.join(map(str, s.seeds))} (the steps, figures and findings: seed {s.seeds[0]})"
                       if s.seeds else f"seed {s.seed}"),
        "bins": f"{a.bin_size} segments per bin" + (f"; Algorithm 1 selects {a.select_bins}" if a.select_bins else ""),
        "measured": f"layer `{a.layer}`, site `{a.site}`, pool `{a.pool}`",
    }


def build_zoo_models(config: ScanConfig, fields: list[int], progress: bool, only: list[str] | None,
                     log: Callable[[str], None]) -> None:
    """The zoo models of ``config.models[i]`` for ``i`` in ``fields``, trained unless built, and
    ``analysis.condensation.zoo_models`` when the condensation step runs (enabled, or in ``only``)."""
    names = {zoo for i in fields if (zoo := config.models[i].zoo) is not None}
    if isinstance(config, RunConfig) and ("condensation" in only if only is not None
                                          else config.analysis.enabled("condensation")):
        analysis: Any = config.analysis  # the steps' option fields are generated from the registry
        names.update(analysis.condensation.zoo_models)
    build_zoo(config.zoo, names=sorted(names), progress=progress)


def convert_model_files(config: ScanConfig, fields: list[int], progress: bool, only: list[str] | None,
                        log: Callable[[str], None]) -> None:
    """The GGUF files of ``config.models[i]`` (``gguf`` or ``packaged``), converted into
    ``config.model_cache`` unless converted already."""
    from dispersion.measure.gguf import spec_gguf

    for i in fields:
        spec_gguf(config.models[i], config.model_cache, field=f"models.{i}", log=log)


# What a model source needs before a scan can resolve it (sources not named need nothing).
PREPARE: dict[str, Callable[[ScanConfig, list[int], bool, list[str] | None, Callable[[str], None]], None]] = {
    "zoo": build_zoo_models,
    "gguf": convert_model_files,
    "packaged": convert_model_files,
}


def prepare_models(config: ScanConfig, progress: bool = True, only: list[str] | None = None,
                   log: Callable[[str], None] = print) -> None:
    """Make every configured model loadable before the scan plans (:data:`PREPARE`): missing
    zoo models are trained, GGUF and packaged files converted; hub ids and folders need nothing.
    ``only``: the analysis steps that will run (default: the config's)."""
    fields: dict[str, list[int]] = {}
    for i, spec in enumerate(config.models):
        fields.setdefault(spec.source_kind, []).append(i)
    for kind, indices in fields.items():
        if kind in PREPARE:
            PREPARE[kind](config, indices, progress, only, log)


def run_scan(config: RunConfig, *, root: str | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> ScanResult:
    """Build missing zoo models, extract every pending unit in process, aggregate, report."""
    store = Store(root or config.root)
    set_torch_threads(log=log)
    prepare_models(config, progress=progress, log=log)
    units = plan(config, store, log=log, bin_size=config.analysis.bin_size)
    stats = execute(units, config, store, progress=progress, log=log)
    done = aggregate(config, store, units, log=log, progress=progress, scan=stats)
    return ScanResult(done.tables, done.report, done.catalog, done.run_id, stats)
