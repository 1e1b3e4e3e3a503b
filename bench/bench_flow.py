"""The embedded scan through the ``scan-models`` flow with local Ray vs in process: same work,
fresh roots, one run, wall-time ratio (target <= 1.3 on a scan of two minutes or more).

Usage: python bench/bench_flow.py [--config configs/default.yaml] [--layers-all]
The zoo is built first (not timed). Both runs include planning, sampling, extraction,
aggregation, report and catalog; the flow run also starts Prefect (ephemeral) and Ray.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--layers-all", action="store_true", help="every layer and site (a longer scan)")
    p.add_argument("--add-zoo-model", action="append", default=[], help="scan this zoo model too (e.g. gpt2-small)")
    args = p.parse_args()

    import yaml

    from dispersion.config import parse_config
    from dispersion.run import prepare_models, run_scan

    with open(args.config) as fh:
        raw = yaml.safe_load(fh)
    if args.layers_all:
        raw["extraction"] = {**raw.get("extraction", {}), "layers": ["all"], "sites": ["block", "attn", "mlp"]}
    for name in args.add_zoo_model:
        raw["models"].append({"name": name, "zoo": name, "revisions": "all"})
    tmp = tempfile.mkdtemp(prefix="bench-flow-")
    os.environ.setdefault("PREFECT_HOME", os.path.join(tmp, "prefect"))
    cfg_path = os.path.join(tmp, "cfg.yaml")
    with open(cfg_path, "w") as fh:
        yaml.safe_dump(raw, fh)
    cfg = parse_config(raw)
    prepare_models(cfg, progress=False)

    t = time.perf_counter()
    res = run_scan(cfg, root=os.path.join(tmp, "inproc"), progress=False, log=lambda *_: None)
    t_in = time.perf_counter() - t

    from flows.scan_models import scan_models

    t = time.perf_counter()
    out = scan_models(cfg_path, os.path.join(tmp, "flow"))
    t_flow = time.perf_counter() - t
    assert out["ran"] == res.stats.ran, (out, res.stats)
    segs = res.stats.segments
    print("\n| run | work units | segments | wall s | segments/s |\n|---|---:|---:|---:|---:|")
    print(f"| in process | {res.stats.ran} | {segs} | {t_in:.1f} | {segs / t_in:.1f} |")
    print(f"| scan-models flow, local Ray | {out['ran']} | {segs} | {t_flow:.1f} | {segs / t_flow:.1f} |")
    print(f"\nratio flow / in-process: {t_flow / t_in:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
