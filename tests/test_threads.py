"""Torch threads follow the CPU budget a process was given (dispersion.core.threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from dispersion.core.threads import CpuShare, cpu_budget, set_torch_threads


def test_budget_precedence(monkeypatch):
    monkeypatch.setenv("DISPERSION_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_budget() == (3, "DISPERSION_THREADS")
    monkeypatch.delenv("DISPERSION_THREADS")
    assert cpu_budget() == (1, "OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    monkeypatch.setenv("DISPERSION_THREADS", "0")
    assert cpu_budget() == (len(os.sched_getaffinity(0)), "CPUs available to this process")


def test_set_torch_threads_says_so_in_one_line(monkeypatch):
    before = torch.get_num_threads()
    lines: list[str] = []
    monkeypatch.setenv("DISPERSION_THREADS", "1")
    try:
        assert set_torch_threads(log=lines.append) == 1
        assert torch.get_num_threads() == 1
        assert lines == ["torch: 1 intra-op thread (DISPERSION_THREADS)"]
    finally:
        torch.set_num_threads(before)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _register(folder, pid: int, cpus: list[int], start: str | None = None) -> None:
    from dispersion.core.processes import start_time

    (folder / str(pid)).write_text(json.dumps({"start": start if start is not None else start_time(pid),
                                               "cpus": cpus}))


def test_side_by_side_processes_split_the_cpus(tmp_path):
    share = CpuShare(tmp_path, {0, 1, 2, 3})
    assert share.processes() == 1 and share.threads() == 4
    peer, other, gone = _sleeper(), _sleeper(), _sleeper()
    try:
        _register(tmp_path, peer.pid, [2, 3, 4])       # overlaps this process's CPUs: shares them
        _register(tmp_path, other.pid, [8, 9])         # other CPUs: not counted
        gone_pid = gone.pid
        _register(tmp_path, gone_pid, [0])
        gone.kill()
        gone.wait()
        _register(tmp_path, 4_000_000, [0])            # no such process
        assert share.processes() == 2 and share.threads() == 2
        assert not (tmp_path / str(gone_pid)).exists() and not (tmp_path / "4000000").exists()  # stale, removed
        _register(tmp_path, peer.pid, [0], start="1")  # a reused pid: another start time is not that process
        assert share.threads() == 4 and not (tmp_path / str(peer.pid)).exists()
        _register(tmp_path, peer.pid, [1])
        assert CpuShare(tmp_path, {1}).threads() == 1  # never fewer than one thread
        peer.kill()
        peer.wait()
        assert share.threads() == 4                    # left alone: the whole budget again
    finally:
        for p in (peer, other):
            p.kill()
            p.wait()
    share.leave()
    assert not share.path.exists()


def test_two_processes_without_a_budget_split_the_cpus_and_say_so(tmp_path):
    """Two real processes (no DISPERSION_THREADS / OMP_NUM_THREADS) on the same CPUs."""
    code = ("import sys, time; from dispersion.core import threads; threads.set_torch_threads(print); "
            "sys.stdout.flush(); time.sleep(float(sys.argv[1]))")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPERSION_THREADS", "OMP_NUM_THREADS")}
    env["TMPDIR"] = str(tmp_path)
    n = len(os.sched_getaffinity(0))
    first = subprocess.Popen([sys.executable, "-c", code, "60"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        s = "s" if n != 1 else ""
        assert first.stdout.readline().strip() == f"torch: {n} intra-op thread{s} (CPUs available to this process)"
        second = subprocess.run([sys.executable, "-c", code, "0"], env=env, capture_output=True, text=True,
                                timeout=120)
        m = max(1, n // 2)
        assert second.stdout.strip() == (f"torch: {m} intra-op thread{'s' if m != 1 else ''} (CPUs available to "
                                         "this process, shared with 1 other dispersion process)")
    finally:
        first.kill()
        first.wait()
    # the second removed its entry at exit; the killed first could not (a stale entry, ignored later)
    assert [p.name for p in (tmp_path / f"dispersion-cpu-{os.getuid()}").iterdir()] == [str(first.pid)]
