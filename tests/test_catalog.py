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
    _small_store(path)
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
    assert query(store, "DESCRIBE bins").column("column_name").to_pylist() == ["bin", "dispersion", "run"]
    assert query(store, "SELECT DISTINCT run FROM bins").to_pylist() == [{"run": "default"}]
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


# -- views resolve relative to the root they live in -------------------------------------------

def _small_store(path: Path) -> Store:
    store = Store(str(path))
    store.write_table("segments/dataset=d/sample=s1/shard-00000.parquet",
                      pa.table({"segment_id": [0, 1, 2], "text": ["a", "b", "c"]}))
    store.write_table(SHARD, pa.table({"segment_id": [0, 1, 2], "ppl": [1.5, 2.5, 3.5]}))
    store.write_table("results/bins/default.parquet", pa.table({"bin": [0, 1], "dispersion": [0.25, 0.5]}))
    build_catalog(store)
    return store


ALL_ROWS = ("SELECT 'f' AS t, segment_id, ppl AS x FROM features UNION ALL "
            "SELECT 's', segment_id, NULL FROM segments UNION ALL SELECT 'b', bin, dispersion FROM bins "
            "ORDER BY ALL")


def test_a_copied_or_moved_root_queries_its_own_files(tmp_path, monkeypatch):
    import duckdb

    first = tmp_path / "first"
    before = query(_small_store(first), ALL_ROWS).to_pylist()
    assert len(before) == 8
    subprocess.run(["cp", "-r", str(first), str(tmp_path / "copy")], check=True)
    subprocess.run(["rm", "-rf", str(first)], check=True)
    assert query(Store(str(tmp_path / "copy")), ALL_ROWS).to_pylist() == before
    subprocess.run(["mv", str(tmp_path / "copy"), str(tmp_path / "moved")], check=True)
    moved = tmp_path / "moved"
    assert query(Store(str(moved)), ALL_ROWS).to_pylist() == before
    # no absolute path is stored; plain DuckDB reads the catalog from inside the root
    con = duckdb.connect(str(moved / "catalog.duckdb"), read_only=True)
    assert not any(str(tmp_path) in sql for (sql,) in con.sql("SELECT sql FROM duckdb_views()").fetchall())
    monkeypatch.chdir(moved)
    assert con.sql("SELECT sum(ppl) FROM features").fetchall() == [(7.5,)]
    con.close()
    # and an edit in the copy shows in the copy
    Store(str(moved)).write_table(SHARD, pa.table({"segment_id": [0], "ppl": [9.0]}))
    assert query(Store(str(moved)), "SELECT sum(ppl) AS s FROM features").to_pylist() == [{"s": 9.0}]


def test_a_copied_s3_root_queries_its_own_objects(s3):
    import fsspec

    src = Store("s3://dispersion-test/first")
    src.write_table(SHARD, pa.table({"segment_id": [0, 1, 2], "ppl": [1.5, 2.5, 3.5]}))
    src.write_table("results/bins/default.parquet", pa.table({"bin": [0, 1], "dispersion": [0.25, 0.5]}))
    build_catalog(src)
    sql = "SELECT segment_id, ppl FROM features ORDER BY segment_id"
    before = query(src, sql).to_pylist()
    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    fs.copy("dispersion-test/first", "dispersion-test/copy", recursive=True)
    fs.rm("dispersion-test/first", recursive=True)
    assert not fs.exists("dispersion-test/first/catalog.duckdb")
    copy = Store("s3://dispersion-test/copy")
    assert query(copy, sql).to_pylist() == before
    assert query(copy, "SELECT max(dispersion) AS d FROM bins").to_pylist() == [{"d": 0.5}]


# -- one spec at a time --------------------------------------------------------------------------

def _partition(store: Store, sample: str, spec: str, shards: int, done: int, run: str | None = None) -> None:
    """Features of model m@main on dataset d under (sample, spec): ``shards`` shards of 3
    segments, ``done`` of them with a marker, named by the manifest of ``run``."""
    part = f"model=m/revision=main/dataset=d/sample={sample}/spec={spec}"
    store.write_json(f"_done/segments/dataset=d/sample={sample}.json",
                     {"rows": [3] * shards, "sampling": {"num_segments": 3 * shards, "segment_length": 8,
                                                         "seed": 1, "shard_size": 3}})
    units = []
    for k in range(shards):
        store.write_table(f"segments/dataset=d/sample={sample}/shard-{k:05d}.parquet",
                          pa.table({"segment_id": [3 * k, 3 * k + 1, 3 * k + 2]}))
        store.write_table(f"features/{part}/shard-{k:05d}.parquet",
                          pa.table({"segment_id": [3 * k, 3 * k + 1, 3 * k + 2], "ppl": [1.0, 2.0, 3.0]}))
        store.write_table(f"vectors/{part}/layer=1/site=block/pool=last/shard-{k:05d}.parquet",
                          pa.table({"segment_id": [3 * k, 3 * k + 1, 3 * k + 2], "norm": [1.0, 1.0, 1.0]}))
        if k < done:
            store.write_json(f"_done/{part}/shard-{k:05d}.json", {"rows": 3})
        units.append({"features": f"features/{part}/shard-{k:05d}.parquet"})
    if run is not None:
        store.write_json(f"runs/{run}/manifest.json", {"config": {"extraction": {"layers": [1]}}, "units": units})


