"""Prefect tasks: thin wrappers over the library, with retries. Large data stays in storage;
tasks exchange configs, work units and paths."""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from dispersion.analyses.registry import Planned
from dispersion.config import RunConfig, load_config
from dispersion.core.errors import ConfigError
from dispersion.core.layout import report_path
from dispersion.core.overrides import CheckpointSweep
from dispersion.core.storage import Store
from dispersion.measure.scan import ScanStats, WorkUnit, plan
from dispersion.run import aggregate, prepare_models


def _log(msg: str) -> None:
    get_run_logger().info(msg)


def artifact_key(name: str, root: str) -> str:
    """A Prefect artifact key per (config name, root): runs of one config into different roots
    (local and S3, say) keep their own artifacts. Lowercase letters, digits and dashes."""
    from dispersion.core.ids import digest

    return re.sub(r"[^a-z0-9-]+", "-", f"dispersion-{name}-{digest(root.rstrip('/'), chars=6)}".lower())


@task(name="load-config")
def load_config_task(path: str | None, models: list[str] | None = None, datasets: list[str] | None = None,
                     overrides: list[str] | None = None, sweep: CheckpointSweep | None = None,
                     needs: str | None = None) -> RunConfig:
    """The run config with the command-line style changes of :mod:`dispersion.core.overrides`
    and a checkpoint ``sweep``; ``needs``: an analysis step the config must enable."""
    cfg = load_config(path, models=models or (), datasets=datasets or (), overrides=overrides or (), sweep=sweep)
    if needs is not None and not cfg.analysis.enabled(needs):
        raise ConfigError(f"analysis.steps: this flow needs the {needs} step")
    return cfg


@task(name="plan", retries=2, retry_delay_seconds=5)
def plan_task(config: RunConfig, root: str) -> tuple[list[WorkUnit], dict[str, Planned]]:
    """Every configured model made loadable (missing zoo models trained, GGUF files converted),
    then the scan's work units (segments sampled and published) and the plans of the analysis
    steps that measure (kNN-LM shards, query sets): everything the Ray runner computes."""
    from dispersion.analyses import STEPS
    from dispersion.analyses.registry import StepContext, plan_steps

    prepare_models(config, progress=False, log=_log)
    store = Store(root)
    store.check()
    units = plan(config, store, log=_log, bin_size=config.analysis.bin_size)
    planned = plan_steps(STEPS, StepContext(config, store, units, {}, log=_log))
    steps = "".join(f", {len(p.units)} {name} units" for name, p in planned.items())
    _log(f"{len(units)} work units{steps} planned")
    return units, planned


@task(name="extract-on-ray", retries=2, retry_delay_seconds=10)
def extract_task(config: RunConfig, units: list[WorkUnit], root: str,
                 planned: dict[str, Planned] | None = None) -> tuple[list[str], int, float]:
    """Fan the pending units out to Ray actors (the scan's and the measuring steps', one queue);
    returns the published features shard paths, how many of the scan's units ran now and the
    seconds the runner took."""
    import time

    from dispersion.core.progress import duration
    from tasks.ray_units import run_on_ray

    work = [*units, *(u for p in (planned or {}).values() for u in p.units)]
    t0, finished = time.monotonic(), [0]

    def progress(marker: dict) -> None:
        finished[0] += 1
        k, n = finished[0], len(work)
        elapsed = time.monotonic() - t0
        eta = f", ETA {duration(elapsed / k * (n - k))}" if k < n else ""
        _log(f"unit {k}/{n} done: {marker['unit']} in {marker['seconds']:.1f}s{eta}")

    # one lease owner per flow run: a retry of this task re-takes the leases of its first try
    from prefect.runtime import flow_run

    owner = f"flow-run-{flow_run.id}" if flow_run.id else None
    stats = run_on_ray(work, root, config.ray, progress=progress, log=_log, owner=owner)
    scan_keys = {u.key for u in units}
    store = Store(root)
    return ([store.url(u.features_rel) for u in units], sum(m.get("key") in scan_keys for m in stats.markers),
            stats.seconds)


@task(name="aggregate", retries=1)
def aggregate_task(config: RunConfig, units: list[WorkUnit], root: str, ran: int,
                   planned: dict[str, Planned] | None = None, seconds: float = 0.0) -> dict:
    """Bins, correlations, the analysis steps (reading the shards the runner published), report
    and catalog; Prefect artifacts with the summary."""
    store = Store(root)
    key = artifact_key(config.name, store.url())
    stats = ScanStats(planned=len(units), ran=ran, skipped=len(units) - ran,
                      segments=sum(u.n_rows for u in units), seconds=seconds)
    done = aggregate(config, store, units, log=_log, planned=planned, scan=stats)
    tables, report, catalog = done.tables, done.report, done.catalog
    a = config.analysis
    corr = [r for r in tables["correlations"].to_pylist()
            if r["layer"] == str(a.layer) and r["site"] == a.site and r["pool"] in (a.pool, "tokens")
            and r["bins"] == "all"]
    create_table_artifact(key=f"{key}-correlations", table=[
        {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()
         if k in ("model", "revision", "dataset", "scope", "n_bins", "spearman_r", "spearman_p", "pearson_r",
                  "pearson_p")} for r in corr],
        description=f"Bin mean perplexity vs dispersion (all bins), layer {a.layer}, site {a.site}, pool {a.pool}; "
                    f"root {store.url()}")
    with store.fs.open(store.path(report_path(config.name)), "r") as fh:
        summary = fh.read()
    body = re.sub(r"^!\[[^\]]*\]\([^)]*\)\s*$", "", summary.split("\n## ")[0] + "\n", flags=re.M)
    link = store.browser_url(report_path(config.name, "html" if "html" in report else "md"))
    create_markdown_artifact(key=f"{key}-summary", markdown=(
        f"**{len(units)} work units** ({ran} ran now) in `{store.url()}`; report: {link}, catalog: `{catalog}`\n\n"
        + body), description=f"dispersion scan {config.name}")
    create_link_artifact(key=f"{key}-report", link=link,
                         link_text=f"report of {config.name}", description=f"dispersion scan {config.name} report")
    return {**report, "catalog": catalog, "run_id": done.run_id, "units": len(units), "ran": ran}
