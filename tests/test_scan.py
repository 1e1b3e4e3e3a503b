"""End to end: the in-process scan on a micro zoo, resume, catalog, CLI errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import scan_config_dict
from reference import dispersion

from dispersion.config import parse_config
from dispersion.core.errors import ConfigError
from dispersion.run import run_scan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scanned(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("scan") / "out"
    cfg = parse_config(scan_config_dict(micro_zoo, root))
    result = run_scan(cfg, progress=False, log=lambda *_: None)
    return cfg, root, result


def _marker_mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in (root / "_done").rglob("*.json")}


def test_scan_writes_every_unit_and_table(scanned):
    cfg, root, result = scanned
    # 2 gpt2 revisions + 1 llama revision, 2 datasets, 3 shards each
    assert result.stats.planned == 3 * 2 * 3 and result.stats.ran == 18
    feats = pq.read_table(root / "features", partitioning="hive")
    assert feats.num_rows == 3 * 2 * 90
    assert np.isfinite(feats.column("ppl").to_numpy()).all()
    bins, corr = result.tables["bins"], result.tables["correlations"]
    combos = {(r["model"], r["revision"], r["dataset"]) for r in corr.to_pylist()}
    assert len(combos) == 6
    # bins of 10 segments: 9 bins per combination, layer x pool targets + within scope
    across = [r for r in bins.to_pylist() if r["scope"] == "across" and r["layer"] == "final" and r["pool"] == "last"]
    assert len(across) == 6 * 9
    assert sum(r["selected"] for r in across) == 6 * 5
    assert (root / "results/report/t.png").stat().st_size > 10_000
    assert "Pearson" in (root / "results/report/t.md").read_text()


def test_bins_equal_a_naive_recomputation(scanned):
    """Across-scope dispersion of one bin recomputed from the stored vectors over all its pairs."""
    cfg, root, result = scanned
    (part,) = (root / "features/model=gpt2-tiny/revision=step20/dataset=code").glob("sample=*/spec=*")
    f = pq.read_table(part).to_pylist()
    v = pq.read_table(part.as_posix().replace("/features/", "/vectors/") + "/layer=final/site=block/pool=last").to_pylist()
    vec = {r["segment_id"]: np.asarray(r["vec"], np.float64) for r in v}
    order = sorted(f, key=lambda r: r["ppl"])
    first = order[:10]
    naive = dispersion(np.stack([vec[r["segment_id"]] for r in first]))  # mean over the 45 pairs
    row = [r for r in result.tables["bins"].to_pylist()
           if (r["model"], r["revision"], r["dataset"], r["layer"], r["pool"], r["scope"], r["bin"])
           == ("gpt2-tiny", "step20", "code", "final", "last", "across", 0)][0]
    assert row["dispersion"] == pytest.approx(naive, rel=1e-9)
    assert row["mean_ppl"] == pytest.approx(np.mean([r["ppl"] for r in first]), rel=1e-12)


def test_second_scan_does_no_work_and_a_lost_unit_is_redone(scanned):
    cfg, root, result = scanned
    before = _marker_mtimes(root)
    again = run_scan(cfg, progress=False, log=lambda *_: None)
    assert again.stats.ran == 0 and again.stats.skipped == 18
    assert _marker_mtimes(root) == before
    # lose one unit: exactly that one runs again, with identical numbers
    victim = next(p for p in before if "llama-small" in str(p) and "prose" in str(p))
    feat = Path(str(victim).replace("/_done/", "/features/").replace(".json", ".parquet"))
    old = pq.read_table(feat)
    victim.unlink()
    third = run_scan(cfg, progress=False, log=lambda *_: None)
    assert third.stats.ran == 1
    new = pq.read_table(feat)
    np.testing.assert_allclose(new.column("ppl").to_numpy(), old.column("ppl").to_numpy(), rtol=1e-6)
    assert new.column("segment_id").equals(old.column("segment_id"))


def test_query_cli_reads_the_catalog(scanned):
    cfg, root, _ = scanned
    out = subprocess.run([sys.executable, "-m", "dispersion.cli", "query", "--root", str(root),
                          "SELECT model, count(*) AS n FROM features GROUP BY model ORDER BY model"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "gpt2-tiny" in out.stdout and "360" in out.stdout and "180" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "dispersion.cli", "query", "--root", str(root),
                          "DROP VIEW features"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 1 and "read-only" in bad.stderr.lower()


def _cli_scan(tmp_path, cfg: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dispersion.cli", "scan", "--no-progress", "--config", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.mark.parametrize("patch, message", [
    ({"models": [{"name": "m", "id": "./no/such/model"}]}, "models.0.id: no such model folder"),
    ({"models": [{"name": "m", "zoo": "gpt2-tiny", "revisions": ["step999"]}]}, "revision 'step999' not found"),
    ({"sampling": {"num_segments": 10, "segment_length": 400, "shard_size": 5}}, "sampling.segment_length"),
    ({"sampling": {"num_segments": 10**6, "segment_length": 32, "shard_size": 1000}}, "sampling.num_segments"),
    ({"extraction": {"layers": [9]}}, "extraction.layers"),
])
def test_bad_input_is_one_line_and_publishes_nothing(micro_zoo, tmp_path, patch, message):
    root = tmp_path / "out"
    out = _cli_scan(tmp_path, scan_config_dict(micro_zoo, root, **patch))
    assert out.returncode == 1, out.stderr
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not root.exists() or not any(root.rglob("*.parquet"))


def test_missing_text_field_of_a_hub_style_dataset(micro_zoo, tmp_path):
    import pyarrow as pa

    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"article": ["some text " * 50] * 20}), data / "train-00000.parquet")
    root = tmp_path / "out"
    cfg = scan_config_dict(micro_zoo, root, datasets=[
        {"name": "local", "hf": {"path": str(tmp_path / "ds"), "split": "train", "text_field": "body"}}])
    cfg["datasets"] = [{"name": "prose", "embedded": "prose"}] + cfg["datasets"]  # a good one first
    out = _cli_scan(tmp_path, cfg)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: datasets.1.hf.text_field: 'body' is not a column")
    assert not root.exists() or not any(root.rglob("*.parquet"))


def test_other_samples_and_changed_weights_never_mix(micro_zoo, tmp_path):
    """A new seed or shard layout gets its own partition; re-trained weights are re-extracted."""
    import shutil

    zoo_copy = tmp_path / "models"
    shutil.copytree(Path(micro_zoo.cache) / "gpt2-tiny", zoo_copy / "gpt2-tiny")
    root = tmp_path / "out"
    base = scan_config_dict(micro_zoo, root, models=[{"name": "g", "id": str(zoo_copy / "gpt2-tiny"),
                                                      "revisions": ["step20"]}],
                            datasets=[{"name": "code", "embedded": "code"}])
    quiet = {"progress": False, "log": lambda *_: None}
    run_scan(parse_config(base), **quiet)
    reseeded = {**base, "sampling": {**base["sampling"], "seed": 4, "shard_size": 45}}
    second = run_scan(parse_config(reseeded), **quiet)
    assert second.stats.ran == 2
    rows = second.tables["bins"].to_pylist()
    assert {r["n"] for r in rows} == {10}  # 90 segments of the new sample, none of the old
    assert len([r for r in rows if r["scope"] == "across"]) == 9 * 2 * 2  # 9 bins x 2 layers x 2 pools
    import duckdb
    con = duckdb.connect()
    counts = con.sql(f"SELECT sample, count(*), count(DISTINCT segment_id) FROM read_parquet("
                     f"'{root}/features/*/*/*/*/*/*.parquet', hive_partitioning=true) GROUP BY sample").fetchall()
    assert sorted(c[1] for c in counts) == [90, 90] and all(c[1] == c[2] for c in counts)
    # same config, nothing changed: no work; weights replaced in place: the unit runs again
    assert run_scan(parse_config(base), **quiet).stats.ran == 0
    src = zoo_copy / "gpt2-tiny"
    shutil.copy(src / "step0" / "model.safetensors", src / "step20" / "model.safetensors")
    assert run_scan(parse_config(base), **quiet).stats.ran == 3


def test_skip_first_must_leave_tokens(micro_zoo, tmp_path):
    out = _cli_scan(tmp_path, scan_config_dict(micro_zoo, tmp_path / "out",
                                               extraction={"skip_first": 32}))
    assert out.returncode == 1 and "error: extraction.skip_first" in out.stderr


def test_balance_uses_every_worker_and_keeps_models_contiguous():
    from dispersion.measure.modeling import ModelSource
    from dispersion.measure.scan import SegmentSet, WorkUnit
    from dispersion.measure.sources import ModelRevision
    from dispersion.measure.units import balance

    def units(model, n):
        mr = ModelRevision(model, "main", ModelSource("/m", None, True), "auto", "models.0", "fp")
        seg = SegmentSet("d", "s", tuple([10] * n))
        return [WorkUnit(mr, seg, k, "spec", "float32") for k in range(n)]

    work = units("big", 8) + units("small", 2)
    queues = balance(work, 5)
    assert len(queues) == 5
    assert sorted((u.mr.model, u.shard) for q in queues for u in q) == sorted((u.mr.model, u.shard) for u in work)
    for q in queues:  # one model per chunk, chunks contiguous: at most one switch per queue here
        models = [u.mr.model for u in q]
        assert sum(a != b for a, b in zip(models, models[1:])) <= 1
    assert balance(work, 1) == [sorted(work, key=lambda u: u.mr.model != "big")]


def test_a_model_can_have_its_own_number_of_segments(micro_zoo, tmp_path):
    """``num_segments`` on a model gives it its own sample (same tokenizer, fewer segments);
    the other models keep the sample they have without it."""
    from dispersion.core.storage import Store
    from dispersion.measure.scan import plan

    quiet = lambda *_: None  # noqa: E731
    base = scan_config_dict(micro_zoo, tmp_path / "a", datasets=[{"name": "code", "embedded": "code"}])
    plain = plan(parse_config(base), Store(str(tmp_path / "a")), log=quiet)
    models = [dict(base["models"][0]), {**base["models"][1], "num_segments": 30}]
    units = plan(parse_config({**base, "root": str(tmp_path / "b"), "models": models}),
                 Store(str(tmp_path / "b")), log=quiet)
    rows = {m: sum(u.n_rows for u in units if u.mr.model == m and u.mr.revision == "step20")
            for m in ("gpt2-tiny", "llama-small")}
    assert rows == {"gpt2-tiny": 90, "llama-small": 30}
    sample = {u.mr.model: u.segments.sample for u in units}
    assert sample["gpt2-tiny"] != sample["llama-small"]
    assert sample["gpt2-tiny"] == next(u.segments.sample for u in plain)
    with pytest.raises(ConfigError, match=r"models.0.num_segments"):
        parse_config({**base, "models": [{**base["models"][0], "num_segments": 0}]})


def test_every_model_source_kind_has_one_entry_and_resolves(micro_zoo, tmp_path):
    """measure/sources.py: one entry per ModelSpec source field; a zoo model at ``all`` is
    every checkpoint present, a local folder at its sub-folders, each fingerprinted."""
    from dispersion.core.config import MODEL_SOURCES
    from dispersion.measure.sources import SOURCES, model_revisions

    assert set(SOURCES) == set(MODEL_SOURCES)
    folder = Path(micro_zoo.cache) / "gpt2-tiny"
    cfg = parse_config(scan_config_dict(micro_zoo, tmp_path, models=[
        {"name": "z", "zoo": "gpt2-tiny", "revisions": "all"},
        {"name": "f", "id": str(folder), "revisions": ["step10"]}]))
    mrs = model_revisions(cfg)
    assert [(m.model, m.revision, m.field) for m in mrs] == [
        ("z", "step0", "models.0"), ("z", "step10", "models.0"), ("z", "step20", "models.0"),
        ("f", "step10", "models.1")]
    assert mrs[1].fingerprint == mrs[3].fingerprint and mrs[1].source.location == mrs[3].source.location
    assert len({m.fingerprint for m in mrs[:3]}) == 3
