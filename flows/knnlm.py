"""The ``knnlm`` flow: paper 001 Sec. 3.3 measured with a real kNN-LM.

config -> zoo -> kNN-LM datastores and evaluation passes as Ray tasks (one per shard, skipping
published ones) -> the scan's plan, extraction and aggregate task, whose ``knnlm`` step finds
every shard published and searches, scores and reports (tables, figures, catalog views).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from dispersion.config import RunConfig
from dispersion.core.errors import ConfigError
from dispersion.core.preflight import preflight
from tasks.steps import aggregate_task, build_zoo_task, extract_task, load_config_task, plan_task


@task(name="knnlm-shards-on-ray", retries=1, retry_delay_seconds=10)
def knnlm_shards_task(config: RunConfig, root: str) -> int:
    """Build the pending datastore and evaluation shards of the ``knnlm`` step on Ray."""
    from tasks.ray_knnlm import build_on_ray

    log = get_run_logger()
    ran = build_on_ray(config, root, progress=lambda m: log.info(f"done {m.get('unit')} in {m.get('seconds', 0):.1f}s"),
                       log=log.info)
    log.info(f"knnlm: {ran} shards built now")
    return ran


@flow(name="knnlm", log_prints=True)
def knnlm(config: str = "configs/knnlm.yaml", root: str | None = None, trust_remote_code: bool = False,
          overrides: list[str] | None = None) -> dict:
    """Build the kNN-LM shards of ``config`` on Ray, then scan and run its analysis steps (which
    must include ``knnlm``) into ``root`` (default: the config's root). ``overrides``:
    ``key.path=value`` changes to the config, as ``-o`` on the command line."""
    cfg = load_config_task(config, overrides=overrides)
    if not cfg.analysis.enabled("knnlm"):
        raise ConfigError("analysis.steps: the knnlm flow needs the knnlm step")
    root = root or cfg.root
    preflight(root, cfg, trust_remote_code=trust_remote_code)
    build_zoo_task(cfg)
    shards = knnlm_shards_task(cfg, root)
    units = plan_task(cfg, root)
    _, ran = extract_task(cfg, units, root)
    return {**aggregate_task(cfg, units, root, ran), "knnlm_shards": shards}
