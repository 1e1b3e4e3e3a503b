import numpy as np
import pyarrow as pa
import pytest

from dispersion.core.errors import DataError
from dispersion.core.layout import partition
from dispersion.core.storage import Store, vector_column, vector_schema


def test_parquet_round_trip_with_float16_vectors(tmp_path):
    store = Store(str(tmp_path / "root"))
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((5, 7)).astype(np.float16)
    table = pa.table({"segment_id": pa.array(np.arange(5), pa.int64()), "vec": vector_column(vec),
                      "norm": np.linalg.norm(vec.astype(np.float32), axis=1),
                      "within": np.full(5, 0.5, np.float32)}, schema=vector_schema(7))
    store.write_table("vectors/model=a/shard-00000.parquet", table)
    back = store.read_table("vectors/model=a/shard-00000.parquet")
    assert back.schema.equals(vector_schema(7))
    got = back.column("vec").combine_chunks().flatten().to_numpy().reshape(5, 7)
    np.testing.assert_array_equal(got, vec)
    # publishing leaves no temporary file behind
    assert [p.name for p in (tmp_path / "root/vectors/model=a").iterdir()] == ["shard-00000.parquet"]


def test_failed_write_publishes_nothing(tmp_path, monkeypatch):
    store = Store(str(tmp_path))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        store.write_json("a/b.json", {"x": 1})
    assert list((tmp_path / "a").iterdir()) == []


def test_partition_values_are_checked():
    assert partition(model="m", revision="step10") == "model=m/revision=step10"
    with pytest.raises(DataError, match="revision"):
        partition(revision="refs/pr/1")


def test_a_report_link_opens_in_a_browser_locally_and_on_s3(s3, tmp_path):
    """A report on S3 is linked by a presigned HTTP URL (a browser cannot open ``s3://``)."""
    import urllib.request

    local = Store(str(tmp_path / "r"))
    local.write_text("results/report/t.html", "<p>local</p>")
    assert local.browser_url("results/report/t.html") == (tmp_path / "r/results/report/t.html").as_uri()
    remote = Store("s3://dispersion-test/root")
    remote.write_text("results/report/t.html", "<p>on s3</p>")
    url = remote.browser_url("results/report/t.html")
    assert url.startswith("http://127.0.0.1:") and "Signature" in url
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - a loopback moto URL
        assert resp.read() == b"<p>on s3</p>"