def _current(store: Store) -> list[tuple]:
    return [tuple(r.values()) for r in query(
        store, "SELECT sample, spec, complete, run_id FROM specs WHERE current").to_pylist()]


def test_views_show_one_spec_per_model_revision_and_dataset(tmp_path):
    store = Store(str(tmp_path / "r"))
    _partition(store, "s1", "a", shards=2, done=2, run="20260101T000000-aaaaaa")
    _partition(store, "s2", "b", shards=3, done=3, run="20260102T000000-bbbbbb")
    build_catalog(store)
    assert _current(store) == [("s2", "b", True, "20260102T000000-bbbbbb")]  # the newest run
    counts = query(store, "SELECT (SELECT count(*) FROM features) AS f, (SELECT count(*) FROM vectors) AS v, "
                          "(SELECT count(*) FROM segments) AS s, (SELECT count(*) FROM features_all) AS fa, "
                          "(SELECT count(*) FROM vectors_all) AS va, (SELECT count(*) FROM segments_all) AS sa"
                   ).to_pylist()
    assert counts == [{"f": 9, "v": 9, "s": 9, "fa": 15, "va": 15, "sa": 15}]
    assert query(store, "SELECT DISTINCT spec FROM features").to_pylist() == [{"spec": "b"}]
    row = query(store, "SELECT * FROM specs WHERE spec = 'a'").to_pylist()[0]
    assert (row["current"], row["shards"], row["done"], row["segments"], row["shard_size"]) == (False, 2, 2, 6, 3)
    assert row["extraction"] == '{"layers": [1]}'
    # a newer scan that did not finish (no manifest, some markers missing) does not take over
    _partition(store, "s3", "c", shards=2, done=1)
    build_catalog(store)
    assert _current(store) == [("s2", "b", True, "20260102T000000-bbbbbb")]


def test_without_manifests_a_complete_spec_wins_over_a_partial_one(tmp_path):
    store = Store(str(tmp_path / "r"))
    _partition(store, "s1", "a", shards=2, done=2)
    _partition(store, "s9", "z", shards=2, done=1)
    build_catalog(store)
    assert _current(store) == [("s1", "a", True, None)]
    assert query(store, "SELECT count(*) AS n FROM features").to_pylist() == [{"n": 6}]


def test_a_second_scan_with_another_shard_size_adds_no_duplicate_rows(micro_zoo, tmp_path):
    """Two scans of one root, shard sizes 20 and 10: the views hold each segment once."""
    from conftest import scan_config_dict

    from dispersion.config import parse_config
    from dispersion.measure.scan import execute, plan, write_manifest

    root = tmp_path / "out"
    store = Store(str(root))
    base = scan_config_dict(micro_zoo, root,
                            models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
                            datasets=[{"name": "code", "embedded": "code"}],
                            sampling={"num_segments": 40, "segment_length": 16, "shard_size": 20, "seed": 3},
                            extraction={"layers": ["final"], "pools": ["last"], "batch_size": 40})
    quiet = lambda *_: None  # noqa: E731
    for shard_size in (20, 10):
        cfg = parse_config({**base, "sampling": {**base["sampling"], "shard_size": shard_size}})
        units = plan(cfg, store, log=quiet)
        stats = execute(units, cfg, store, progress=False, log=quiet)
        write_manifest(cfg, store, units, stats)
        build_catalog(store)
    n = query(store, "SELECT count(*) AS n, count(DISTINCT segment_id) AS d FROM features").to_pylist()
    assert n == [{"n": 40, "d": 40}]  # segments x models, each once
    assert query(store, "SELECT count(*) AS n FROM vectors").to_pylist() == [{"n": 40}]
    assert query(store, "SELECT count(*) AS n FROM segments").to_pylist() == [{"n": 40}]
    assert query(store, "SELECT count(*) AS n FROM features_all").to_pylist() == [{"n": 2 * 40}]
    specs = query(store, "SELECT shard_size, shards, current, complete FROM specs ORDER BY ALL").to_pylist()
    assert specs == [{"shard_size": 10, "shards": 4, "current": True, "complete": True},
                     {"shard_size": 20, "shards": 2, "current": False, "complete": True}]
