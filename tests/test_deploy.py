"""Deployment end to end: a real Prefect server on 127.0.0.1, the repo's infra/prefect.yaml
deployed to a process work pool, a worker, `prefect deployment run --watch`; and the local
stack script (infra/stack.sh up/status/down).

Every server binds 127.0.0.1 on a free port with a temporary PREFECT_HOME, every subprocess
has a timeout, and everything started here is stopped in a ``finally``."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import scan_config_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2):
                return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{url} did not answer within {timeout}s\n{tail}")


def _stop(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """Terminate the process group the process leads, then kill it after ``grace`` s."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):  # leftovers of its group (flow runs, Ray)
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """A live process (not a zombie awaiting its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _base_env(tmp: Path, ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "RAY_", "AWS_"))}
    env.update(
        HOME=str(tmp / "home"),
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=ray_tmp,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    (tmp / "home").mkdir(exist_ok=True)
    return env


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_nightly_deployment_runs_on_a_process_worker(micro_zoo, tmp_path, ray_tmp):
    port = _free_port()
    env = _base_env(tmp_path, ray_tmp)
    api = f"http://127.0.0.1:{port}/api"
    root = tmp_path / "out"
    cfg = scan_config_dict(
        micro_zoo, root,
        models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
        datasets=[{"name": "prose", "embedded": "prose", "split": "validation"}],
        sampling={"num_segments": 60, "segment_length": 32, "shard_size": 30, "seed": 3},
        analysis={"bin_size": 10},
        ray={"num_cpus": 1})
    config = tmp_path / "scan.yaml"
    config.write_text(yaml.safe_dump(cfg))

    server = worker = None
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    try:
        with server_log.open("w") as fh:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_http(f"{api}/health", server, 60, server_log)
        env["PREFECT_API_URL"] = api

        # a deployment to a pool that does not exist is refused (not silently created)
        bad = _run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                    "--name", "nightly", "--pool", "no-such-pool"], env, 60)
        said = " ".join((bad.stdout + bad.stderr).split())
        assert bad.returncode != 0
        assert "work pool 'no-such-pool' which does not exist" in said, said

        out = _run([PREFECT, "work-pool", "create", "dispersion", "--type", "process"], env, 60)
        assert out.returncode == 0, out.stdout + out.stderr
        out = _run([PREFECT, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                    "--name", "nightly"], env, 120)
        assert out.returncode == 0, out.stdout + out.stderr

        out = _run([PREFECT, "deployment", "inspect", "scan-models/nightly", "-o", "json"], env, 60)
        assert out.returncode == 0, out.stderr
        dep = json.loads(out.stdout)
        assert dep["entrypoint"] == "flows/scan_models.py:scan_models"
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
        assert dep["work_pool_name"] == "dispersion"

        with worker_log.open("w") as fh:  # runs start in a temp dir: only the pull step finds the repo
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "dispersion"],
                                      cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        params = json.dumps({"config": str(config), "root": str(root)})
        run = _run([PREFECT, "deployment", "run", "scan-models/nightly", "--params", params,
                    "--watch", "--watch-timeout", "300"], env, 330)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + worker_log.read_text()[-3000:]
        assert "Completed" in run.stdout
        # the report artifact links a page a browser opens (file:// here; a presigned URL on S3)
        from tasks.steps import artifact_key

        out = _run([PREFECT, "artifact", "inspect", f"{artifact_key('t', str(root))}-report", "-o", "json"], env, 60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert (root / "results/report/t.html").as_uri() in out.stdout
    finally:
        _stop(worker)
        _stop(server)

    assert len(list((root / "features").rglob("*.parquet"))) == 2  # 60 segments / shards of 30
    assert list((root / "results/report").glob("*.png"))
    assert (root / "catalog.duckdb").stat().st_size > 0
    assert "set_working_directory" in worker_log.read_text()
    import duckdb

    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:  # the flow run's runs row has its time
        assert con.execute("SELECT ran, seconds FROM runs").fetchall()[0][1] > 0


def test_local_stack_up_status_down(tmp_path, ray_tmp):
    stack_dir = tmp_path / "stack"
    env = _base_env(tmp_path, ray_tmp)
    prefect_port, s3_port = _free_port(), _free_port()
    env.update(STACK_DIR=str(stack_dir), STACK_PREFECT_PORT=str(prefect_port), STACK_S3_PORT=str(s3_port),
               STACK_BIN=str(BIN), STACK_UI="false", STACK_BUCKET="nightly")
    script = ["bash", str(ROOT / "infra/stack.sh")]
    pids = []
    try:
        up = _run([*script, "up"], env, 150)
        pids = [int(p.read_text()) for p in (stack_dir / "pids").glob("*.pid")]
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(pids) == 3

        status = _run([*script, "status"], env, 30)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == 2

        exported = dict(line.removeprefix("export ").split("=", 1)
                        for line in (stack_dir / "env").read_text().splitlines() if line.startswith("export "))
        assert exported["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect_port}/api"
        assert exported["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
        assert exported["RAY_AUTH_MODE"] == "disabled"
        user_env = {**env, **exported}
        check = _run([str(BIN / "python"), "-c",
                      "import boto3; print([b['Name'] for b in boto3.client('s3').list_buckets()['Buckets']])"],
                     user_env, 60)
        assert check.returncode == 0 and "nightly" in check.stdout, check.stderr
        deployed = ("scan-models/nightly", "checkpoint-sweep/sweep", "train-sweep/train-sweep")
        assert f"deployed {', '.join(deployed)}" in up.stderr
        # infra/README's commands as written: `source .stack/env`, then a plain `prefect` (no .venv on PATH)
        plain = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        plain["PATH"] = "/usr/bin:/bin"
        for name in deployed:
            out = _run(["bash", "-c", f"source {stack_dir}/env && prefect deployment inspect '{name}' -o json"],
                       plain, 60)
            assert out.returncode == 0, name + out.stdout + out.stderr

        # every deployment infra/README's stack block runs exists, and its `status` line runs as written
        block = (ROOT / "infra/README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
        named = re.findall(r"prefect deployment run '([^']+)'", block)
        assert named and set(named) <= set(deployed), named
        assert "bash infra/stack.sh status" in block
        again = _run([*script, "up"], env, 60)  # already up: a no-op
        assert again.returncode == 0 and "already up" in again.stderr
    finally:
        down = _run([*script, "down"], env, 60)
        for pid in pids:  # never leave anything behind, even if down failed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert down.returncode == 0, down.stderr
    assert not list((stack_dir / "pids").glob("*.pid"))
    for pid in pids:  # SIGKILL is asynchronous: give the kernel a moment to tear a process down
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), pid
    status = _run([*script, "status"], env, 30)
    assert status.returncode == 3 and status.stdout.count("stopped") == 3
    down = _run([*script, "down"], env, 30)
    assert down.returncode == 0 and "nothing running" in down.stderr
