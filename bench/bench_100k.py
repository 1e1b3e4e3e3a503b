"""The 100k-segment load test end to end (issue 22; ``make bench-scale``): the ``scan-models``
flow on local Ray over ``configs/scale-100k.yaml`` (a zoo model, 100k segments of 128 tokens of
a generated Zipf corpus), into a fresh root, then typical catalog queries.

Reported: wall time of the flow; peak RSS of the driver (the flow process) and of each Ray
worker process, sampled every 0.5 s over the process tree; the shards (count and bytes of
segments, features and vectors); the time of each catalog query (``dispersion.core.catalog``,
best of 3). Usage: python bench/bench_100k.py [--config configs/scale-100k.yaml] [--segments N] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERIES = {
    "count the segments": "SELECT count(*) FROM features",
    "perplexity quantiles": "SELECT quantile_cont(ppl, [0.1, 0.5, 0.9]) FROM features",
    "the bins of the run": "SELECT bins.pool, count(*), avg(mean_ppl), avg(dispersion) FROM bins GROUP BY ALL",
    "correlations with intervals": "SELECT pool, scope, spearman_r, ci_low, ci_high FROM correlations",
}


def watch(proc: subprocess.Popen, peaks: dict, stop: threading.Event) -> None:
    """Peak RSS of the driver and of every other process below it, by pid and name."""
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                rss, name = p.memory_info().rss, ("driver" if p.pid == proc.pid else p.name())
            except psutil.Error:
                continue
            key = (p.pid, name)
            peaks[key] = max(peaks.get(key, 0), rss)
        time.sleep(0.5)


def run_watched(args: list[str], env: dict, what: str) -> tuple[str, float, dict]:
    """Run ``python -m flows ARGS`` in the repo, watching its process tree (:func:`watch`):
    its output, wall seconds and peak RSS by (pid, name); one ``error:`` line and exit if it fails."""
    peaks: dict = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=watch, args=(proc, peaks, stop), daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join(5)
    if proc.returncode != 0:
        print(out[-5000:])
        sys.exit(f"error: {what} failed with status {proc.returncode}")
    return out, wall, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/scale-100k.yaml")
    ap.add_argument("--keep", action="store_true", help="keep the root (printed)")
    ap.add_argument("--segments", type=int, default=None,
                    help="scan this many segments instead (bins of segments/100: 100 bins, as at 100k)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scale-100k-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    print(f"load average {os.getloadavg()[0]:.2f} at start, {os.cpu_count()} CPUs; root {root}")
    overrides = [] if args.segments is None else [
        "-o", f"sampling.num_segments={args.segments}", "-o", f"analysis.bin_size={args.segments // 100}",
        "-o", f"sampling.shard_size={min(5000, args.segments // 4)}"]
    out, wall, peaks = run_watched(["scan-models", "--config", args.config, "--root", str(root), *overrides], env,
                                   "the flow")
    lines = [ln for ln in out.splitlines() if "extract:" in ln or "analysis" in ln or "bins" in ln]
    print("\n".join(lines[-8:]))
    print(f"\nflow wall time: {wall:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")
    driver = max(v for (pid, name), v in peaks.items() if name == "driver")
    workers = sorted(((v, name) for (pid, name), v in peaks.items() if name != "driver"), reverse=True)
    print(f"peak RSS: driver {driver / 2**20:.0f} MiB; largest other processes: "
          + ", ".join(f"{name} {v / 2**20:.0f} MiB" for v, name in workers[:6]))
    import pyarrow.parquet as pq

    n = sum(pq.ParquetFile(f).metadata.num_rows for f in (root / "features").rglob("*.parquet"))
    print(f"segments extracted: {n}")
    for part in ("segments", "features", "vectors"):
        files = list((root / part).rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        print(f"{part}: {len(files)} shards, {size / 2**20:.1f} MiB ({size / max(1, n):.0f} bytes a segment)")
    from dispersion.core.catalog import query
    from dispersion.core.storage import Store

    store = Store(str(root))
    for label, sql in QUERIES.items():
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            result = query(store, sql)
            best = min(best, time.perf_counter() - t)
        print(f"query '{label}': {best * 1000:.0f} ms ({sql})")
    print(result)
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
