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
"""

from __future__ import annotations

import os
import tempfile

import duckdb

from dispersion.core.errors import DataError
from dispersion.core.layout import CATALOG, VIEWS, result_glob, result_table_of
from dispersion.core.storage import Store


def connect(store: Store, database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(database, read_only=read_only)
    if not store.local:
        con.register_filesystem(store.fs)
    return con


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
        for folder in store.glob("results/*"):
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
    """A read-only connection to the catalog (downloaded to a temporary file if remote)."""
    if not store.exists(CATALOG):
        raise DataError(f"{store.url(CATALOG)}: no catalog here (run a scan first)")
    if store.local:
        return connect(store, store.path(CATALOG), read_only=True)
    fd, tmp = tempfile.mkstemp(suffix=".duckdb")
    os.close(fd)
    store.fs.get(store.path(CATALOG), tmp)
    return connect(store, tmp, read_only=True)


def query(store: Store, sql: str):
    """Run SQL against the catalog read-only; returns a pyarrow Table."""
    con = open_catalog(store)
    try:
        rel = con.sql(sql)
        return None if rel is None else rel.to_arrow_table()
    except duckdb.Error as err:
        raise DataError(f"query: {str(err).splitlines()[0]}") from None
    finally:
        con.close()
