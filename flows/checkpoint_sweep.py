"""The ``checkpoint-sweep`` flow: one model over a list of revisions (hub ``stepN`` branches)
or a glob of local checkpoint folders. Only checkpoints not yet extracted are computed;
the trajectory (perplexity and dispersion per revision) is published as a table."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from dispersion.analyses.trajectory import trajectory
from dispersion.config import RunConfig
from dispersion.core.layout import result_path
from dispersion.core.overrides import CheckpointSweep
from dispersion.core.storage import Store
from dispersion.measure.scan import WorkUnit
from flows.scan_models import run_pipeline


@task(name="trajectory")
def trajectory_task(cfg: RunConfig, units: list[WorkUnit], root: str) -> str:
    store = Store(root)
    a = cfg.analysis
    rel = result_path("trajectory", cfg.name)
    if a.enabled("trajectory") and store.exists(rel):  # the analysis step has just written it
        table = store.read_table(rel)
    else:
        table = trajectory(store, units, layer=str(a.layer), site=a.site, pool=a.pool)
        store.write_table(rel, table)
    key = f"trajectory-{cfg.name}".lower().replace("_", "-").replace(".", "-")
    create_table_artifact(key=key, table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                          for r in table.to_pylist()],
                          description=f"perplexity and dispersion along {cfg.models[0].name}'s checkpoints")
    return store.url(rel)


@flow(name="checkpoint-sweep", log_prints=True)
def checkpoint_sweep(config: str, model: str, revisions: list[str] | None = None,
                     checkpoint_glob: str | None = None, root: str | None = None,
                     trust_remote_code: bool = False, overrides: list[str] | None = None) -> dict:
    """Scan one model of a run config at many checkpoints, then its trajectory table.

    Args:
        config: Run config, a path or fsspec URL.
        model: The config's model to sweep (its ``name``).
        revisions: Checkpoints to scan, e.g. ``["step1000", "step2000"]`` (hub revisions or
            sub-folders of a local model).
        checkpoint_glob: Instead of ``revisions``: a glob of checkpoint folders
            (``/ckpt/run1/step*``); each match is one revision.
        root: Store root (default: the config's root).
        trust_remote_code: As for ``scan-models``.
        overrides: ``key.path=value`` changes to the config (value read as YAML).
    """
    result, cfg, units = run_pipeline(config, root, trust_remote_code, overrides=overrides,
                                      sweep=CheckpointSweep(model, revisions, checkpoint_glob))
    root = root or cfg.root
    result["trajectory"] = trajectory_task(cfg, units, root)
    from dispersion.core.catalog import build_catalog

    result["catalog"] = build_catalog(Store(root))
    return result
