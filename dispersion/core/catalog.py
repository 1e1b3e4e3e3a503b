"""A DuckDB catalog of views over a store's Parquet, and the read-only SQL entry point.

``{root}/catalog.duckdb`` holds views, no data::

    segments      segments/dataset=*/sample=*/shard-*.parquet
    features      features/model=*/revision=*/dataset=*/sample=*/spec=*/shard-*.parquet
    vectors       vectors/.../layer=*/site=*/pool=*/shard-*.parquet   (vec comes back as FLOAT[])
    bins          results/bins/*.parquet
    correlations  results/correlations/*.parquet
    trajectory    results/trajectory/*.parquet      (checkpoint sweeps)
    <name>        results/<name>/*.parquet for every other result table (the analyses'
                  context_bins, layers, heldout, vendi, gap, clusters, finetune, ...)

Hive partition columns (model, revision, dataset, sample, spec, layer, site, pool) are VARCHAR.
For an object-store root the store's fsspec filesystem is registered on the connection,
so nothing is downloaded at run time (no DuckDB extension install).

:func:`query` (``dispersion query``) is sandboxed: one statement, and it must be a SELECT
(DESCRIBE, SHOW, SUMMARIZE, WITH, VALUES and FROM-first are SELECTs); the connection has
``enable_external_access=false`` with ``allowed_directories`` = the store root, extension
auto-install/auto-load off, and ``lock_configuration=true``. See docs/GUARANTEES.md.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile

import duckdb

from dispersion.core.errors import DataError
from dispersion.core.layout import CATALOG, RESULTS_FOLDERS, VIEWS, result_glob, result_table_of
from dispersion.core.storage import Store

# Extensions are never fetched or loaded behind the user's back (``INSTALL``/``LOAD`` are
# refused by the sandbox; these stop a query from pulling one in implicitly).
NO_AUTO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
ALLOWED_STATEMENTS = (duckdb.StatementType.SELECT,)


def connect(store: Store, database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(database, read_only=read_only, config=dict(NO_AUTO_EXTENSIONS))
    if not store.local:
        con.register_filesystem(store.fs)
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


def view_sql(store: Store, name: str, pattern: str, hive: bool) -> str:
    url = store.url(pattern).replace("'", "''")
    return (f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{url}', "
            f"hive_partitioning={str(hive).lower()}, union_by_name=true)")


def build_catalog(store: Store, extra_views: dict[str, str] | None = None) -> str:
    """(Re)write ``{root}/catalog.duckdb`` with a view for every table that has files."""
    fd, tmp = tempfile.mkstemp(suffix=".duckdb")
    os.close(fd)
    os.remove(tmp)
    made = []
    try:
        con = connect(store, tmp)
        views = dict(VIEWS)
        for folder in store.glob(RESULTS_FOLDERS):
            name = result_table_of(folder)
            if name is not None and name not in views:
                views[name] = (result_glob(name), False)
        for name, (pattern, hive) in views.items():
            if store.glob(pattern):
                con.execute(view_sql(store, name, pattern, hive))
                made.append(name)
        for name, sql in (extra_views or {}).items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
            made.append(name)
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


def query(store: Store, sql: str):
    """Run one SELECT against the catalog in the sandbox; returns a pyarrow Table.
    Anything else (COPY, ATTACH, EXPORT, INSTALL/LOAD, SET, PRAGMA, several statements) and
    any file outside the store root is refused with a one-line DataError."""
    con = open_catalog(store)
    try:
        rel = con.sql(_one_select(con, sql))
        return None if rel is None else rel.to_arrow_table()
    except duckdb.Error as err:
        raise DataError(f"query: {str(err).splitlines()[0]}") from None
    finally:
        con.close()
