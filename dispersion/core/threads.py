"""Torch's intra-op threads from the CPUs a process was given.

The budget, first found: ``DISPERSION_THREADS``; ``OMP_NUM_THREADS`` (Ray sets it from an
actor's or task's ``num_cpus``, ``make test`` to 1 per test worker); the CPUs this process may
run on (``os.sched_getaffinity``, which follows ``taskset``, cgroup cpusets and Slurm). Several
torch processes that each keep a thread per core oversubscribe a machine many times over (a
scan next to a test run ran 60x slower); each takes its own share instead.

When the budget is the CPUs available (no variable set), dispersion processes that run side by
side on those CPUs split them: each registers in a folder of live processes
(``$TMPDIR/dispersion-cpu-<uid>``, one small file per process, removed at exit; a file whose
process is gone is ignored and removed) and takes ``max(1, cpus // processes)`` threads, where
``processes`` counts those whose CPUs overlap its own. :func:`follow_share`, called between
batches and training steps, re-reads the folder (at most once a second), so a job that is left
alone takes the whole machine back. An explicit variable is never shared further: it is the
share the user or the scheduler chose.
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dispersion.core.processes import start_time

AFFINITY = "CPUs available to this process"
REFRESH_S = 1.0  # follow_share re-reads the registry at most this often


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
        return max(1, len(os.sched_getaffinity(0))), AFFINITY
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1), "CPUs of this machine"


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return set(range(os.cpu_count() or 1))


class CpuShare:
    """This process's entry in a folder of live dispersion processes, and its share of the CPUs.

    Args:
        folder: the registry (one file per process).
        cpus: the CPUs this process may run on.
    """

    def __init__(self, folder: Path, cpus: set[int]) -> None:
        self.folder, self.cpus, self.pid = folder, set(cpus), os.getpid()
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"start": start_time(self.pid) or "", "cpus": sorted(self.cpus)}
        tmp = self.folder / f".{self.pid}.tmp"
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, self.path)  # readers never see half an entry

    @property
    def path(self) -> Path:
        return self.folder / str(self.pid)

    def processes(self) -> int:
        """Live registered processes whose CPUs overlap this one's (itself included)."""
        n = 1
        for f in self.folder.iterdir():
            if not f.name.isdigit() or int(f.name) == self.pid:
                continue
            try:
                entry = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # removed or being replaced right now
            start = start_time(int(f.name))
            if start is None or (start and entry.get("start") and start != entry["start"]):
                f.unlink(missing_ok=True)  # its process is gone (or the pid was reused)
                continue
            if self.cpus & set(entry.get("cpus", [])):
                n += 1
        return n

    def threads(self) -> int:
        """``max(1, cpus // processes)``."""
        return max(1, len(self.cpus) // self.processes())

    def leave(self) -> None:
        self.path.unlink(missing_ok=True)


_share: CpuShare | None = None
_checked = 0.0


def registry() -> Path:
    """The folder of live dispersion processes of this user."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"dispersion-cpu-{uid}"


def _join() -> CpuShare:
    global _share
    if _share is None or _share.pid != os.getpid():  # a forked child registers itself
        _share = CpuShare(registry(), _cpus())
        atexit.register(_share.leave)
    return _share


def set_torch_threads(log: Callable[[str], None] | None = None) -> int:
    """Set torch's intra-op threads to :func:`cpu_budget` (shared with side-by-side dispersion
    processes when it is the CPUs available); says so in one line through ``log``."""
    import torch

    n, source = cpu_budget()
    if source == AFFINITY:
        share = _join()
        others = share.processes() - 1
        n = max(1, n // (others + 1))
        if others:
            source += f", shared with {others} other dispersion process{'es' if others != 1 else ''}"
    torch.set_num_threads(n)
    if log is not None:
        log(f"torch: {n} intra-op thread{'s' if n != 1 else ''} ({source})")
    return n


def follow_share() -> None:
    """Between batches or steps: take the current share of the CPUs (after
    :func:`set_torch_threads` registered this process; otherwise nothing). Cheap: the registry
    is read at most once a second."""
    global _checked
    if _share is None or _share.pid != os.getpid():
        return
    now = time.monotonic()
    if now - _checked < REFRESH_S:
        return
    _checked = now
    import torch

    n = _share.threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
