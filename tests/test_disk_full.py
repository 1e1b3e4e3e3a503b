"""A root that runs out of space mid-scan (a patched ``open`` that refuses writes past a byte
budget with ENOSPC, and a real small tmpfs where the test may mount one): one ``error:``
line naming the root, the bytes and the file, no temporary file, no lease left; the rerun
once there is room ends with the numbers of a clean scan. A warning comes first when the
plan will not fit the free space."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import scan_config_dict

REPO = Path(__file__).resolve().parents[1]

# The scan of the CLI, with ``open`` refusing writes under ROOT once BUDGET bytes are written
# and the free space of ROOT's device reported as BUDGET.
_FULL = """
import builtins, errno, os, shutil, sys
root, budget = os.path.realpath(sys.argv[1]), [int(sys.argv[2])]
real_open, real_usage = builtins.open, shutil.disk_usage

class Full:
    def __init__(self, fh): self.fh = fh
    def write(self, data):
        budget[0] -= len(data)
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)
    def __enter__(self): return self
    def __exit__(self, *exc): self.fh.close()
    def __getattr__(self, name): return getattr(self.fh, name)

def full_open(file, mode="r", *args, **kwargs):
    fh = real_open(file, mode, *args, **kwargs)
    under = isinstance(file, (str, os.PathLike)) and os.path.realpath(file).startswith(root)
    return Full(fh) if under and any(c in mode for c in "wax") else fh

def usage(path):
    u = real_usage(path)
    mine = os.path.realpath(path).startswith(root) or root.startswith(os.path.realpath(path))  # or its parents
    return u._replace(free=max(budget[0], 0)) if mine else u

builtins.open, shutil.disk_usage = full_open, usage
sys.argv = ["dispersion", "scan", "--config", sys.argv[3], "--no-progress"]
from dispersion.cli import main
main()
"""


def _scan(cfg: Path, root: Path, budget: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["-c", _FULL, str(root), str(budget), str(cfg)] if budget is not None else \
        ["-m", "dispersion.cli", "scan", "--config", str(cfg), "--no-progress"]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _config(zoo, root: Path | str, tmp: Path) -> Path:
    cfg = scan_config_dict(zoo, root, models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
                           sampling={"num_segments": 60, "segment_length": 32, "shard_size": 20, "seed": 3},
                           analysis={"bin_size": 10})
    path = tmp / f"{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(cfg))
    return path


def _numbers(root: Path) -> dict:
    """Per-segment perplexities (by shard path under features/) and the correlations."""
    feats = {str(f.relative_to(root / "features")): pq.read_table(f, columns=["segment_id", "ppl"]).to_pylist()
             for f in sorted((root / "features").rglob("*.parquet"))}
    corr = sorted((r["dataset"], r["layer"], r["pool"], r["scope"], r["bins"], r["spearman_r"], r["pearson_r"])
                  for r in pq.read_table(root / "results/correlations/t.parquet").to_pylist())
    return {"features": feats, "correlations": corr}


def _leftovers(root: Path) -> list[Path]:
    temps = [p for p in root.rglob(".*") if ".tmp-" in p.name]
    leases = list((root / "_leases").rglob("*")) if (root / "_leases").exists() else []
    return temps + leases


@pytest.fixture(scope="module")
def clean(micro_zoo, tmp_path_factory) -> tuple[dict, int]:
    """A clean scan's numbers and the bytes of its shards (features and vectors)."""
    tmp = tmp_path_factory.mktemp("clean")
    root = tmp / "root"
    out = _scan(_config(micro_zoo, root, tmp), root)
    assert out.returncode == 0, out.stderr[-3000:]
    size = sum(p.stat().st_size for folder in ("features", "vectors") for p in (root / folder).rglob("*")
               if p.is_file())
    return _numbers(root), size


def test_a_full_disk_ends_in_one_line_and_the_rerun_resumes(micro_zoo, clean, tmp_path):
    reference, size = clean
    root = tmp_path / "root"
    cfg = _config(micro_zoo, root, tmp_path)
    out = _scan(cfg, root, budget=size // 2)  # half the shards fit
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left on the device holding {root}: ")
    assert " bytes needed for " in lines[0] and "run the same command again" in lines[0]
    said = re.search(r"warning: this scan will publish about ([\d.]+) (B|kB|MB|GB) into ", out.stdout)
    assert said, out.stdout  # said before anything was written
    estimate = float(said.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[said.group(2)]
    assert 0.5 * size <= estimate <= 2 * size, (estimate, size)  # the shards a clean scan publishes
    assert not _leftovers(root)
    again = _scan(cfg, root)  # room again
    assert again.returncode == 0, again.stderr[-3000:]
    assert _numbers(root) == reference
    assert not _leftovers(root)


def test_on_a_small_tmpfs(micro_zoo, clean, tmp_path):
    """The real thing where this test may mount a tmpfs (root on Linux)."""
    reference, size = clean
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    kb = max(size // 2 // 1024, 64)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        root = mnt / "root"
        cfg = _config(micro_zoo, root, tmp_path)
        out = _scan(cfg, root)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
        assert lines[0].startswith(f"error: no space left on the device holding {root}: ")
        assert not _leftovers(root)
        subprocess.run(["mount", "-o", f"remount,size={size // 1024 * 4 + 4096}k", str(mnt)], check=True)
        again = _scan(cfg, root)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _numbers(root) == reference and not _leftovers(root)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_an_object_store_outage_longer_than_the_retries_ends_in_one_line_and_resumes(micro_zoo, clean, tmp_path,
                                                                                      s3):
    """The S3 endpoint goes away for longer than the store retries (2 s here, 60 s by default):
    one line saying so; the rerun once it is back publishes the numbers of a clean scan."""
    import threading
    import time

    from dispersion.core.storage import Store

    reference, _ = clean
    root = "s3://dispersion-test/outage"
    cfg = _config(micro_zoo, root, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DISPERSION_STORE_RETRY_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "dispersion.cli", "scan", "--config", str(cfg), "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = Store(root)
    deadline = time.monotonic() + 300
    while not store.glob("_done/measured/**/*.json") and not store.glob("_done/model=*/*/*/*/*/shard-*.json"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    down = threading.Thread(target=s3.outage, args=(20.0,), daemon=True)
    down.start()
    out, err = proc.communicate(timeout=300)
    down.join(30)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: {root} did not answer for 2 s (") and "run the same command again" in lines[0]
    again = subprocess.run([sys.executable, "-m", "dispersion.cli", "scan", "--config", str(cfg), "--no-progress"],
                           cwd=REPO, env={**env, "DISPERSION_STORE_RETRY_S": "60"}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    corr = sorted((r["dataset"], r["layer"], r["pool"], r["scope"], r["bins"], r["spearman_r"], r["pearson_r"])
                  for r in store.read_table("results/correlations/t.parquet").to_pylist())
    assert corr == reference["correlations"]
    assert not store.glob("_leases/**/*.json")
