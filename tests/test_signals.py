"""Signals, dead owners and run records through the CLI: SIGTERM and SIGKILL mid-extraction,
scans finishing together, a report killed mid-write (docs/GUARANTEES.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import scan_config_dict

from dispersion.core.storage import Store

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config(zoo, tmp_path: Path, root: Path) -> Path:
    cfg = scan_config_dict(zoo, root, models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step0", "step20"]},
                                              {"name": "llama-small", "zoo": "llama-small", "revisions": ["step20"]}],
                           sampling={"num_segments": 120, "segment_length": 32, "shard_size": 10, "seed": 3})
    path = tmp_path / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scan(path: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dispersion.cli", "scan", "--no-progress", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, **kw)


def _after_first_units(proc: subprocess.Popen, root: Path, n: int = 2) -> None:
    deadline = time.monotonic() + 300
    while len(list((root / "_done").glob("model=*/**/shard-*.json"))) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def _leases(root: Path) -> list[Path]:
    """Lease files and lease folders left under the root."""
    return list((root / "_leases").rglob("*")) if (root / "_leases").exists() else []


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_scan_releases_its_leases_says_so_and_resumes_at_once(micro_zoo, tmp_path, sig, code):
    root = tmp_path / "r"
    path = _config(micro_zoo, tmp_path, root)
    proc = _scan(path)
    _after_first_units(proc, root)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    word = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
    assert last.startswith(f"{word}: ") and "run the same command again to resume" in last, err
    assert "Traceback" not in err
    assert not _leases(root)  # every lease released
    t0 = time.monotonic()
    rerun = _scan(path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert time.monotonic() - t0 < 240 and "waiting for" not in out + err
    assert not _leases(root)


def test_after_sigkill_the_rerun_on_this_host_does_not_wait(micro_zoo, tmp_path):
    root = tmp_path / "k"
    path = _config(micro_zoo, tmp_path, root)
    proc = _scan(path)
    _after_first_units(proc, root)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    rerun = _scan(path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "waiting for" not in out + err  # the dead run's lease is taken over at once (600 s expiry otherwise)
    assert not _leases(root)


def test_scans_finishing_together_keep_their_own_manifests(micro_zoo, tmp_path):
    from dispersion.config import load_config
    from dispersion.measure.scan import new_run_id

    root = tmp_path / "m"
    path = _config(micro_zoo, tmp_path, root)
    first = _scan(path)
    assert first.wait(300) == 0
    procs = [_scan(path) for _ in range(3)]  # nothing left to extract: they finish within a second or two
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert len(list(root.glob("runs/*/manifest.json"))) == 4
    cfg = load_config(str(path))
    ids = {new_run_id(cfg) for _ in range(50)}  # the same second, the same config
    assert len(ids) == 50 and len({i[:15] for i in ids}) <= 2


def test_a_writer_killed_mid_write_leaves_nothing_the_next_run_keeps(tmp_path):
    """A temporary file of a dead writer (a report killed mid-write): the next write of the same
    file removes it; `dispersion verify` lists such files and `--repair` removes them."""
    store = Store(str(tmp_path))
    store.write_bytes("results/report/t.png", b"png")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = tmp_path / "results/report" / f".t.png.tmp-{pid}-0123abcd"
    other = tmp_path / "results/report" / f".u.png.tmp-{pid}-0123abcd"
    live = tmp_path / "results/report" / f".t.png.tmp-{os.getppid()}-0123abcd"  # a live writer's: kept
    for p in (left, other, live):
        p.write_bytes(b"")
    store.write_bytes("results/report/t.png", b"png2")
    assert not left.exists() and other.exists() and live.exists()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "dispersion.cli", "verify", "--root", str(tmp_path)]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=REPO)
    assert f"temporary: results/report/{other.name}" in out.stdout and "(`--repair` removes them)" in out.stdout
    out = subprocess.run([*cli, "--repair"], capture_output=True, text=True, env=env, cwd=REPO)
    assert not other.exists() and live.exists() and "1 temporary files of interrupted writes removed" in out.stdout
