"""Run the main job and every analysis at two commits and compare every results table.

    .venv/bin/python scripts/compare_commits.py OLD NEW [--config configs/default.yaml ...]
    .venv/bin/python scripts/compare_commits.py --roots ROOT_A ROOT_B     # compare two finished roots

Each commit is checked out into a temporary git worktree and run with this checkout's
virtual environment (``PYTHONPATH`` points at the worktree); both share one zoo cache
folder, so a zoo that both commits key alike is trained once. Then, for every table under
``results/`` (and the catalog's views): the same Parquet schema, the same rows (sorted by
their non-float columns), floats equal to ``--rtol``. Exit status 0 when all agree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def run_commit(commit: str, work: Path, configs: list[str], zoo_cache: Path) -> Path:
    tree = work / f"tree-{commit[:10]}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True,
                       capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    (tree / ".cache").mkdir(exist_ok=True)
    link = tree / ".cache" / "zoo"
    if not link.exists():
        link.symlink_to(zoo_cache, target_is_directory=True)
    for cfg in configs:
        print(f"[{commit[:10]}] dispersion scan --config {cfg}", flush=True)
        subprocess.run([sys.executable, "-m", "dispersion.cli", "scan", "--no-progress", "--config", cfg],
                       cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return tree / "runs"


def _sorted(t: pa.Table) -> pa.Table:
    keys = [f.name for f in t.schema if pa.types.is_string(f.type) or pa.types.is_integer(f.type)
            or pa.types.is_boolean(f.type)]
    return t.sort_by([(k, "ascending") for k in keys]) if keys else t


def compare_tables(a: pa.Table, b: pa.Table, rtol: float) -> list[str]:
    if a.schema != b.schema:
        return [f"schema differs:\n    {a.schema}\n    {b.schema}"]
    if a.num_rows != b.num_rows:
        return [f"{a.num_rows} vs {b.num_rows} rows"]
    a, b = _sorted(a), _sorted(b)
    out = []
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        t = a.schema.field(name).type
        if pa.types.is_floating(t):
            xa = x.to_numpy(zero_copy_only=False).astype(np.float64)
            ya = y.to_numpy(zero_copy_only=False).astype(np.float64)
            if not np.allclose(xa, ya, rtol=rtol, atol=0, equal_nan=True):
                bad = ~np.isclose(xa, ya, rtol=rtol, atol=0, equal_nan=True)
                out.append(f"{name}: {int(bad.sum())} values differ (first {xa[bad][0]!r} vs {ya[bad][0]!r})")
        elif not x.equals(y):
            out.append(f"{name}: values differ")
    return out


def compare_roots(a: Path, b: Path, rtol: float) -> int:
    failures = 0
    tables = 0
    for fa in sorted(a.rglob("results/*/*.parquet")):
        rel = fa.relative_to(a)
        fb = b / rel
        if not fb.exists():
            print(f"MISSING in new: {rel}")
            failures += 1
            continue
        problems = compare_tables(pq.read_table(fa), pq.read_table(fb), rtol)
        tables += 1
        for p in problems:
            print(f"DIFF {rel}: {p}")
        failures += bool(problems)
    for fb in sorted(b.rglob("results/*/*.parquet")):
        if not (a / fb.relative_to(b)).exists():
            print(f"NEW table (not in old): {fb.relative_to(b)}")
    for ca in sorted(a.rglob("catalog.duckdb")):
        cb = b / ca.relative_to(a)
        views = []
        for c in (ca, cb):
            con = duckdb.connect(str(c), read_only=True)
            views.append(sorted(r[0] for r in con.sql("SELECT view_name FROM duckdb_views() "
                                                       "WHERE NOT internal").fetchall()))
            con.close()
        missing = sorted(set(views[0]) - set(views[1]))
        if missing:
            print(f"VIEWS missing in {cb.relative_to(b)}: {missing}")
            failures += 1
        extra = sorted(set(views[1]) - set(views[0]))
        if extra:
            print(f"views added in {cb.relative_to(b)}: {extra}")
    print(f"{tables} tables compared, {failures} differ")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commits", nargs="*")
    ap.add_argument("--roots", nargs=2, type=Path)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--rtol", type=float, default=1e-9)
    args = ap.parse_args()
    if args.roots:
        return compare_roots(*args.roots, rtol=args.rtol)
    if len(args.commits) != 2:
        ap.error("give two commits, or --roots A B")
    configs = args.config or ["configs/default.yaml", "configs/analyses.yaml"]
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        work = Path(tmp)
        zoo = work / "zoo"
        zoo.mkdir()
        try:
            roots = [run_commit(c, work, configs, zoo) for c in args.commits]
            return compare_roots(*roots, rtol=args.rtol)
        finally:
            for c in args.commits:
                subprocess.run(["git", "worktree", "remove", "--force", str(work / f"tree-{c[:10]}")], cwd=REPO,
                               capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
