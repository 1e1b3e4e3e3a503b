"""Leases: exclusive creates locally and on S3 (moto), takeover of expired leases, and scans
of one root at the same time splitting the work units (each extracted exactly once)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import scan_config_dict

from dispersion.core.leases import Leases
from dispersion.core.storage import Store

REPO = Path(__file__).resolve().parents[1]
QUIET = lambda *_: None  # noqa: E731
REL = "_leases/model=m/shard-00000.json"


def _primitives(store: Store) -> None:
    tag = store.create("x/obj.json", b"one")
    assert tag is not None and store.create("x/obj.json", b"two") is None
    assert store.read_versioned("x/obj.json") == (b"one", tag)
    assert store.replace_if("x/obj.json", b"two", "stale-tag") is None
    new = store.replace_if("x/obj.json", b"two", tag)
    assert new is not None and store.read_versioned("x/obj.json") == (b"two", new)
    assert not store.delete_if("x/obj.json", tag)  # the old version is gone
    assert store.delete_if("x/obj.json", new) and store.read_versioned("x/obj.json") is None
    assert not store.delete_if("x/obj.json", new)
    assert store.create("x/obj.json", b"three") is not None


def _leases(store: Store) -> None:
    now = [1000.0]
    a = Leases(store, owner="run-a", seconds=60, clock=lambda: now[0])
    b = Leases(store, owner="run-b", seconds=60, clock=lambda: now[0])
    assert a.claim(REL, note="unit 0") is None and a.holds(REL)
    held = b.claim(REL)
    assert held is not None and held["owner"] == "run-a" and held["note"] == "unit 0"
    assert Leases(store, owner="run-a", seconds=60, clock=lambda: now[0]).claim(REL) is None  # a retry of run a
    now[0] += 61  # run a stopped renewing: its lease expired
    assert b.holder(REL) is None
    assert b.claim(REL) is None and b.holds(REL)
    assert not a.renew(REL, force=True)  # a lost it and must not overwrite b's lease
    a.release(REL)
    assert b.holder(REL)["owner"] == "run-b"
    b.release(REL)
    assert b.holder(REL) is None and store.read_versioned(REL) is None


def _one_taker(store: Store, n: int = 8) -> list:
    """``n`` runs (threads) take over one expired lease at once: the winners."""
    Leases(store, owner="crashed", seconds=60, clock=lambda: time.time() - 3600).claim(REL)
    barrier = threading.Barrier(n)
    won: list = []

    def take(i: int) -> None:
        leases = Leases(store, owner=f"run-{i}", seconds=60)
        barrier.wait()
        if leases.claim(REL) is None:
            won.append(i)
    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def _sweep(store: Store) -> None:
    """``sweep`` removes the leases nobody holds (own leftovers, expired, a gone process of
    this host, unreadable, a published unit's) and keeps the live ones of other runs."""
    import socket

    from dispersion.core.processes import pid_namespace

    now = [1000.0]
    me = Leases(store, owner="run-a", seconds=60, clock=lambda: now[0])
    other = Leases(store, owner="run-b", seconds=60, clock=lambda: now[0])
    rel = lambda name: f"_leases/model=m/{name}.json"  # noqa: E731
    assert me.claim(rel("held")) is None
    assert Leases(store, owner="run-a", seconds=60, clock=lambda: now[0]).claim(rel("own-leftover")) is None
    assert other.claim(rel("live")) is None and other.claim(rel("published")) is None
    store.write_json("_done/model=m/published.json", {"unit": "published"})
    Leases(store, owner="run-c", seconds=60, clock=lambda: now[0] - 3600).claim(rel("expired"))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    store.create(rel("dead"), json.dumps({"owner": "run-d", "host": socket.gethostname(),
                                          "pid": int(finished.stdout), "start": "", "pidns": pid_namespace(),
                                          "expires": now[0] + 600}).encode())
    store.create(rel("garbled"), b"not json")
    assert me.sweep() == 5
    left = sorted(r.rsplit("/", 1)[1] for r in store.files("_leases"))
    assert left == ["held.json", "live.json"]
    me.release(rel("held"))
    other.release(rel("live"))
    assert me.sweep() == 0 and store.files("_leases") == []


def test_exclusive_create_and_conditional_writes_locally(tmp_path):
    store = Store(str(tmp_path / "r"))
    _primitives(store)
    _leases(store)
    _sweep(store)
    assert len(_one_taker(store)) == 1
    assert not [p for p in (tmp_path / "r").rglob(".*")]  # no temporary file left


_CHURN = """
import sys
from dispersion.core.leases import Leases
from dispersion.core.storage import Store
store, me = Store(sys.argv[1]), sys.argv[2]
leases = Leases(store, owner=me, seconds=60)
for i in range(300):
    rel = f"_leases/model=m/revision=r/sample={i % 3}/spec={me}-{i}.json"
    assert leases.claim(rel) is None
    leases.release(rel)
"""


def test_claims_race_releases_that_prune_the_same_folders(tmp_path):
    """One run's release removes a folder that has just emptied while another run is making
    the same folder for its own lease: the claim makes the folder again instead of failing."""
    root = tmp_path / "r"
    procs = [subprocess.Popen([sys.executable, "-c", _CHURN, str(root), f"run{k}"], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for k in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert not list(root.rglob("*.json"))


def test_a_folder_removed_between_making_it_and_writing_is_made_again(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "r"))
    real, removed = os.makedirs, []

    def makedirs_then_pruned(path, *args, **kwargs):  # another run's prune_empty in between
        real(path, *args, **kwargs)
        if not removed:
            removed.append(path)
            os.rmdir(path)
    monkeypatch.setattr(os, "makedirs", makedirs_then_pruned)
    assert store.create("_leases/a/b/lease.json", b"x") is not None
    assert removed and (tmp_path / "r/_leases/a/b/lease.json").read_bytes() == b"x"


def test_exclusive_create_and_conditional_writes_on_s3(s3):
    store = Store("s3://dispersion-test/leases")
    assert store.conditional
    _primitives(store)
    _leases(store)
    _sweep(store)
    assert len(_one_taker(store, n=4)) == 1


# -- scans ---------------------------------------------------------------------------------------

def _config(zoo, root: Path) -> dict:
    """A scan only (:class:`dispersion.core.config.ScanConfig`): one model, 6 units of 8 segments."""
    cfg = scan_config_dict(zoo, root, models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
                           datasets=[{"name": "code", "embedded": "code"}],
                           sampling={"num_segments": 48, "segment_length": 16, "shard_size": 8, "seed": 3},
                           extraction={"layers": ["final"], "pools": ["last"], "batch_size": 8})
    del cfg["analysis"]
    return cfg


def _plan(zoo, root: Path):
    from dispersion.core.config import ScanConfig, validate
    from dispersion.measure.scan import plan

    cfg = validate(ScanConfig, _config(zoo, root), "cfg")
    store = Store(str(root))
    return cfg, store, plan(cfg, store, log=QUIET)


def _ppl(root: Path) -> dict:
    out = {}
    for path in sorted((root / "features").rglob("shard-*.parquet")):
        t = pq.read_table(path)
        out.update(zip(t.column("segment_id").to_pylist(), t.column("ppl").to_pylist()))
    return out


CHILD = """
import json, sys, time
from pathlib import Path
from dispersion.core.config import ScanConfig, validate
from dispersion.core.storage import Store
from dispersion.measure.scan import execute, plan
cfg = validate(ScanConfig, json.loads(Path(sys.argv[1]).read_text()), "cfg")
store = Store(cfg.root)
units = plan(cfg, store, log=lambda *_: None)
Path(sys.argv[2]).write_text("ready")
while not Path(sys.argv[3]).exists():
    time.sleep(0.02)
stats = execute(units, cfg, store, progress=False, log=lambda *_: None)
print(json.dumps({"ran": [m["unit"] for m in stats.markers], "skipped": stats.skipped}))
"""


def test_two_scans_at_once_split_the_units(micro_zoo, tmp_path):
    """Two processes scan one root at the same time: every unit is extracted exactly once in
    total, and the numbers equal those of one scan alone."""
    root = tmp_path / "shared"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_config(micro_zoo, root)))
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cfg_path), str(tmp_path / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()
        time.sleep(0.05)
    go.write_text("go")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    ran = [u for r in results for u in r["ran"]]
    assert len(ran) == len(set(ran)) == 6  # 48 segments in shards of 8, each extracted once
    assert sum(r["skipped"] for r in results) + len(ran) == 2 * 6
    assert not list((root / "_leases").rglob("*.json"))  # every lease released

    from dispersion.measure.scan import execute

    cfg, store, units = _plan(micro_zoo, tmp_path / "alone")
    execute(units, cfg, store, progress=False, log=QUIET)
    alone, shared = _ppl(tmp_path / "alone"), _ppl(root)
    assert alone.keys() == shared.keys() and len(alone) == 48
    np.testing.assert_array_equal([shared[k] for k in sorted(alone)], [alone[k] for k in sorted(alone)])


def test_stale_leases_are_taken_over_and_own_leases_retaken(micro_zoo, tmp_path):
    """A lease whose run died (expired, or expiring while the scan waits) is taken over;
    a lease of this run's own owner (a retry) is taken at once."""
    from dispersion.measure.scan import execute

    cfg, store, units = _plan(micro_zoo, tmp_path / "r")
    Leases(store, owner="crashed", clock=lambda: time.time() - 3600).claim(units[0].lease_rel)
    Leases(store, owner="dying", seconds=1.5).claim(units[1].lease_rel)
    Leases(store, owner="this-run").claim(units[2].lease_rel)
    logs: list[str] = []
    t0 = time.monotonic()
    stats = execute(units, cfg, store, progress=False, log=logs.append, owner="this-run", lease_seconds=2)
    assert stats.ran == 6 and stats.skipped == 0
    assert time.monotonic() - t0 < 60
    assert any(line.startswith("waiting for 1 unit(s) that another run is computing") for line in logs), logs
    assert not list((tmp_path / "r" / "_leases").rglob("*.json"))


def test_a_unit_another_run_holds_is_waited_for_not_repeated(micro_zoo, tmp_path):
    from dispersion.measure.scan import execute, load_extractor, run_unit

    cfg, store, units = _plan(micro_zoo, tmp_path / "r")
    other = Leases(store, owner="other-run", seconds=30)
    assert other.claim(units[0].lease_rel) is None

    def finish() -> None:  # the other run publishes the unit a little later, then releases it
        time.sleep(1.0)
        run_unit(units[0], load_extractor(units[0].mr, cfg.extraction, units[0].dtype), store)
        other.release(units[0].lease_rel)
    thread = threading.Thread(target=finish)
    thread.start()
    stats = execute(units, cfg, store, progress=False, log=QUIET, lease_seconds=30)
    thread.join()
    assert stats.ran == 5 and stats.skipped == 1
    assert units[0].describe() not in [m["unit"] for m in stats.markers]


def test_a_failed_unit_releases_its_lease(micro_zoo, tmp_path, monkeypatch):
    from dispersion.measure import scan

    cfg, store, units = _plan(micro_zoo, tmp_path / "r")

    def boom(*a, **k):
        raise RuntimeError("extraction failed")
    monkeypatch.setattr(scan, "run_unit", boom)
    with pytest.raises(RuntimeError, match="extraction failed"):
        scan.execute(units, cfg, store, progress=False, log=QUIET)
    assert not list((tmp_path / "r" / "_leases").rglob("*.json"))


def test_ray_actors_wait_for_leased_units_and_retake_their_own(micro_zoo, tmp_path):
    """The Ray path under leases: a unit another live run holds is waited for (that run
    publishes it), a lease of this run's owner (a retried task) is taken at once."""
    from dispersion.config import RunConfig
    from dispersion.measure.scan import load_extractor, run_unit
    from dispersion.measure.units import is_done
    from tasks.ray_units import run_on_ray

    cfg, store, units = _plan(micro_zoo, tmp_path / "r")
    run_cfg = RunConfig.model_validate({**cfg.model_dump(), "ray": {"num_cpus": 1, "max_actors": 1}})
    other = Leases(store, owner="other-run", seconds=120)
    assert other.claim(units[0].lease_rel) is None
    Leases(store, owner="flow-run-1").claim(units[1].lease_rel)

    def finish() -> None:  # the other run publishes its unit once the rest is done
        while not all(is_done(store, u, log=QUIET) for u in units[1:]):
            time.sleep(0.2)
        run_unit(units[0], load_extractor(units[0].mr, cfg.extraction, units[0].dtype), store)
        other.release(units[0].lease_rel)
    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    logs: list[str] = []
    stats = run_on_ray(units, str(tmp_path / "r"), run_cfg.ray, log=logs.append, owner="flow-run-1",
                       lease_seconds=20)
    thread.join(60)
    assert stats.ran == 5 and stats.skipped == 1 and all(is_done(store, u) for u in units)
    assert any(line.startswith("waiting for 1 unit(s)") for line in logs), logs
    assert not list((tmp_path / "r" / "_leases").rglob("*.json"))

