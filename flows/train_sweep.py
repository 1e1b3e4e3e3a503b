"""The ``train-sweep`` flow: a grid (loss x lambda x learning rate x seed) of training runs
with dispersion losses, one Ray task per run, then the sweep tables (shaped like paper 001
Tables 2/13 and 002 Tables 2/4), condensation maps and a report."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dispersion.core.layout import result_path
from dispersion.core.preflight import preflight
from dispersion.core.storage import Store
from dispersion.training.sweep import SweepConfig, arms, load_sweep_config, publish


@task(name="load-sweep-config")
def load_sweep_config_task(path: str) -> SweepConfig:
    return load_sweep_config(path)


@task(name="train-on-ray", retries=1, retry_delay_seconds=10)
def train_task(cfg: SweepConfig) -> int:
    from tasks.ray_train import train_on_ray

    log = get_run_logger()
    ran = train_on_ray(cfg, arms(cfg), progress=lambda a, rel, t: log.info(f"done {a.describe()} ({t:.0f} s)"))
    log.info(f"{ran} training runs ran now, {len(arms(cfg)) - ran} were done already")
    return ran


@task(name="sweep-report", retries=1)
def report_task(cfg: SweepConfig, ran: int) -> dict:
    store = Store(cfg.root)
    out = publish(cfg, store, arms(cfg), log=get_run_logger().info)
    selected = store.read_table(result_path("sweep_selected", cfg.name)).to_pylist()
    key = f"train-sweep-{cfg.name}".lower().replace("_", "-").replace(".", "-")
    create_table_artifact(key=f"{key}-selected", table=[
        {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in selected],
        description="lambda chosen on validation, test perplexity vs baseline")
    create_markdown_artifact(key=f"{key}-summary", markdown=f"**{len(arms(cfg))} runs** ({ran} ran now), "
                             f"report: `{out['report']}`, catalog: `{out['catalog']}`")
    return {**out, "runs": len(arms(cfg)), "ran": ran}


@flow(name="train-sweep", log_prints=True)
def train_sweep(config: str = "configs/train-sweep.yaml") -> dict:
    """Train every arm of a dispersion-loss sweep (finished arms are skipped) and report.

    Args:
        config: Sweep config, a path or fsspec URL (see docs/TRAINING.md).
    """
    cfg = load_sweep_config_task(config)
    preflight(cfg.root, cfg)
    ran = train_task(cfg)
    return report_task(cfg, ran)
