"""The Prefect flows with local Ray: same numbers as in process, S3 through a real
S3-compatible server, resume, and faults (a killed Ray worker, an S3 outage)."""

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from conftest import scan_config_dict
from dispersion.core.catalog import query
from dispersion.core.errors import DataError
from dispersion.run import run_scan
from dispersion.core.storage import Store
from servers import restore_env, set_env

QUIET = {"progress": False, "log": lambda *_: None}


def _config(zoo, root, path: Path) -> str:
    import yaml

    cfg = scan_config_dict(zoo, root,
                           models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step0", "step20"]}],
                           datasets=[{"name": "code", "embedded": "code"}],
                           sampling={"num_segments": 60, "segment_length": 32, "shard_size": 15, "seed": 5},
                           ray={"num_cpus": 1})
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _features(store: Store) -> dict:
    """(model, revision, segment_id) -> ppl over every features shard under a store."""
    out = {}
    for rel in store.glob("features/*/*/*/*/*/shard-*.parquet"):
        parts = dict(p.split("=", 1) for p in rel.split("/")[1:-1])
        t = store.read_table(rel)
        for sid, ppl in zip(t.column("segment_id").to_pylist(), t.column("ppl").to_pylist()):
            key = (parts["model"], parts["revision"], sid)
            assert key not in out, f"duplicate segment {key}"
            out[key] = ppl
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 2 * 60
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=1e-5)


@pytest.fixture(scope="module")
def reference(micro_zoo, tmp_path_factory):
    """The in-process scan: the numbers every orchestrated run must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg_path = _config(micro_zoo, tmp / "out", tmp / "cfg.yaml")
    from dispersion.config import load_config

    result = run_scan(load_config(cfg_path), **QUIET)
    return _features(Store(str(tmp / "out"))), result.tables["correlations"]


def test_flow_on_local_ray_equals_in_process(micro_zoo, reference, tmp_path):
    from flows.scan_models import scan_models

    root = tmp_path / "flow"
    out = scan_models(_config(micro_zoo, root, tmp_path / "cfg.yaml"), str(root))
    assert out["units"] == 8 and out["ran"] == 8
    _assert_same(_features(Store(str(root))), reference[0])
    corr = pq.read_table(root / "results/correlations/t.parquet")
    np.testing.assert_allclose(corr.column("spearman_r").to_numpy(), reference[1].column("spearman_r").to_numpy(),
                               rtol=1e-6)
    assert scan_models(str(tmp_path / "cfg.yaml"), str(root))["ran"] == 0  # resume: no work


def test_checkpoint_sweep_adds_only_new_checkpoints(micro_zoo, tmp_path):
    from flows.checkpoint_sweep import checkpoint_sweep

    root = tmp_path / "sweep"
    cfg = _config(micro_zoo, root, tmp_path / "cfg.yaml")
    first = checkpoint_sweep(cfg, "gpt2-tiny", revisions=["step0"], root=str(root))
    assert first["ran"] == 4
    ckpts = str(Path(micro_zoo.cache) / "gpt2-tiny" / "step*")  # the zoo's step0, step10, step20
    second = checkpoint_sweep(cfg, "gpt2-tiny", checkpoint_glob=ckpts, root=str(root))
    assert second["units"] == 12 and second["ran"] == 8  # step0 was done already
    traj = pq.read_table(second["trajectory"]).to_pylist()
    assert [r["revision"] for r in traj] == ["step0", "step10", "step20"]
    assert traj[-1]["corpus_ppl"] < traj[0]["corpus_ppl"]


def test_scan_to_s3_query_with_duckdb_and_resume(micro_zoo, reference, tmp_path, s3):
    from flows.scan_models import scan_models

    root = "s3://dispersion-test/nightly"
    cfg = _config(micro_zoo, root, tmp_path / "cfg.yaml")
    out = scan_models(cfg, root)
    assert out["ran"] == 8 and out["catalog"] == f"{root}/catalog.duckdb"
    store = Store(root)
    _assert_same(_features(store), reference[0])
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


def _kill_actor_after_first_unit(done_dir: Path, killed: list) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(done_dir.rglob("shard-*.json")):
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        if any("ExtractActor" in part for part in (proc.info["cmdline"] or [])):
            proc.kill()
            killed.append(proc.pid)
            return


def test_killed_ray_worker_mid_scan(micro_zoo, reference, tmp_path):
    from flows.scan_models import scan_models

    root = tmp_path / "faulty"
    cfg = _config(micro_zoo, root, tmp_path / "cfg.yaml")
    killed: list = []
    killer = threading.Thread(target=_kill_actor_after_first_unit, args=(root / "_done", killed), daemon=True)
    killer.start()
    out = scan_models(cfg, str(root))
    killer.join(5)
    assert killed, "no extraction actor was killed"
    assert out["units"] == 8
    _assert_same(_features(Store(str(root))), reference[0])


def test_s3_outage_while_shards_are_written(micro_zoo, reference, tmp_path, s3):
    from flows.scan_models import scan_models

    root = "s3://dispersion-test/outage"
    cfg = _config(micro_zoo, root, tmp_path / "cfg.yaml")
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
    _assert_same(_features(store), reference[0])


def test_unreachable_ray_address_is_one_line():
    from servers import free_port
    from tasks.ray_extract import RayError, connect

    from dispersion.core.config import RaySpec

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RayError, match=rf"ray.address: cannot reach '127.0.0.1:{port}'"):
        connect(RaySpec(address=f"127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("args, message", [
    (["scan-models", "--config", "no/such.yaml"], "no/such.yaml: config file not found"),
    (["scan-models", "--config", "configs/default.yaml", "--root", "s3://no-such-bucket/x"],
     "root: bucket 'no-such-bucket' does not exist"),
])
def test_flow_cli_bad_input_is_one_line(args, message, s3):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "flows", *args], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), out.stderr


def test_flow_cli_unreachable_ray(tmp_path, micro_zoo):
    import subprocess
    import sys

    import yaml
    from servers import free_port

    cfg = scan_config_dict(micro_zoo, tmp_path / "out", ray={"address": f"127.0.0.1:{free_port()}"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "flows", "scan-models", "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 1 and out.stderr.startswith("error: ray.address: cannot reach")
    assert len(out.stderr.strip().splitlines()) == 1
