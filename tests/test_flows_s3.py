"""The Prefect scan flow against a real S3-compatible server: scan, query with DuckDB, resume,
an outage while shards are written, and bad storage roots."""

import threading
import time

import pytest
from flowcheck import assert_same, features_of, flow_config, reference_scan
from servers import restore_env, set_env

from dispersion.core.catalog import query
from dispersion.core.errors import DataError
from dispersion.core.storage import Store


@pytest.fixture(scope="module")
def reference(micro_zoo, tmp_path_factory):
    return reference_scan(micro_zoo, tmp_path_factory.mktemp("ref"))


def test_scan_to_s3_query_with_duckdb_and_resume(micro_zoo, reference, tmp_path, s3):
    from flows.scan_models import scan_models

    root = "s3://dispersion-test/nightly"
    cfg = flow_config(micro_zoo, root, tmp_path / "cfg.yaml")
    out = scan_models(cfg, root)
    assert out["ran"] == 8 and out["catalog"] == f"{root}/catalog.duckdb"
    store = Store(root)
    assert_same(features_of(store), reference[0])
    counts = query(store, "SELECT revision, count(*) AS n, count(DISTINCT segment_id) AS d FROM features "
                          "GROUP BY revision ORDER BY revision").to_pylist()
    assert counts == [{"revision": "step0", "n": 60, "d": 60}, {"revision": "step20", "n": 60, "d": 60}]
    assert scan_models(cfg, root)["ran"] == 0


def test_bad_storage_roots_fail_in_one_line(tmp_path, s3):
    with pytest.raises(DataError, match="root: bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/x").check()
    old = set_env({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                   "AWS_CONFIG_FILE": "/nonexistent"})
    try:
        import os

        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(k)
        with pytest.raises(DataError, match="root: no credentials"):
            Store("s3://dispersion-test/x").check()
    finally:
        restore_env(old)


def test_s3_outage_while_shards_are_written(micro_zoo, reference, tmp_path, s3):
    from flows.scan_models import scan_models

    root = "s3://dispersion-test/outage"
    cfg = flow_config(micro_zoo, root, tmp_path / "cfg.yaml")
    store = Store(root)

    def outage_after_first_marker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.glob("_done/*/*/*/*/*/shard-*.json"):
            time.sleep(0.1)
        s3.outage(4.0)

    t = threading.Thread(target=outage_after_first_marker, daemon=True)
    t.start()
    out = scan_models(cfg, root)
    t.join(10)
    assert out["units"] == 8
    assert_same(features_of(store), reference[0])

