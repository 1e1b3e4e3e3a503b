"""The ``scan-models`` flow: the nightly model-zoo scan, and the one body of every measuring flow.

config -> plan (sample segments, work units, the units of the analysis steps that measure)
-> Ray actors compute every pending unit -> aggregations and the analysis steps
(reading the published shards) -> report (plot, tables, catalog) and Prefect artifacts.
"""

from __future__ import annotations

from prefect import flow

from dispersion.config import RunConfig
from dispersion.core.errors import ConfigError
from dispersion.core.preflight import preflight
from dispersion.measure.scan import WorkUnit
from tasks.steps import aggregate_task, build_zoo_task, extract_task, load_config_task, plan_task


def run_pipeline(cfg: RunConfig, root: str | None, trust_remote_code: bool = False,
                 needs: str | None = None) -> tuple[dict, list[WorkUnit]]:
    """The body of every measuring flow (scan-models, checkpoint-sweep, knnlm, hardness):
    preflight (consent for remote code, a usable root), plan the scan and the analysis steps
    that measure, fan every pending unit out to Ray, aggregate. ``needs``: an analysis step the
    config must enable. Returns the summary and the work units (for follow-up analyses of the
    same units)."""
    if needs is not None and not cfg.analysis.enabled(needs):
        raise ConfigError(f"analysis.steps: this flow needs the {needs} step")
    root = root or cfg.root
    preflight(root, cfg, trust_remote_code=trust_remote_code)
    build_zoo_task(cfg)
    units, planned = plan_task(cfg, root)
    paths, ran, seconds = extract_task(cfg, units, root, planned)
    result = aggregate_task(cfg, units, root, ran, planned, seconds)
    measured = {name: len(p.units) for name, p in planned.items()}
    return {**result, "features": len(paths), **({"step_units": measured} if measured else {})}, units


def step_flow(step: str, default_config: str, description: str):
    """The flow of one measuring analysis step (``knnlm``, ``hardness``): the scan-models body
    for a config whose analysis steps must include ``step``; its units are computed on Ray with
    the scan's."""

    def measuring_flow(config: str = default_config, root: str | None = None, trust_remote_code: bool = False,
                       overrides: list[str] | None = None) -> dict:
        return run_pipeline(load_config_task(config, overrides=overrides), root, trust_remote_code, needs=step)[0]

    measuring_flow.__name__ = measuring_flow.__qualname__ = step
    measuring_flow.__doc__ = (f"Scan ``config`` and run its analysis steps (which must include ``{step}``) into "
                              "``root`` (default: the config's root), every unit computed on Ray. ``overrides``: "
                              "``key.path=value`` changes to the config, as ``-o`` on the command line.")
    return flow(name=step, log_prints=True, description=description.strip().split("\n\n")[0])(measuring_flow)


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
