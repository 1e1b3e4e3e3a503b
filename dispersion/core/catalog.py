"""A DuckDB catalog of views over a store's Parquet, and the read-only SQL entry point.

``{root}/catalog.duckdb`` holds views over the Parquet (no copy of it) and one small table::

    specs         one row per (model, revision, dataset, sample, spec) partition: which one is
                  current, how complete, the sampling and extraction it stands for, its last run
    features      features/model=*/revision=*/dataset=*/sample=*/spec=*/shard-*.parquet,
                  only the current (sample, spec) of each (model, revision, dataset)
    vectors       vectors/.../layer=*/site=*/pool=*/shard-*.parquet, the same partitions
                  (vec comes back as FLOAT[])
    segments      segments/dataset=*/sample=*/shard-*.parquet of the samples current specs read
    features_all, vectors_all, segments_all    every partition (compare specs: GROUP BY spec)
    bins          results/bins/*.parquet
    correlations  results/correlations/*.parquet
    trajectory    results/trajectory/*.parquet      (checkpoint sweeps)
    <name>        results/<name>/*.parquet for every other result table (the analyses'
                  context_bins, layers, heldout, vendi, gap, clusters, finetune, ...)

Hive partition columns (model, revision, dataset, sample, spec, layer, site, pool) are VARCHAR.
For an object-store root the store's fsspec filesystem is registered on the connection,
so nothing is downloaded at run time (no DuckDB extension install).

**One spec at a time.** A second scan of the same model, revision and dataset with other
sampling (seed, number, length, shard size) or extraction settings writes a new partition
beside the old one. ``features``, ``vectors`` and ``segments`` show one partition per
(model, revision, dataset), the *current* one: the one the newest finished scan
(``runs/*/manifest.json``) used, else a complete one before a partial one. ``specs`` says
which one that is; the ``*_all`` views show every partition, with ``sample`` and ``spec``
columns to group by. The views list the partitions present when the catalog was built (at
the end of every scan, ``report`` and ``analyze``).

**Relative to the root.** Every path in a view starts from the DuckDB variable
``dispersion_root``, which :func:`connect` sets to the store the catalog is opened from, so
a copied or moved root queries its own files. Plain DuckDB reads the catalog from inside
the root (the variable unset means ``.``), or after ``SET VARIABLE dispersion_root =
'/path/to/root'`` (for ``s3://`` roots also ``register_filesystem`` an s3fs filesystem).

:func:`query` (``dispersion query``) is sandboxed: one statement, and it must be a SELECT
(DESCRIBE, SHOW, SUMMARIZE, WITH, VALUES and FROM-first are SELECTs); the connection has
``enable_external_access=false`` with ``allowed_directories`` = the store root, extension
auto-install/auto-load off, and ``lock_configuration=true``. See docs/GUARANTEES.md.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile
from typing import Any

import duckdb
import pyarrow as pa

from dispersion.core import layout
from dispersion.core.errors import DataError
from dispersion.core.ids import step_of
from dispersion.core.layout import CATALOG, RESULTS_FOLDERS, VIEWS, result_glob, result_table_of
from dispersion.core.storage import Store

# Extensions are never fetched or loaded behind the user's back (``INSTALL``/``LOAD`` are
# refused by the sandbox; these stop a query from pulling one in implicitly).
NO_AUTO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
ALLOWED_STATEMENTS = (duckdb.StatementType.SELECT,)


def connect(store: Store, database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose catalog views read ``store`` (``dispersion_root`` set to it)."""
    con = duckdb.connect(database, read_only=read_only, config=dict(NO_AUTO_EXTENSIONS))
    if not store.local:
        con.register_filesystem(store.fs)
    con.execute(f"SET VARIABLE {layout.ROOT_VARIABLE} = {_sql_string(store.url().rstrip('/'))}")
    return con


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sandbox(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Confine ``con`` to reading the store: files and URLs outside the store root are
    refused (``enable_external_access=false`` with the root as the one allowed directory),
    and no setting can be changed afterwards (``lock_configuration=true``). Writes *inside*
    the root (``COPY ... TO``) are refused by :func:`query`'s statement check, not here."""
    root = store.url().rstrip("/") + "/"
    con.execute(f"SET allowed_directories = [{_sql_string(root)}]")  # must precede the next line
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


ROOT = f"coalesce(getvariable('{layout.ROOT_VARIABLE}'), '.')"


def parquet_sql(patterns: list[str], hive: bool, filename: bool = False) -> str:
    """``read_parquet(...)`` over the files ``patterns`` (globs relative to the root)."""
    files = ", ".join(f"{ROOT} || {_sql_string('/' + p)}" for p in patterns)
    extra = ", filename=true" if filename else ""
    return f"read_parquet([{files}], hive_partitioning={str(hive).lower()}, union_by_name=true{extra})"


def view_sql(name: str, patterns: list[str], hive: bool) -> str:
    """``CREATE VIEW name`` over the Parquet files ``patterns`` (globs relative to the root)."""
    return f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {parquet_sql(patterns, hive)}"


def unit_view_sql(name: str, patterns: list[str]) -> str:
    """A features/vectors view over partitions of ``specs``, with each row's ``step``, ``run``
    and ``run_id`` from its partition's ``specs`` row."""
    on = " AND ".join(f"p.{k} = s.{k}" for k in layout.UNIT_KEYS)
    return (f"CREATE OR REPLACE VIEW {name} AS SELECT p.*, s.step, s.run, s.run_id "
            f"FROM {parquet_sql(patterns, True)} p JOIN specs s ON {on}")


def result_view_sql(name: str, pattern: str, columns: list[str]) -> str:
    """A result table's view: every ``results/{name}/{run}.parquet`` with a ``run`` column (the
    config name the file is published under) and, where rows name a revision, its ``step``."""
    run = "" if "run" in columns else ", regexp_extract(p.filename, '([^/]+)[.]parquet$', 1) AS run"
    step = ", v.step" if "revision" in columns and "step" not in columns else ""
    join = " LEFT JOIN revisions v ON p.revision = v.revision" if step else ""
    return (f"CREATE OR REPLACE VIEW {name} AS SELECT p.* EXCLUDE (filename){step}{run} "
            f"FROM {parquet_sql([pattern], False, filename=True)} p{join}")


CURRENT_VIEWS = ("specs", "features", "vectors", "segments")
RUN_VIEWS = ("runs", "revisions")
SPEC_SCHEMA = pa.schema([
    pa.field("model", pa.string()), pa.field("revision", pa.string()), pa.field("dataset", pa.string()),
    pa.field("sample", pa.string()), pa.field("spec", pa.string()),
    pa.field("step", pa.int64()),  # the training step the revision names (None: main, a hash)
    pa.field("current", pa.bool_()),  # the partition features/vectors/segments show
    pa.field("complete", pa.bool_()),  # every shard of the sample has its done marker
    pa.field("shards", pa.int64()), pa.field("done", pa.int64()), pa.field("segments", pa.int64()),
    pa.field("run", pa.string()),  # the name of the newest run that used it (its config's name)
    pa.field("run_id", pa.string()),  # that run's id: runs/{run_id}/manifest.json
    pa.field("num_segments", pa.int64()), pa.field("segment_length", pa.int64()),
    pa.field("seed", pa.int64()), pa.field("shard_size", pa.int64()),
    pa.field("extraction", pa.string()),  # the extraction settings (JSON) of that run
])


def _unit_part(rel: str) -> tuple[str, ...]:
    values = layout.partition_values(rel)
    return tuple(values.get(k, "") for k in layout.UNIT_KEYS)


def _read(store: Store, rel: str) -> dict:
    try:
        return store.read_json(rel) or {}
    except DataError:  # an unreadable marker or manifest says nothing here
        return {}


def spec_table(store: Store) -> pa.Table:
    """The ``specs`` table: every (model, revision, dataset, sample, spec) partition with
    features, and which of each (model, revision, dataset) is current."""
    files: dict[tuple[str, ...], int] = {}
    for rel in store.glob(layout.FEATURES_GLOB):
        files[_unit_part(rel)] = files.get(_unit_part(rel), 0) + 1
    done: dict[tuple[str, ...], int] = {}
    for rel in store.glob(layout.UNIT_MARKERS):
        done[_unit_part(rel)] = done.get(_unit_part(rel), 0) + 1
    samples: dict[tuple[str, str], dict] = {}
    for rel in store.glob(layout.SEGMENTS_MARKERS):
        v = layout.partition_values(rel)
        samples[(v.get("dataset", ""), v.get("sample", ""))] = _read(store, rel)
    runs: dict[tuple[str, ...], tuple[str | None, str | None, str | None]] = {}  # -> (run id, name, extraction)
    for rel in sorted(store.glob(layout.MANIFESTS), key=layout.run_of_manifest):
        manifest = _read(store, rel)
        cfg: dict = manifest["config"] if isinstance(manifest.get("config"), dict) else {}
        settings = json.dumps(cfg.get("extraction"), sort_keys=True)
        for u in manifest.get("units") or []:
            if isinstance(u, dict) and isinstance(u.get("features"), str):
                runs[_unit_part(u["features"])] = (layout.run_of_manifest(rel), cfg.get("name"), settings)
    rows: list[dict[str, Any]] = []
    for part in sorted(files):
        model, revision, dataset, sample, spec = part
        marker = samples.get((dataset, sample), {})
        shard_rows = marker["rows"] if isinstance(marker.get("rows"), list) else None
        sampling = marker["sampling"] if isinstance(marker.get("sampling"), dict) else {}
        run_id, run, extraction = runs.get(part, (None, None, None))
        rows.append({"model": model, "revision": revision, "dataset": dataset, "sample": sample, "spec": spec,
                     "step": step_of(revision), "current": False,
                     "shards": None if shard_rows is None else len(shard_rows),
                     "complete": shard_rows is not None and done.get(part, 0) >= len(shard_rows),
                     "done": done.get(part, 0), "segments": None if shard_rows is None else sum(shard_rows),
                     "run": run, "run_id": run_id, "extraction": extraction,
                     **{k: sampling.get(k) for k in ("num_segments", "segment_length", "seed", "shard_size")}})
    best: dict[tuple[str, str, str], tuple[tuple[str, bool, str, str], dict[str, Any]]] = {}
    for row in rows:  # the newest run first, then complete before partial, then the name
        rank = (row["run_id"] or "", row["complete"], row["sample"], row["spec"])
        key = (row["model"], row["revision"], row["dataset"])
        if key not in best or rank > best[key][0]:
            best[key] = (rank, row)
    for _, row in best.values():
        row["current"] = True
    return pa.Table.from_pylist(rows, schema=SPEC_SCHEMA)


RUN_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()),  # runs/{run_id}/manifest.json: start time and config digest
    pa.field("name", pa.string()),  # the config's name: results/{table}/{name}.parquet, the views' run
    pa.field("version", pa.string()), pa.field("python", pa.string()),
    pa.field("models", pa.list_(pa.string())), pa.field("datasets", pa.list_(pa.string())),
    pa.field("units", pa.int64()), pa.field("ran", pa.int64()), pa.field("skipped", pa.int64()),
    pa.field("segments", pa.int64()), pa.field("seconds", pa.float64()),
    pa.field("config", pa.string()),  # the whole run config, JSON
])


