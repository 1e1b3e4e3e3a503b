"""Run a flow from the shell with one-line errors:

    python -m flows scan-models --config configs/default.yaml [--root s3://bucket/prefix] [--trust-remote-code]
    python -m flows checkpoint-sweep --config C --model M (--revisions step1 step2 | --glob 'dir/step*')
    python -m flows train-sweep --config configs/train-sweep.yaml
    python -m flows knnlm --config configs/knnlm.yaml [--root R]
    python -m flows hardness --config configs/analyses.yaml [--root R] [-o analysis.hardness.query_sets=...]

Before Prefect and Ray start, :func:`dispersion.core.preflight.preflight` checks the config,
the consent for remote code and the root, as the ``dispersion`` commands do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dispersion.core.errors import DispersionError
from dispersion.core.overrides import CheckpointSweep
from tasks import STARTUP_SETTING

EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def preflight(config: str, root: str | None, trust_remote_code: bool = False, models: list[str] | None = None,
              datasets: list[str] | None = None, overrides: list[str] | None = None,
              sweep: CheckpointSweep | None = None) -> None:
    """Check what can be checked before Prefect and Ray start, so bad input gives one line:
    the config, the consent for remote code, the storage root (protocol, bucket,
    credentials, writable) and the Ray address."""
    from dispersion.config import load_config
    from dispersion.core.preflight import preflight as check

    cfg = load_config(config, models=models or (), datasets=datasets or (), overrides=overrides or (), sweep=sweep)
    check(root or cfg.root, cfg, trust_remote_code=trust_remote_code)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        from tasks.ray_units import check_reachable

        check_reachable(address)


def preflight_sweep(config: str) -> None:
    from dispersion.core.preflight import preflight as check
    from dispersion.training.sweep import load_sweep_config

    cfg = load_sweep_config(config)
    check(cfg.root, cfg)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        from tasks.ray_units import check_reachable

        check_reachable(address)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="flow", required=True)
    scan = sub.add_parser("scan-models", help="scan every model@revision of a config")
    sweep = sub.add_parser("checkpoint-sweep", help="one model over revisions or checkpoint folders")
    knn = sub.add_parser("knnlm", help="kNN-LM datastores on Ray, then the scan and its steps (knnlm)")
    hard = sub.add_parser("hardness", help="query sets measured on Ray, then the scan and its steps (hardness)")
    defaults = {knn: "configs/knnlm.yaml", hard: "configs/analyses.yaml"}
    for q in (scan, sweep, knn, hard):
        q.add_argument("--config", default=defaults.get(q, "configs/default.yaml"))
        q.add_argument("--root", default=None)
        q.add_argument("--trust-remote-code", action="store_true",
                       help="allow the config's trust_remote_code: true (runs code from a model's repository)")
        q.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="set one config field, value read as YAML (repeatable)")
    scan.add_argument("-m", "--model", dest="models", action="append", default=[], metavar="MODEL",
                      help="scan this model instead of the config's (repeatable): org/name@rev, zoo:NAME@all, ...")
    scan.add_argument("-d", "--dataset", dest="datasets", action="append", default=[], metavar="DATASET",
                      help="use this dataset instead of the config's (repeatable): embedded:prose, hf:PATH:...")
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
        models, datasets = getattr(args, "models", []), getattr(args, "datasets", [])
        sweep = (CheckpointSweep(args.model, args.revisions, args.checkpoint_glob)
                 if args.flow == "checkpoint-sweep" else None)
        preflight(args.config, args.root, args.trust_remote_code, models, datasets, args.overrides, sweep)
        if args.flow == "scan-models":
            from flows.scan_models import scan_models

            result = scan_models(args.config, args.root, trust_remote_code=args.trust_remote_code, models=models,
                                 datasets=datasets, overrides=args.overrides)
        elif args.flow == "knnlm":
            from flows.knnlm import knnlm

            result = knnlm(args.config, args.root, trust_remote_code=args.trust_remote_code, overrides=args.overrides)
        elif args.flow == "hardness":
            from flows.hardness import hardness

            result = hardness(args.config, args.root, trust_remote_code=args.trust_remote_code,
                              overrides=args.overrides)
        else:
            from flows.checkpoint_sweep import checkpoint_sweep

            result = checkpoint_sweep(args.config, args.model, args.revisions, args.checkpoint_glob, args.root,
                                      trust_remote_code=args.trust_remote_code, overrides=args.overrides)
    except DispersionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if EPHEMERAL_TIMEOUT not in str(err):
            raise
        print(f"error: the temporary Prefect API server did not start within "
              f"{os.environ.get(STARTUP_SETTING)} s; raise {STARTUP_SETTING} or point PREFECT_API_URL "
              f"at a running Prefect server", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
