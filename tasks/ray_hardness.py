"""Ray work for the ``hardness`` step: one Ray task per model@revision
(:class:`dispersion.analyses.hardness.QueryJob`) measures its query sets.

The driver plans (cloze sets built, query files read, once); each task loads its model only if
a shard is missing, measures and publishes every missing shard (data first, done marker last)
and returns a small summary. A task that dies is retried (``ray.max_restarts``); a retried or
repeated task reads back the shards already published, so a crash never duplicates or loses
one. Afterwards the step (in the flow's aggregate task) reads every shard back and only
slices, calibrates and ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

from dispersion.config import RunConfig
from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from tasks.ray_extract import run_tasks


@ray.remote
def _measure(root: str, job) -> dict:  # job: dispersion.analyses.hardness.QueryJob
    from dispersion.analyses.hardness import measure_job

    set_torch_threads()  # OMP_NUM_THREADS: this task's num_cpus (runtime_env)
    t0 = time.perf_counter()
    out = measure_job(Store(root), job, log=lambda m: None)
    return {"unit": f"{job.mr.model}@{job.mr.revision}", "sets": len(out),
            "queries": sum(t.num_rows for *_, t in out), "seconds": time.perf_counter() - t0}


def measure_on_ray(config: RunConfig, root: str, progress: Callable[[dict], None] | None = None,
                   log: Callable[[str], None] = print) -> int:
    """Plan the ``hardness`` step of ``config`` and measure each model@revision's query sets as
    a Ray task (``ray.num_cpus`` / ``ray.num_gpus`` each); returns how many tasks ran."""
    from dispersion.analyses.hardness import plan_jobs

    jobs = [j for j in plan_jobs(config, config.analysis.hardness) if j.sets]
    if not jobs:
        return 0
    run_tasks(_measure, [(root, j) for j in jobs], config.ray, "query measurement", progress)
    log(f"hardness: {len(jobs)} model revisions measured on Ray")
    return len(jobs)
