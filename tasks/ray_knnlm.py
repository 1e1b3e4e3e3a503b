"""Ray work for the ``knnlm`` step: one Ray task per datastore or evaluation shard
(:class:`dispersion.measure.knnlm.KnnUnit`).

The driver plans (window samples are drawn and published there, once); each task loads its
model@revision, computes one shard and publishes its files and then its done marker, and
returns the marker (small): the keys stay in storage. A task that dies is retried
(``ray.max_restarts``); a retried or repeated task finds the marker and returns at once, so a
crash never duplicates or loses a shard. Afterwards the step (in the flow's aggregate task)
finds every shard published and only searches and scores.
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from dispersion.config import RunConfig
from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from dispersion.measure.knnlm import KnnUnit
from tasks.ray_extract import run_tasks


@ray.remote
def _build_unit(root: str, unit: KnnUnit, bos: int | None) -> dict:


    from dispersion.measure.knnlm import run_unit, unit_done
    from dispersion.measure.modeling import load_model, resolve_device

    set_torch_threads()  # OMP_NUM_THREADS: this task's num_cpus (runtime_env)
    store = Store(root)
    if unit_done(store, unit, log=lambda m: None):
        return store.read_json(unit.marker_rel) or {}
    model = load_model(unit.mr.source, dtype=unit.spec.dtype, device=resolve_device(unit.spec.device),
                       field=unit.mr.field)
    return run_unit(store, unit, model, bos)


def build_on_ray(config: RunConfig, root: str, progress: Callable[[dict], None] | None = None,
                 log: Callable[[str], None] = print) -> int:
    """Plan the ``knnlm`` step of ``config`` and build every shard not yet published as a Ray
    task (``ray.num_cpus`` / ``ray.num_gpus`` each); returns how many ran now."""
    from dispersion.analyses.knnlm import plan
    from dispersion.measure.knnlm import unit_done

    store = Store(root)
    plans = plan(config, store, config.analysis.knnlm, log=log)
    pending: list[tuple[KnnUnit, int | None]] = [(u, p.bos) for p in plans for u in p.units
                                                 if not unit_done(store, u, log)]
    if not pending:
        return 0
    run_tasks(_build_unit, [(root, u, bos) for u, bos in pending], config.ray, "kNN-LM shard", progress)
    return len(pending)
