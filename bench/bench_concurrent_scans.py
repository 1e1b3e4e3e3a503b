"""Two scans at once on one machine: each one's wall time against the same scan alone.

Usage: python bench/bench_concurrent_scans.py [--config configs/default.yaml] [-o key=value ...]
       [--threads-each N]

Runs ``dispersion scan`` (a fresh root under a temporary folder each time, the model caches in
``.cache`` shared and warm) once alone, then twice at the same time, and prints each run's wall
seconds and its ratio to the run alone. On C cores two CPU-bound jobs can at best each take 2x
(C = 2); a ratio far above that means the two processes fight over threads. ``--threads-each``
sets ``DISPERSION_THREADS`` for the concurrent pair (default: unset, each process takes the CPUs
it may run on, split with the other dispersion processes on them, as a user starting two jobs
would get). Check the machine is quiet first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / ".venv" / "bin" / "dispersion") if (REPO / ".venv" / "bin" / "dispersion").exists() else "dispersion"


def start(config: str, root: Path, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [CLI, "scan", "--config", config, "-o", f"root={root}"]
    for o in overrides:
        cmd += ["-o", o]
    log = open(f"{root}.log", "w")  # a file, not a pipe: a full pipe would stall the scan
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait(procs: list[subprocess.Popen], t0: float) -> list[float]:
    """Each process's own wall time (polled, so one that ends first is timed when it ends)."""
    ends: dict[int, float] = {}
    while len(ends) < len(procs):
        for k, p in enumerate(procs):
            if k not in ends and p.poll() is not None:
                ends[k] = time.perf_counter() - t0
                if p.returncode != 0:
                    root = p.args[p.args.index("-o") + 1].removeprefix("root=")
                    lines = Path(f"{root}.log").read_text().strip().splitlines() or [""]
                    sys.exit(f"error: scan failed ({p.returncode}): {lines[-1]}")
        time.sleep(0.5)
    return [ends[k] for k in range(len(procs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("-o", dest="overrides", action="append", default=[])
    ap.add_argument("--threads-each", type=int, default=None)
    ap.add_argument("--alone", type=float, default=None,
                    help="seconds of the run alone from an earlier run on this machine (skips it)")
    args = ap.parse_args()
    env = dict(os.environ)
    env.pop("DISPERSION_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    pair_env = dict(env)
    if args.threads_each:
        pair_env["DISPERSION_THREADS"] = str(args.threads_each)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.config} {' '.join(args.overrides)}")
    with tempfile.TemporaryDirectory(prefix="concurrent-") as tmp:
        alone = args.alone
        if alone is None:
            t0 = time.perf_counter()
            alone = wait([start(args.config, Path(tmp) / "alone", args.overrides, env)], t0)[0]
        t0 = time.perf_counter()
        both = wait([start(args.config, Path(tmp) / f"pair{k}", args.overrides, pair_env) for k in (1, 2)], t0)
    each = f"DISPERSION_THREADS={args.threads_each}" if args.threads_each else "default (CPUs available, shared)"
    print("\n| run | threads | wall s | vs alone |")
    print("|---|---|---:|---:|")
    print(f"| alone | default (CPUs available) | {alone:.1f} | 1.00x |")
    for k, t in enumerate(both, 1):
        print(f"| concurrent {k} of 2 | {each} | {t:.1f} | {t / alone:.2f}x |")


if __name__ == "__main__":
    main()
