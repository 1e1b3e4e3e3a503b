"""The ``hardness`` flow: paper 001 Sec. 3.1 / B.1 (hardness ranking and calibration by dispersion).

config -> zoo -> each model@revision's query sets measured as a Ray task (answers to the
embedded cloze, query embeddings and perplexities; published shards are read back, not
recomputed) -> the scan's plan, extraction and aggregate task, whose ``hardness`` step finds
every query shard published and slices, calibrates, ranks and reports (tables, figures, views).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from dispersion.config import RunConfig
from dispersion.core.errors import ConfigError
from dispersion.core.preflight import preflight
from tasks.steps import aggregate_task, build_zoo_task, extract_task, load_config_task, plan_task


@task(name="hardness-queries-on-ray", retries=1, retry_delay_seconds=10)
def hardness_queries_task(config: RunConfig, root: str) -> int:
    """Measure the query sets of the ``hardness`` step on Ray, one task per model@revision."""
    from tasks.ray_hardness import measure_on_ray

    log = get_run_logger()
    return measure_on_ray(config, root, log=log.info, progress=lambda m: log.info(
        f"done {m['unit']}: {m['sets']} query sets, {m['queries']} queries in {m['seconds']:.1f}s"))


@flow(name="hardness", log_prints=True)
def hardness(config: str = "configs/analyses.yaml", root: str | None = None, trust_remote_code: bool = False,
             overrides: list[str] | None = None) -> dict:
    """Measure the hardness step's query sets of ``config`` on Ray, then scan and run its
    analysis steps (which must include ``hardness``) into ``root`` (default: the config's root).
    ``overrides``: ``key.path=value`` changes to the config, as ``-o`` on the command line."""
    cfg = load_config_task(config, overrides=overrides)
    if not cfg.analysis.enabled("hardness"):
        raise ConfigError("analysis.steps: the hardness flow needs the hardness step")
    root = root or cfg.root
    preflight(root, cfg, trust_remote_code=trust_remote_code)
    build_zoo_task(cfg)
    measured = hardness_queries_task(cfg, root)
    units = plan_task(cfg, root)
    _, ran = extract_task(cfg, units, root)
    return {**aggregate_task(cfg, units, root, ran), "hardness_jobs": measured}
