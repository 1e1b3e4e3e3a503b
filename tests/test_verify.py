"""Checksums of published shards: a truncated or altered shard is found when a unit is judged
done (and recomputed, with identical numbers), when it is read (one ``error:`` line), and by
``dispersion verify`` over a whole root."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import scan_config_dict

from dispersion.config import parse_config
from dispersion.core.errors import IntegrityError
from dispersion.core.integrity import verify_root
from dispersion.core.storage import Store
from dispersion.run import run_scan

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(zoo, root) -> dict:
    """One model@revision, one dataset, three shards of 30 segments: three work units."""
    return scan_config_dict(zoo, root, models=[{"name": "g", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
                            datasets=[{"name": "code", "embedded": "code"}])


@pytest.fixture(scope="module")
def original(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify") / "out"
    result = run_scan(parse_config(_config(micro_zoo, root)), progress=False, log=lambda *_: None)
    assert result.stats.ran == 3
    return root, result


@pytest.fixture()
def copy(original, micro_zoo, tmp_path):
    """A copy of the scanned root to damage, and its config."""
    root = tmp_path / "out"
    shutil.copytree(original[0], root)
    return root, parse_config(_config(micro_zoo, root))


def _shard(root: Path, kind: str, k: int = 1) -> Path:
    pattern = "features/**/shard-%05d.parquet" if kind == "features" else \
        "vectors/**/layer=final/site=block/pool=last/shard-%05d.parquet"
    (path,) = root.glob(pattern % k)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _alter_ppl(path: Path) -> None:
    """Rewrite a features shard with doubled perplexities: same schema, same row count."""
    table = pq.read_table(path)
    i = table.schema.get_field_index("ppl")
    pq.write_table(table.set_column(i, table.schema.field(i), pc.multiply(table.column(i), 2.0)), path)


def _scan(cfg):
    lines: list[str] = []
    result = run_scan(cfg, progress=False, log=lambda m: lines.append(str(m)))
    return result, [m for m in lines if m.startswith("warning:")]


def _same_numbers(result, original_result) -> None:
    for name in ("bins", "correlations"):
        new, old = result.tables[name], original_result.tables[name]
        assert new.num_rows == old.num_rows > 0
        for col in ("mean_ppl", "dispersion") if name == "bins" else ("pearson_r", "spearman_r"):
            np.testing.assert_allclose(new.column(col).to_numpy(), old.column(col).to_numpy(), rtol=1e-6)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def test_markers_record_a_checksum_of_every_file(original):
    root, _ = original
    store = Store(str(root))
    markers = sorted((root / "_done").rglob("*.json"))
    assert len(markers) == 4  # one sample marker, three unit markers
    for m in markers:
        marker = json.loads(m.read_text())
        assert marker["checksums"], m
        for rel, cs in marker["checksums"].items():
            assert store.checksum(rel) == cs


@pytest.mark.parametrize("kind", ["features", "vectors"])
def test_a_truncated_shard_is_recomputed_with_identical_numbers(original, copy, kind):
    root, cfg = copy
    shard = _shard(root, kind)
    before = pq.read_table(_shard(original[0], kind))
    _truncate(shard)
    result, warnings = _scan(cfg)
    assert result.stats.ran == 1 and result.stats.skipped == 2
    assert len(warnings) == 1 and _rel(root, shard) in warnings[0] and "recomputing" in warnings[0], warnings
    assert pq.read_table(shard).equals(before)
    _same_numbers(result, original[1])


def test_an_altered_shard_with_the_same_rows_is_detected_and_recomputed(original, copy):
    root, cfg = copy
    shard = _shard(root, "features")
    _alter_ppl(shard)
    assert pq.ParquetFile(shard).metadata.num_rows == 30  # row counts alone would not notice
    found = verify_root(Store(str(root)), log=lambda *_: None)
    assert [d.path for d in found.damaged] == [_rel(root, shard)]
    assert "checksum mismatch" in found.damaged[0].reason
    result, warnings = _scan(cfg)
    assert result.stats.ran == 1
    assert len(warnings) == 1 and "checksum mismatch" in warnings[0], warnings
    assert pq.read_table(shard).equals(pq.read_table(_shard(original[0], "features")))
    _same_numbers(result, original[1])
    assert verify_root(Store(str(root)), log=lambda *_: None).ok


def test_a_damaged_segments_shard_is_sampled_again(original, copy):
    root, cfg = copy
    (seg,) = root.glob("segments/**/shard-00002.parquet")
    before = seg.read_bytes()
    _truncate(seg)
    result, warnings = _scan(cfg)
    assert result.stats.ran == 0  # the units' own files are intact
    assert len(warnings) == 1 and _rel(root, seg) in warnings[0] and "sampling code again" in warnings[0]
    assert seg.read_bytes() == before


def test_an_unreadable_marker_is_reported_and_its_unit_recomputed(original, copy):
    root, cfg = copy
    (marker,) = root.glob("_done/model=*/**/shard-00002.json")
    marker.write_text(marker.read_text()[:40])
    found = verify_root(Store(str(root)), log=lambda *_: None)
    assert [(d.path, d.reason) for d in found.damaged] == [(_rel(root, marker), "not valid JSON")]
    result, warnings = _scan(cfg)
    assert result.stats.ran == 1 and len(warnings) == 1 and "not valid JSON" in warnings[0], warnings
    _same_numbers(result, original[1])


def test_markers_without_checksums_are_checked_by_row_count(original, copy):
    """Markers written before checksums: intact files are done; a truncated one is recomputed."""
    root, cfg = copy
    for m in (root / "_done").rglob("*.json"):
        marker = json.loads(m.read_text())
        del marker["checksums"]
        m.write_text(json.dumps(marker))
    found = verify_root(Store(str(root)), log=lambda *_: None)
    assert found.ok and found.without_checksums == 4 and "no checksums" in found.summary()
    result, warnings = _scan(cfg)
    assert result.stats.ran == 0 and warnings == []
    _truncate(_shard(root, "vectors", 0))
    result, warnings = _scan(cfg)
    assert result.stats.ran == 1 and len(warnings) == 1 and "unreadable" in warnings[0], warnings
    _same_numbers(result, original[1])


def _cli(*args: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dispersion.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def test_verify_command_lists_each_damaged_file_and_repairs(copy):
    root, cfg = copy
    clean = _cli("verify", "--root", str(root))
    assert clean.returncode == 0, clean.stderr
    assert "all match" in clean.stdout
    features, vectors = _shard(root, "features", 0), _shard(root, "vectors", 2)
    _alter_ppl(features)
    _truncate(vectors)
    missing = _shard(root, "vectors", 1)
    missing.unlink()
    bad = _cli("verify", "--root", str(root))
    assert bad.returncode == 1, bad.stderr
    damaged = [line for line in bad.stdout.splitlines() if line.startswith("damaged: ")]
    assert sorted(damaged) == sorted([f"damaged: {_rel(root, features)}: checksum mismatch (changed after it "
                                      f"was published)",
                                      f"damaged: {_rel(root, vectors)}: checksum mismatch (changed after it "
                                      f"was published)",
                                      f"damaged: {_rel(root, missing)}: missing"])
    assert "3 damaged in 3 markers" in bad.stdout and "--repair" in bad.stdout
    repaired = _cli("verify", "--root", str(root), "--repair")
    assert repaired.returncode == 1 and "removed 3 markers" in repaired.stdout
    assert len(list((root / "_done").rglob("shard-*.json"))) == 0
    assert _cli("verify", "--root", str(root)).returncode == 0
    missing_root = _cli("verify", "--root", str(root / "nowhere"))
    assert missing_root.returncode == 1 and missing_root.stderr.startswith("error: root: ")


@pytest.mark.parametrize("command, kind", [(["report"], "vectors"), (["analyze", "trajectory"], "features"),
                                           (["report"], "segments")])
def test_report_and_analyze_on_a_damaged_shard_end_in_one_error_line(copy, tmp_path, command, kind):
    root, cfg = copy
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    if kind == "features":
        shard = _shard(root, "features")
        _alter_ppl(shard)
    else:
        (shard,) = root.glob("segments/**/shard-00001.parquet") if kind == "segments" else [_shard(root, kind)]
        _truncate(shard)
    out = _cli(*command, "--config", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {_rel(root, shard)}: "), out.stderr
    assert "rerun the `dispersion scan`" in lines[0] and "--repair" not in lines[0]  # what works, nothing that finds nothing


def test_read_shard_and_the_error_survive_pickling(tmp_path):
    store = Store(str(tmp_path))
    cs = store.write_table("a/shard-00000.parquet", pa.table({"x": [1, 2, 3]}))
    assert store.read_shard("a/shard-00000.parquet", cs).column("x").to_pylist() == [1, 2, 3]
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.read_shard("a/shard-00000.parquet", "0" * 32)
    with pytest.raises(IntegrityError, match="^a/nope.parquet: missing; rerun the `dispersion scan`"):
        store.read_shard("a/nope.parquet", None)
    (tmp_path / "a/shard-00000.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(IntegrityError, match="unreadable Parquet") as err:
        store.read_shard("a/shard-00000.parquet", None)
    again = pickle.loads(pickle.dumps(err.value))  # Ray sends errors between processes
    assert str(again) == str(err.value) and again.path == "a/shard-00000.parquet"
    (tmp_path / "m.json").write_text("{trunc")
    with pytest.raises(IntegrityError, match="m.json: not valid JSON"):
        store.read_json("m.json")


def test_verify_on_an_object_store(s3):
    """The same checks through s3fs: checksums streamed from the bucket, markers removed there."""
    from dispersion.core import layout
    from dispersion.core.integrity import CHECKSUMS

    store = Store("s3://dispersion-test/verify")
    part = layout.unit_partition("m", "main", "d", "s", "spec")
    files = [layout.features_shard(part, 0), layout.vectors_shard(part, 0, "final", "block", "last")]
    sums = {rel: store.write_table(rel, pa.table({"segment_id": [1, 2]})) for rel in files}
    marker = layout.unit_marker(part, 0)
    store.write_json(marker, {"key": "k", "rows": 2, "files": files, CHECKSUMS: sums})
    assert verify_root(store, log=lambda *_: None).ok
    store.fs.pipe_file(store.path(files[1]), _parquet_bytes(pa.table({"segment_id": [1, 3]})))
    lines: list[str] = []
    found = verify_root(store, repair=True, log=lines.append)
    assert lines == [f"damaged: {files[1]}: checksum mismatch (changed after it was published)"]
    assert found.removed == [marker] and not store.exists(marker)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