def run_table(store: Store) -> pa.Table:
    """The ``runs`` table: one row per finished scan (``runs/*/manifest.json``)."""
    rows = []
    for rel in sorted(store.glob(layout.MANIFESTS), key=layout.run_of_manifest):
        m = _read(store, rel)
        cfg: dict = m["config"] if isinstance(m.get("config"), dict) else {}
        stats: dict = m["stats"] if isinstance(m.get("stats"), dict) else {}
        rows.append({"run_id": layout.run_of_manifest(rel), "name": cfg.get("name"), "version": m.get("version"),
                     "python": m.get("python"),
                     "models": [x.get("name") for x in cfg.get("models") or [] if isinstance(x, dict)],
                     "datasets": [x.get("name") for x in cfg.get("datasets") or [] if isinstance(x, dict)],
                     "units": stats.get("planned"), "ran": stats.get("ran"), "skipped": stats.get("skipped"),
                     "segments": stats.get("segments"), "seconds": stats.get("seconds"),
                     "config": json.dumps(cfg, sort_keys=True)})
    return pa.Table.from_pylist(rows, schema=RUN_SCHEMA)


def _table(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    con.register(f"{name}_rows", table)
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_rows")
    con.unregister(f"{name}_rows")


def build_catalog(store: Store, extra_views: dict[str, str] | None = None) -> str:
    """(Re)write ``{root}/catalog.duckdb``: the ``specs`` table, the current-spec views and a
    view for every other table that has files."""
    fd, tmp = tempfile.mkstemp(suffix=".duckdb")
    os.close(fd)
    os.remove(tmp)
    try:
        con = connect(store, tmp)
        views = {k: v for k, v in VIEWS.items() if not v[0].startswith("results/")}
        results = {k: v[0] for k, v in VIEWS.items() if v[0].startswith("results/")}
        for folder in store.glob(RESULTS_FOLDERS):
            name = result_table_of(folder)
            if name is not None and name not in views and name not in CURRENT_VIEWS + RUN_VIEWS:
                results[name] = result_glob(name)
        for name, (pattern, hive) in views.items():
            if store.glob(pattern):
                con.execute(view_sql(name, [pattern], hive))
        runs = run_table(store)
        if runs.num_rows:
            _table(con, "runs", runs)
        specs = spec_table(store)
        revisions = set(specs["revision"].to_pylist())
        columns: dict[str, list[str]] = {}
        for name, pattern in sorted(results.items()):
            files = store.glob(pattern)
            if not files:
                continue
            columns[name] = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {parquet_sql([pattern], False)}")
                             .fetchall()]
            if "revision" in columns[name]:
                revisions |= {r[0] for r in con.execute(
                    f"SELECT DISTINCT revision FROM {parquet_sql([pattern], False)}").fetchall() if r[0] is not None}
        _table(con, "revisions", pa.table({"revision": sorted(revisions),
                                           "step": pa.array([step_of(r) for r in sorted(revisions)], pa.int64())}))
        for name, cols in columns.items():
            con.execute(result_view_sql(name, results[name], cols))
        if specs.num_rows:
            _table(con, "specs", specs)
            current = [r for r in specs.to_pylist() if r["current"]]
            parts = [layout.unit_partition(*(r[k] for k in layout.UNIT_KEYS)) for r in current]
            con.execute(unit_view_sql("features", [layout.features_glob(p) for p in parts]))
            with_vectors = {_unit_part(rel) for rel in store.glob(layout.VECTORS_GLOB)}
            vectors = [layout.vectors_glob(p) for p, r in zip(parts, current)
                       if tuple(r[k] for k in layout.UNIT_KEYS) in with_vectors]
            if vectors:
                con.execute(unit_view_sql("vectors", vectors))
            have = {tuple(layout.partition_values(rel).get(k, "") for k in ("dataset", "sample"))
                    for rel in store.glob(layout.SEGMENTS_GLOB)}
            samples = sorted({(r["dataset"], r["sample"]) for r in current} & have)
            if samples:
                con.execute(view_sql("segments", [layout.segments_glob(d, s) for d, s in samples], True))
        for name, sql in (extra_views or {}).items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        con.close()
        with open(tmp, "rb") as fh:
            store.write_bytes(CATALOG, fh.read())
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return store.url(CATALOG)


