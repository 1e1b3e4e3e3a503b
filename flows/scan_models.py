"""The ``scan-models`` flow: the nightly model-zoo scan.

config -> plan (sample segments, work units) -> Ray actors extract pending units ->
DuckDB/Polars aggregations -> report (plot, tables, catalog) and Prefect artifacts.
"""

from __future__ import annotations

from prefect import flow

from dispersion.config import RunConfig
from dispersion.core.preflight import preflight
from dispersion.measure.scan import WorkUnit
from tasks.steps import aggregate_task, build_zoo_task, extract_task, load_config_task, plan_task


def run_pipeline(cfg: RunConfig, root: str | None, trust_remote_code: bool = False) -> tuple[dict, list[WorkUnit]]:
    """Body shared by the flows: preflight (consent for remote code, a usable root), plan,
    fan out to Ray, aggregate. Returns the summary and the work units (for follow-up
    analyses of the same units)."""
    root = root or cfg.root
    preflight(root, cfg, trust_remote_code=trust_remote_code)
    build_zoo_task(cfg)
    units = plan_task(cfg, root)
    paths, ran = extract_task(cfg, units, root)
    result = aggregate_task(cfg, units, root, ran)
    return {**result, "features": len(paths)}, units


@flow(name="scan-models", log_prints=True)
def scan_models(config: str | None = "configs/default.yaml", root: str | None = None,
                trust_remote_code: bool = False, models: list[str] | None = None,
                datasets: list[str] | None = None, overrides: list[str] | None = None) -> dict:
    """Scan every model@revision of a run config into a store; finished work units are skipped.

    Args:
        config: Run config, a path or fsspec URL (null with ``models`` given: the embedded
            prose and code datasets, default settings).
        root: Store root, a local folder or ``s3://bucket/prefix`` (default: the config's root).
        trust_remote_code: Consent to run code from a model's or dataset's repository; required
            when the config sets ``trust_remote_code: true`` anywhere.
        models: Scan these instead of the config's models, as on the command line:
            ``org/name@rev``, ``NAME=org/name@rev1,rev2``, ``zoo:gpt2-tiny@all``,
            ``packaged:smollm2-135m``.
        datasets: Use these instead of the config's datasets: ``embedded:prose``,
            ``hf:PATH:NAME:SPLIT:FIELD``.
        overrides: ``key.path=value`` changes to the config (value read as YAML), e.g.
            ``sampling.num_segments=500``.
    """
    cfg = load_config_task(config, models, datasets, overrides)
    return run_pipeline(cfg, root, trust_remote_code)[0]


if __name__ == "__main__":
    import sys

    print(scan_models(*sys.argv[1:2]))
