"""The ``scan-models`` flow: the nightly model-zoo scan.

config -> plan (sample segments, work units) -> Ray actors extract pending units ->
DuckDB/Polars aggregations -> report (plot, tables, catalog) and Prefect artifacts.
"""

from __future__ import annotations

from prefect import flow

from dispersion.config import RunConfig
from dispersion.measure.scan import WorkUnit
from tasks.steps import aggregate_task, build_zoo_task, extract_task, load_config_task, plan_task


def run_pipeline(cfg: RunConfig, root: str | None) -> tuple[dict, list[WorkUnit]]:
    """Body shared by the flows: plan, fan out to Ray, aggregate. Returns the summary and
    the work units (for follow-up analyses of the same units)."""
    root = root or cfg.root
    build_zoo_task(cfg)
    units = plan_task(cfg, root)
    paths, ran = extract_task(cfg, units, root)
    result = aggregate_task(cfg, units, root, ran)
    return {**result, "features": len(paths)}, units


@flow(name="scan-models", log_prints=True)
def scan_models(config: str = "configs/default.yaml", root: str | None = None) -> dict:
    """Scan every model@revision of ``config`` (a path or fsspec URL) into ``root``
    (default: the config's root); finished work units are skipped."""
    return run_pipeline(load_config_task(config), root)[0]


if __name__ == "__main__":
    import sys

    print(scan_models(*sys.argv[1:2]))
