"""Torch's intra-op threads from the CPUs a process was given.

The budget, first found: ``DISPERSION_THREADS``; ``OMP_NUM_THREADS`` (Ray sets it from an
actor's or task's ``num_cpus``, ``make test`` to 1 per test worker); the CPUs this process may
run on (``os.sched_getaffinity``, which follows ``taskset``, cgroup cpusets and Slurm). Several
torch processes that each keep a thread per core oversubscribe a machine many times over (a
scan next to a test run ran 60x slower); each takes its own share instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def cpu_budget() -> tuple[int, str]:
    """(threads, where the number comes from)."""
    for var in ("DISPERSION_THREADS", "OMP_NUM_THREADS"):
        raw = os.environ.get(var, "").strip()
        if raw:
            try:
                n = int(float(raw))
            except ValueError:
                continue
            if n >= 1:
                return n, var
    try:
        return max(1, len(os.sched_getaffinity(0))), "CPUs available to this process"
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1), "CPUs of this machine"


def set_torch_threads(log: Callable[[str], None] | None = None) -> int:
    """Set torch's intra-op threads to :func:`cpu_budget`; says so in one line through ``log``."""
    import torch

    n, source = cpu_budget()
    torch.set_num_threads(n)
    if log is not None:
        log(f"torch: {n} intra-op thread{'s' if n != 1 else ''} ({source})")
    return n
