"""The Prefect flows with local Ray: same numbers as in process, resume, checkpoint sweeps,
a killed Ray worker, unreachable addresses (S3: test_flows_s3.py)."""

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import scan_config_dict
from flowcheck import assert_same, features_of, flow_config, reference_scan

from dispersion.core.storage import Store

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the module


@pytest.fixture(scope="module")
def reference(micro_zoo, tmp_path_factory):
    return reference_scan(micro_zoo, tmp_path_factory.mktemp("ref"))


def test_flow_on_local_ray_equals_in_process(micro_zoo, reference, tmp_path):
    from flows.scan_models import scan_models

    root = tmp_path / "flow"
    out = scan_models(flow_config(micro_zoo, root, tmp_path / "cfg.yaml"), str(root))
    assert out["units"] == 8 and out["ran"] == 8
    assert_same(features_of(Store(str(root))), reference[0])
    corr = pq.read_table(root / "results/correlations/t.parquet")
    np.testing.assert_allclose(corr.column("spearman_r").to_numpy(), reference[1].column("spearman_r").to_numpy(),
                               rtol=1e-6)
    assert scan_models(str(tmp_path / "cfg.yaml"), str(root))["ran"] == 0  # resume: no work


def test_checkpoint_sweep_adds_only_new_checkpoints(micro_zoo, tmp_path):
    from flows.checkpoint_sweep import checkpoint_sweep

    root = tmp_path / "sweep"
    cfg = flow_config(micro_zoo, root, tmp_path / "cfg.yaml")
    first = checkpoint_sweep(cfg, "gpt2-tiny", revisions=["step0"], root=str(root))
    assert first["ran"] == 4
    ckpts = str(Path(micro_zoo.cache) / "gpt2-tiny" / "step*")  # the zoo's step0, step10, step20
    second = checkpoint_sweep(cfg, "gpt2-tiny", checkpoint_glob=ckpts, root=str(root))
    assert second["units"] == 12 and second["ran"] == 8  # step0 was done already
    traj = pq.read_table(second["trajectory"]).to_pylist()
    assert [r["revision"] for r in traj] == ["step0", "step10", "step20"]
    assert traj[-1]["corpus_ppl"] < traj[0]["corpus_ppl"]


def test_a_growing_checkpoint_folder_is_swept_incrementally(micro_zoo, tmp_path):
    """A training run's checkpoint folder that keeps growing, swept each night: each run
    extracts only the checkpoints that arrived since the last one; the trajectory grows."""
    import shutil

    from flows.checkpoint_sweep import checkpoint_sweep

    root = tmp_path / "nightly"
    cfg = flow_config(micro_zoo, root, tmp_path / "cfg.yaml")
    zoo, growing = Path(micro_zoo.cache) / "gpt2-tiny", tmp_path / "run" / "gpt2-tiny"
    for step in ("step0", "step10"):  # what the training run has written by the first night
        shutil.copytree(zoo / step, growing / step)
    ckpts = str(growing / "step*")
    first = checkpoint_sweep(cfg, "gpt2-tiny", checkpoint_glob=ckpts, root=str(root))
    assert first["units"] == 8 and first["ran"] == 8
    shutil.copytree(zoo / "step20", growing / "step20")  # the next checkpoint arrives
    second = checkpoint_sweep(cfg, "gpt2-tiny", checkpoint_glob=ckpts, root=str(root))
    assert second["units"] == 12 and second["ran"] == 4  # only step20
    traj = pq.read_table(second["trajectory"]).to_pylist()
    assert [r["revision"] for r in traj] == ["step0", "step10", "step20"]



def _kill_actor_after_first_unit(done_dir: Path, killed: list) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(done_dir.rglob("shard-*.json")):
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        if any("UnitActor" in part for part in (proc.info["cmdline"] or [])):
            proc.kill()
            killed.append(proc.pid)
            return


def test_killed_ray_worker_mid_scan(micro_zoo, reference, tmp_path):
    from flows.scan_models import scan_models

    root = tmp_path / "faulty"
    cfg = flow_config(micro_zoo, root, tmp_path / "cfg.yaml")
    killed: list = []
    killer = threading.Thread(target=_kill_actor_after_first_unit, args=(root / "_done", killed), daemon=True)
    killer.start()
    out = scan_models(cfg, str(root))
    killer.join(5)
    assert killed, "no extraction actor was killed"
    assert out["units"] == 8
    assert_same(features_of(Store(str(root))), reference[0])



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


def test_the_knnlm_flow_is_the_scan_body_with_its_units_on_ray(micro_zoo, tmp_path):
    """The knnlm flow (one flow body with scan-models): the step's shards are planned with the
    scan and built by the Ray actors, the step then only reads them; the same tables as the
    in-process scan; a config without the step is refused in one line."""
    import yaml

    from dispersion.config import parse_config
    from dispersion.core.errors import ConfigError
    from dispersion.run import run_scan
    from flows.hardness import hardness
    from flows.knnlm import knnlm

    cfg = scan_config_dict(micro_zoo, tmp_path / "flow", models=[
        {"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
        datasets=[{"name": "prose", "embedded": "prose", "split": "validation"}],
        sampling={"num_segments": 30, "segment_length": 32, "shard_size": 30, "seed": 3}, ray={"num_cpus": 1},
        analysis={"bin_size": 10, "steps": ["knnlm"], "knnlm": {
            "window": 32, "datastore_tokens": 900, "pool_windows": 24, "eval_windows": 6, "chunks": [4, 8],
            "seeds": 3, "shard_windows": 8, "k": 32, "max_layers": 1, "sites": ["block"]}})
    path = tmp_path / "knnlm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = knnlm(str(path), str(tmp_path / "flow"))
    units = out["step_units"]["knnlm"]
    assert units >= 4 and out["units"] == 1
    markers = list((tmp_path / "flow" / "_done" / "knnlm").rglob("shard-*.json"))
    assert len(markers) == units and not list((tmp_path / "flow" / "_leases").rglob("*.json"))
    run_scan(parse_config({**cfg, "root": str(tmp_path / "alone")}), progress=False, log=lambda m: None)
    for table in ("knnlm_candidates", "knnlm_table1"):
        flow_rows = pq.read_table(tmp_path / f"flow/results/{table}/t.parquet").to_pylist()
        alone_rows = pq.read_table(tmp_path / f"alone/results/{table}/t.parquet").to_pylist()
        assert len(flow_rows) == len(alone_rows) > 0
        for a, b in zip(flow_rows, alone_rows):
            assert a.keys() == b.keys()
            for k in a:
                if k.endswith("seconds"):  # timings
                    continue
                if isinstance(b[k], float):
                    assert a[k] == pytest.approx(b[k], rel=1e-6, nan_ok=True), k
                else:
                    assert a[k] == b[k], k
    with pytest.raises(ConfigError, match="analysis.steps: this flow needs the hardness step"):
        hardness(str(path), str(tmp_path / "flow"))
