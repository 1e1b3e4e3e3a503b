"""Which processes of this host are alive: a pid together with its start time names one
process even after the pid is reused (leases and the CPU-share registry record both)."""

from __future__ import annotations

import os
from pathlib import Path


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, Linux), or "" where unknown; ``None``
    when no such process runs. With the pid it names one process even after pid reuse."""
    if os.path.exists("/proc/self/stat"):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except FileNotFoundError:
            return None
        except (OSError, IndexError):
            return ""
    try:  # no /proc (macOS): alive or not, no start time
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


def pid_namespace() -> str:
    """This process's pid namespace ("" where unknown): containers that share a host name
    (``--network host``) still see different pids, so a pid is only checked within its own."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def gone(pid: int, start: str | None) -> bool:
    """True when the process ``pid`` that started at ``start`` (as :func:`start_time` gave it;
    "" or None: unknown) no longer runs on this host: no such pid, or the pid now names a
    process that started at another time."""
    now = start_time(pid)
    return now is None or bool(now and start and now != start)
