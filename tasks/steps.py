"""Prefect tasks: thin wrappers over the library, with retries. Large data stays in storage;
tasks exchange configs, work units and paths."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dispersion.config import RunConfig, load_config
from dispersion.core.layout import report_path
from dispersion.core.storage import Store
from dispersion.measure.scan import ScanStats, WorkUnit, plan, write_manifest
from dispersion.run import aggregate, ensure_zoo


def _log(msg: str) -> None:
    get_run_logger().info(msg)


@task(name="load-config")
def load_config_task(path: str) -> RunConfig:
    return load_config(path)


@task(name="build-zoo", retries=1)
def build_zoo_task(config: RunConfig) -> None:
    ensure_zoo(config, progress=False)


@task(name="plan", retries=2, retry_delay_seconds=5)
def plan_task(config: RunConfig, root: str) -> list[WorkUnit]:
    store = Store(root)
    store.check()
    units = plan(config, store, log=_log)
    _log(f"{len(units)} work units planned")
    return units


@task(name="extract-on-ray", retries=2, retry_delay_seconds=10)
def extract_task(config: RunConfig, units: list[WorkUnit], root: str) -> tuple[list[str], int]:
    """Fan the pending units out to Ray actors; returns the published features shard paths
    and how many units ran now."""
    from tasks.ray_extract import extract_on_ray

    def progress(marker: dict) -> None:
        _log(f"done {marker['unit']} in {marker['seconds']:.1f}s")

    markers, ran = extract_on_ray(config, units, root, progress=progress)
    store = Store(root)
    return [store.url(m["features"]) for m in markers], ran


@task(name="aggregate", retries=1)
def aggregate_task(config: RunConfig, units: list[WorkUnit], root: str, ran: int) -> dict:
    """Bins, correlations, report and catalog; Prefect artifacts with the summary."""
    store = Store(root)
    tables, report, catalog = aggregate(config, store, units, log=_log)
    stats = ScanStats(planned=len(units), ran=ran, skipped=len(units) - ran,
                      segments=sum(u.n_rows for u in units))
    run_id = write_manifest(config, store, units, stats)
    a = config.analysis
    corr = [r for r in tables["correlations"].to_pylist()
            if r["layer"] == str(a.layer) and r["site"] == a.site and r["pool"] in (a.pool, "tokens")
            and r["bins"] == "all"]
    key = f"dispersion-{config.name}".lower().replace("_", "-").replace(".", "-")
    create_table_artifact(key=f"{key}-correlations", table=[
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
         if k in ("model", "revision", "dataset", "scope", "n_bins", "pearson_r", "spearman_r")} for r in corr],
        description=f"Bin mean perplexity vs dispersion, layer {a.layer}, site {a.site}, pool {a.pool}")
    with store.fs.open(store.path(report_path(config.name)), "r") as fh:
        summary = fh.read()
    create_markdown_artifact(key=f"{key}-summary", markdown=(
        f"**{len(units)} work units** ({ran} ran now), report: `{report['plot']}`, catalog: `{catalog}`\n\n"
        + summary.split("## Bins")[0]), description=f"dispersion scan {config.name}")
    return {**report, "catalog": catalog, "run_id": run_id, "units": len(units), "ran": ran}
