"""The main job as plain functions: scan (extract) then aggregate and report.

Prefect flows (``flows/``) call the same pieces, replacing :func:`dispersion.measure.scan.execute`
by Ray actors.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from dispersion.analyses import STEPS, StepContext
from dispersion.analyses.bins import analyze, first_seed, over_seeds
from dispersion.analyses.claims import claims_markdown, claims_table
from dispersion.analyses.registry import Planned, report_sections, run_steps
from dispersion.config import RunConfig
from dispersion.core.catalog import build_catalog
from dispersion.core.config import ScanConfig
from dispersion.core.errors import ConfigError
from dispersion.core.ids import revision_order, step_of
from dispersion.core.layout import result_path
from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from dispersion.measure.scan import ScanStats, WorkUnit, execute, plan, write_manifest
from dispersion.measure.units import run_units
from dispersion.report.markdown import publish_report
from dispersion.training.zoo import build_zoo


@dataclass
class ScanResult:
    stats: ScanStats
    tables: dict[str, pa.Table]
    report: dict[str, str]
    catalog: str
    run_id: str


def aggregate(config: RunConfig, store: Store, units: list[WorkUnit],
              log: Callable[[str], None] = print,
              only: list[str] | None = None, planned: dict[str, Planned] | None = None,
              progress: bool = False) -> tuple[dict[str, pa.Table], dict[str, str], str]:
    """Bins + correlations (published as results), the enabled analysis steps (the units of the
    steps that measure computed first, unless ``planned`` by a flow whose runner computed them),
    the report, and the catalog."""
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
    sections = report_sections(STEPS, store, config.name)
    layer = str(a.layer)
    report = publish_report(store, config.name, main["bins"], main["correlations"],
                            layer=layer, site=a.site, pool=a.pool, sections=sections,
                            claims=claims_markdown(tables["claims"], a.bootstrap.level),
                            model_order=[m.name for m in config.models], meta=run_meta(config, store, units))
    catalog = build_catalog(store)
    if config.tracking.mlflow is not None:
        track(config, store, tables["correlations"], log)
    return tables, report, catalog


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


def run_meta(config: RunConfig, store: Store, units: list[WorkUnit]) -> dict[str, str]:
    """What the report's first lines say about a run: name and id, when, code version, models
    and revisions, datasets and segments, bins, what was measured."""
    from dispersion import __version__

    revisions: dict[str, set[str]] = {}
    for u in units:
        revisions.setdefault(u.mr.model, set()).add(u.mr.revision)

    def revs(r: set[str]) -> str:
        ordered = sorted(r, key=revision_order)
        return ", ".join(ordered) if len(ordered) <= 4 else f"{ordered[0]} … {ordered[-1]}, {len(ordered)} revisions"

    samples = {(u.segments.dataset, u.segments.sample): sum(u.segments.shard_rows) for u in units}
    run_id = newest_run_id(store)
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


def ensure_zoo(config: ScanConfig, progress: bool = True) -> None:
    """Build the embedded zoo models the config names, if they are missing."""
    names = sorted({m.zoo for m in config.models if m.zoo is not None})
    if names:
        build_zoo(config.zoo, names=names, progress=progress)



def run_scan(config: RunConfig, *, root: str | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> ScanResult:
    """Build missing zoo models, extract every pending unit in process, aggregate, report."""
    store = Store(root or config.root)
    set_torch_threads(log=log)
    ensure_zoo(config, progress=progress)
    units = plan(config, store, log=log)
    stats = execute(units, config, store, progress=progress, log=log)
    run_id = write_manifest(config, store, units, stats)  # before the catalog, whose views follow the newest run
    tables, report, catalog = aggregate(config, store, units, log=log, progress=progress)
    return ScanResult(stats, tables, report, catalog, run_id)


def sweep_config(config: RunConfig, model: str, revisions: list[str] | None = None,
                 checkpoint_glob: str | None = None) -> RunConfig:
    """The config restricted to ``model`` at the given revisions or globbed checkpoint folders."""
    specs = [m for m in config.models if m.name == model]
    if not specs:
        raise ConfigError(f"model: {model!r} is not in the config (models: {[m.name for m in config.models]})")
    spec = specs[0]
    if (revisions is None) == (checkpoint_glob is None):
        raise ConfigError("give exactly one of revisions or checkpoint_glob")
    update: dict = {}
    if checkpoint_glob is not None:
        folders = sorted(p for p in glob.glob(os.path.expanduser(checkpoint_glob)) if os.path.isdir(p))
        if not folders:
            raise ConfigError(f"checkpoint_glob: {checkpoint_glob!r} matches no folder")
        parents = {os.path.dirname(os.path.abspath(p)) for p in folders}
        if len(parents) != 1:
            raise ConfigError(f"checkpoint_glob: folders must share one parent, got {sorted(parents)}")
        names = sorted((os.path.basename(p) for p in folders), key=lambda n: (step_of(n) is None, step_of(n) or 0, n))
        update = {"zoo": None, "id": parents.pop(), "gguf": None, "packaged": None, "revisions": names}
    else:
        if not revisions:
            raise ConfigError("revisions: must not be empty")
        if spec.source_kind in ("gguf", "packaged"):
            raise ConfigError(f"revisions: {model!r} is a {spec.source_kind} model, whose one revision is 'main'")
        update = {"revisions": list(revisions)}
    narrowed = spec.model_copy(update=update)
    return config.model_copy(update={"models": [narrowed], "name": f"{config.name}-sweep-{model}"})
