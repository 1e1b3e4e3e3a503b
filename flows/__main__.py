"""Run a flow from the shell with one-line errors:

    python -m flows scan-models --config configs/default.yaml [--root s3://bucket/prefix]
    python -m flows checkpoint-sweep --config C --model M (--revisions step1 step2 | --glob 'dir/step*')
    python -m flows train-sweep --config configs/train-sweep.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dispersion.core.errors import DispersionError


def preflight(config: str, root: str | None) -> None:
    """Check what can be checked before Prefect and Ray start, so bad input gives one line:
    the config, the storage root (bucket, credentials) and the Ray address."""
    from dispersion.config import load_config
    from dispersion.core.storage import Store

    cfg = load_config(config)
    Store(root or cfg.root).check()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        from tasks.ray_extract import _check_reachable

        _check_reachable(address)


def preflight_sweep(config: str) -> None:
    from dispersion.core.storage import Store
    from dispersion.training.sweep import load_sweep_config

    cfg = load_sweep_config(config)
    Store(cfg.root).check()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        from tasks.ray_extract import _check_reachable

        _check_reachable(address)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="flow", required=True)
    scan = sub.add_parser("scan-models", help="scan every model@revision of a config")
    sweep = sub.add_parser("checkpoint-sweep", help="one model over revisions or checkpoint folders")
    for q in (scan, sweep):
        q.add_argument("--config", default="configs/default.yaml")
        q.add_argument("--root", default=None)
    train = sub.add_parser("train-sweep", help="a grid of training runs with dispersion losses")
    train.add_argument("--config", default="configs/train-sweep.yaml")
    sweep.add_argument("--model", required=True)
    group = sweep.add_mutually_exclusive_group(required=True)
    group.add_argument("--revisions", nargs="+")
    group.add_argument("--glob", dest="checkpoint_glob")
    args = p.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        if args.flow == "train-sweep":
            preflight_sweep(args.config)
            from flows.train_sweep import train_sweep

            print(json.dumps(train_sweep(args.config), indent=1))
            return 0
        preflight(args.config, args.root)
        if args.flow == "scan-models":
            from flows.scan_models import scan_models

            result = scan_models(args.config, args.root)
        else:
            from flows.checkpoint_sweep import checkpoint_sweep

            result = checkpoint_sweep(args.config, args.model, args.revisions, args.checkpoint_glob, args.root)
    except DispersionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
