"""Torch threads follow the CPU budget a process was given (dispersion.core.threads)."""

from __future__ import annotations

import os

import torch

from dispersion.core.threads import cpu_budget, set_torch_threads


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
