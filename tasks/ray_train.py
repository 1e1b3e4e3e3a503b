"""Ray work for training sweeps: one Ray task per arm (dispersion.training.sweep.run_arm).

Each task asks for ``ray.num_cpus`` / ``ray.num_gpus`` of the sweep config and runs one
training run with ``OMP_NUM_THREADS`` set to its CPUs; it returns the path of the arm's
published table (small), never weights. A task that dies is retried (``max_restarts``); the
trainer resumes from the arm's newest checkpoint and a published arm is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from dispersion.training.sweep import Arm, SweepConfig, arm_rel, run_arm
from tasks.ray_units import connect, gather, ray_options


@ray.remote
def _train_arm(config_json: str, arm: Arm) -> str:


    set_torch_threads()  # OMP_NUM_THREADS: this task's num_cpus (runtime_env)
    cfg = SweepConfig.model_validate_json(config_json)
    return run_arm(cfg, arm, Store(cfg.root), log=lambda m: None)


def train_on_ray(cfg: SweepConfig, arms: list[Arm], progress: Callable[[Arm, str, float], None] | None = None) -> int:
    """Run every arm not yet published as a Ray task; returns how many ran now."""
    store = Store(cfg.root)
    pending = [a for a in arms if not store.exists(arm_rel(cfg, a))]
    if not pending:
        return 0
    started = connect(cfg.ray)
    spec = cfg.ray
    task = _train_arm.options(**ray_options(spec, actor=False))
    payload = cfg.model_dump_json()
    refs = {task.remote(payload, a): a for a in pending}
    t0 = time.perf_counter()
    try:
        for ref, rel in gather(list(refs), spec, "training run"):
            if progress is not None:
                progress(refs[ref], rel, time.perf_counter() - t0)
    finally:
        if started:
            ray.shutdown()
    return len(pending)