def open_catalog(store: Store) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed (:func:`sandbox`) connection to the catalog. A remote catalog
    is downloaded to a temporary file that is unlinked as soon as DuckDB has it open."""
    if not store.exists(CATALOG):
        raise DataError(f"{store.url(CATALOG)}: no catalog here (run a scan first)")
    if store.local:
        con = connect(store, store.path(CATALOG), read_only=True)
    else:
        fd, tmp = tempfile.mkstemp(suffix=".duckdb")
        os.close(fd)
        try:
            store.fs.get(store.path(CATALOG), tmp)
            con = connect(store, tmp, read_only=True)
        finally:
            try:
                os.remove(tmp)  # POSIX: the open connection keeps reading the unlinked file
            except OSError:  # a platform that cannot unlink an open file: remove it at exit
                atexit.register(_remove_quietly, tmp)
    try:
        sandbox(con, store)
    except BaseException:
        con.close()
        raise
    return con


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _one_select(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """``sql`` if it is exactly one SELECT statement; DataError in one line otherwise."""
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise DataError(f"query: exactly one SQL statement is allowed (got {len(statements)})")
    kind = statements[0].type
    if kind not in ALLOWED_STATEMENTS:
        raise DataError(f"query: read-only: only a SELECT is allowed (got {kind.name})")
    return sql


def duckdb_message(err: BaseException) -> str:
    """DuckDB's error on one line, its hints kept ("Did you mean ...", "Candidate bindings: ...");
    the echoed SQL and caret lines dropped."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith("LINE ") and set(ln) != {"^"}]
    return " ".join(keep) if keep else type(err).__name__


def query(store: Store, sql: str):
    """Run one SELECT against the catalog in the sandbox; returns a pyarrow Table.
    Anything else (COPY, ATTACH, EXPORT, INSTALL/LOAD, SET, PRAGMA, several statements) and
    any file outside the store root is refused with a one-line DataError."""
    con = open_catalog(store)
    try:
        rel = con.sql(_one_select(con, sql))
        return None if rel is None else rel.to_arrow_table()
    except duckdb.Error as err:
        raise DataError(f"query: {duckdb_message(err)}") from None
    finally:
        con.close()
