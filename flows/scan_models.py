"""The ``scan-models`` flow: the nightly model-zoo scan, and the one body of every measuring flow.

config -> plan (sample segments, work units, the units of the analysis steps that measure)
-> Ray actors compute every pending unit -> aggregations and the analysis steps
(reading the published shards) -> report (plot, tables, catalog) and Prefect artifacts.
"""

from __future__ import annotations

from prefect import flow

from dispersion.config import RunConfig
from dispersion.core.overrides import CheckpointSweep
from dispersion.core.preflight import preflight
from dispersion.measure.scan import WorkUnit
from tasks.steps import aggregate_task, extract_task, load_config_task, plan_task


def run_pipeline(config: str | None, root: str | None = None, trust_remote_code: bool = False, *,
                 models: list[str] | None = None, datasets: list[str] | None = None,
                 overrides: list[str] | None = None, sweep: CheckpointSweep | None = None,
                 needs: str | None = None) -> tuple[dict, RunConfig, list[WorkUnit]]:
    """The body of every measuring flow (scan-models, checkpoint-sweep, knnlm, hardness): load
    the config (with the command line's changes, a checkpoint ``sweep``; ``needs``: an analysis
    step it must enable), preflight (consent for remote code, a usable root), make the models
    loadable, plan the scan and the analysis steps that measure, fan every pending unit out to
    Ray, aggregate. Returns the summary, the config and the work units (for follow-up analyses
    of the same units)."""
    cfg = load_config_task(config, models, datasets, overrides, sweep=sweep, needs=needs)
    root = root or cfg.root
    preflight(root, cfg, trust_remote_code=trust_remote_code)
    units, planned = plan_task(cfg, root)
    paths, ran, seconds = extract_task(cfg, units, root, planned)
    result = aggregate_task(cfg, units, root, ran, planned, seconds)
    measured = {name: len(p.units) for name, p in planned.items()}
    return {**result, "features": len(paths), **({"step_units": measured} if measured else {})}, cfg, units


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
    return run_pipeline(config, root, trust_remote_code, models=models, datasets=datasets, overrides=overrides)[0]


if __name__ == "__main__":
    import sys

    print(scan_models(*sys.argv[1:2]))
