"""``dispersion query`` is read-only in effect: one SELECT over the catalog's views, no file
written anywhere, no file read outside the store, no setting changed (docs/GUARANTEES.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from dispersion.core.catalog import build_catalog, query
from dispersion.core.errors import DataError
from dispersion.core.storage import Store

REPO = Path(__file__).resolve().parents[1]
SHARD = "features/model=m/revision=main/dataset=d/sample=s1/spec=x1/shard-00000.parquet"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small store: segments, one features shard, a bins result, and its catalog."""
    path = tmp_path_factory.mktemp("catalog") / "store"
    store = Store(str(path))
    store.write_table("segments/dataset=d/sample=s1/shard-00000.parquet",
                      pa.table({"segment_id": [0, 1, 2], "text": ["a", "b", "c"]}))
    store.write_table(SHARD, pa.table({"segment_id": [0, 1, 2], "ppl": [1.5, 2.5, 3.5]}))
    store.write_table("results/bins/default.parquet", pa.table({"bin": [0, 1], "dispersion": [0.25, 0.5]}))
    build_catalog(store)
    return path


def _files(*dirs: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in d.rglob("*") if p.is_file()}


def _cli(root: Path, sql: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dispersion.cli", "query", "--root", str(root), sql],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_the_views_answer_queries(root, tmp_path):
    store = Store(str(root))
    assert query(store, "SELECT count(*) AS n FROM segments").to_pylist() == [{"n": 3}]
    got = query(store, "SELECT model, revision, sum(ppl) AS s FROM features GROUP BY ALL").to_pylist()
    assert got == [{"model": "m", "revision": "main", "s": 7.5}]
    assert query(store, "SELECT max(dispersion) AS d FROM bins").to_pylist() == [{"d": 0.5}]
    assert {r["name"] for r in query(store, "SHOW TABLES").to_pylist()} >= {"segments", "features", "bins"}
    assert query(store, "DESCRIBE bins").num_rows == 2
    # a file inside the store can be read directly
    assert query(store, f"SELECT count(*) AS n FROM read_parquet('{root}/{SHARD}')").to_pylist() == [{"n": 3}]
    out = _cli(root, "WITH f AS (SELECT * FROM features) SELECT count(*) AS rows FROM f", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "rows" in out.stdout and "3" in out.stdout


def _forbidden(root: Path, outside: Path) -> list[tuple[str, str]]:
    shard = root / SHARD
    return [
        ("copy-out", f"COPY (SELECT 1 AS x) TO '{outside}/out.csv'"),
        ("copy-over-shard", f"COPY (SELECT 1 AS x) TO '{shard}' (FORMAT parquet)"),
        ("copy-into-store", f"COPY (SELECT 1 AS x) TO '{root}/new.csv'"),
        ("attach", f"ATTACH '{outside}/w.duckdb' AS w (READ_WRITE)"),
        ("attach-create", f"ATTACH '{outside}/w.duckdb' AS w (READ_WRITE); CREATE TABLE w.t AS SELECT 1 AS x"),
        ("export", f"EXPORT DATABASE '{outside}/export'"),
        ("read_csv", "SELECT * FROM read_csv('/etc/passwd')"),
        ("read_text", "SELECT * FROM read_text('/etc/hostname')"),
        ("glob", "SELECT * FROM glob('/root/*')"),
        ("read-beside", f"SELECT * FROM read_text('{root}/../secret.txt')"),
        ("install", "INSTALL httpfs"),
        ("load", "LOAD httpfs"),
        ("set", "SET enable_external_access = true"),
        ("set-threads", "SET threads = 1"),
        ("pragma", f"PRAGMA profiling_output = '{root}/profile.json'"),
        ("explain-analyze-copy", f"EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{outside}/ea.csv'"),
        ("two-selects", "SELECT 1; SELECT 2"),
        ("select-then-copy", f"SELECT 1; COPY (SELECT 1 AS x) TO '{outside}/two.csv'"),
        ("empty", "  ;  "),
    ]


@pytest.mark.parametrize("case", [name for name, _ in _forbidden(Path("/r"), Path("/o"))])
def test_forbidden_statements_fail_in_one_line_and_write_nothing(root, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root.parent / "secret.txt").write_text("s3cr3t-content\n")
    sql = dict(_forbidden(root, outside))[case]
    before = _files(root, outside)
    out = _cli(root, sql, cwd=outside)
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: query: "), out.stderr
    assert "s3cr3t-content" not in out.stdout + out.stderr and "root:x:" not in out.stdout + out.stderr
    assert _files(root, outside) == before  # no file created, none rewritten


def test_the_error_names_what_was_refused(root):
    store = Store(str(root))
    with pytest.raises(DataError, match=r"^query: read-only: only a SELECT is allowed \(got COPY\)$"):
        query(store, f"COPY (SELECT 1) TO '{root}/x.csv'")
    with pytest.raises(DataError, match=r"^query: exactly one SQL statement is allowed \(got 2\)$"):
        query(store, "SELECT 1; SELECT 2")
    with pytest.raises(DataError, match=r"^query: Permission Error: .*/etc/passwd"):
        query(store, "SELECT * FROM read_csv('/etc/passwd')")


def test_an_s3_store_is_queried_in_the_same_sandbox_and_leaves_no_temporary_file(s3, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    store = Store("s3://dispersion-test/catalog")
    store.write_table("results/bins/default.parquet", pa.table({"bin": [0, 1], "dispersion": [0.25, 0.5]}))
    Store("s3://dispersion-test/elsewhere").write_table("results/bins/x.parquet", pa.table({"bin": [9]}))
    build_catalog(store)
    assert query(store, "SELECT max(dispersion) AS d FROM bins").to_pylist() == [{"d": 0.5}]
    with pytest.raises(DataError, match="Permission Error"):
        query(store, "SELECT * FROM read_parquet('s3://dispersion-test/elsewhere/results/bins/x.parquet')")
    with pytest.raises(DataError, match=r"only a SELECT is allowed \(got COPY\)"):
        query(store, "COPY (SELECT 1) TO 's3://dispersion-test/catalog/x.csv'")
    assert list(temp.iterdir()) == []
    assert not store.exists("x.csv")
