"""Cost against the number of checkpoints (issue 22, item 3): the ``checkpoint-sweep`` flow on
local Ray over 10, 30 and 100 checkpoints of one zoo model.

A zoo gpt2-tiny trained for 297 steps with a checkpoint every 3 steps (100 checkpoint folders,
built once into ``--cache``); per run a fresh root, one dataset (embedded prose, validation),
``--segments`` segments of 128 tokens per checkpoint, 10 bins, the ``gap`` step (paper 001
Sec. 3.2, every checkpoint's embedding gap); the sweep scans each checkpoint, bins and
correlates it, runs the steps and the report, then writes the trajectory table and the catalog. Reported per run:
wall time, seconds a checkpoint, peak RSS of the driver and of the largest Ray worker (sampled
every 0.5 s, as ``bench/bench_100k.py``). Usage:
python bench/bench_checkpoints.py [--cache /tmp/zoo-ckpt100] [--segments 500] [--counts 10,30,100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_100k import run_watched  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="/tmp/zoo-ckpt100")
    ap.add_argument("--segments", type=int, default=500)
    ap.add_argument("--counts", default="10,30,100")
    args = ap.parse_args()
    from dispersion.core.config import ZooSpec
    from dispersion.training.zoo import build_zoo

    steps = list(range(0, 298, 3))  # 100 checkpoints: step0 .. step297, the last the end of training
    zoo = ZooSpec(cache=args.cache, train_steps=297, checkpoints=steps)
    t = time.perf_counter()
    build_zoo(zoo, names=["gpt2-tiny"], progress=False)
    print(f"zoo of {len(steps)} checkpoints ready in {time.perf_counter() - t:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    print("| checkpoints | flow wall s | s a checkpoint | driver peak RSS MiB | largest actor MiB | load at end |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in [int(c) for c in args.counts.split(",")]:
        revs = [f"step{s}" for s in steps[:: len(steps) // k][:k]]
        root = Path(tempfile.mkdtemp(prefix=f"ckpt{k}-"))
        cfg = root.parent / f"{root.name}.json"
        cfg.write_text(json.dumps({
            "name": f"ckpt{k}", "root": str(root), "models": [{"name": "gpt2-tiny", "zoo": "gpt2-tiny"}],
            "datasets": [{"name": "prose", "embedded": "prose", "split": "validation"}],
            "sampling": {"num_segments": args.segments, "segment_length": 128, "shard_size": args.segments},
            "extraction": {"layers": ["final"], "pools": ["last"], "batch_size": 64},
            "analysis": {"bin_size": args.segments // 10, "select_bins": 5, "steps": ["gap"]},
            "zoo": zoo.model_dump()}))
        _, wall, peaks = run_watched(["checkpoint-sweep", "--config", str(cfg), "--model", "gpt2-tiny",
                                      "--revisions", *revs], env, f"the sweep over {k} checkpoints")
        driver = max(v for (_, name), v in peaks.items() if name == "driver")
        actor = max((v for (_, name), v in peaks.items() if name.startswith("ray::")), default=0)
        print(f"| {k} | {wall:.0f} | {wall / k:.2f} | {driver / 2**20:.0f} | {actor / 2**20:.0f} | "
              f"{os.getloadavg()[0]:.2f} |", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        cfg.unlink()


if __name__ == "__main__":
    main()
