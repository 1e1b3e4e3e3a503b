"""The unit protocol and its runners (dispersion.measure.units, tasks/ray_units.py).

Every kind of unit (a scan shard, a kNN-LM datastore or evaluation shard, a query-set shard,
a step's table per model@revision, a fine-tuning run) behaves alike: a run killed in the middle of a unit resumes at once on the same host (its
lease names a process that is gone) and ends with the same bytes as a run that never
stopped; two runs at once compute each unit once; and two `dispersion scan` commands of the
kNN-LM config on one root build each kNN-LM shard once. The Ray options come from one
function.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import scan_config_dict

from dispersion.core.config import RaySpec
from dispersion.core.integrity import CHECKSUMS, verify_root
from dispersion.core.storage import Store
from dispersion.measure.units import Unit, is_done, lease_rel, run_units

REPO = Path(__file__).resolve().parents[1]
QUIET = lambda *_: None  # noqa: E731
KINDS = ("scan", "knnlm", "hardness", "gap", "finetune")

# plans the units of one kind from a config file; runs them (after `go` exists) with the
# in-process runner; with a `stop` path, blocks for good once the second unit holds its lease
CHILD = """
import json, sys, time
from pathlib import Path
from dispersion.config import parse_config
from dispersion.core.storage import Store
from dispersion.measure import units as U

cfg = parse_config(json.loads(Path(sys.argv[1]).read_text()))
kind, ready, go, stop = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
store = Store(cfg.root)
if kind == "scan":
    from dispersion.measure.scan import plan
    units = plan(cfg, store, log=lambda m: None)
else:
    from dispersion.analyses import STEPS
    from dispersion.analyses.registry import StepContext, plan_steps
    units = plan_steps(STEPS, StepContext(cfg, store, [], {}, log=lambda m: None), only=[kind])[kind].units
if stop != "-":
    from dispersion.core.leases import Leases
    renew, started = Leases.renew, []
    def blocking(self, rel, force=False):
        if force:  # a unit starts: its model is loaded, its lease held
            started.append(rel)
            if len(started) == 2:
                Path(stop).write_text(rel)
                time.sleep(3600)
        return renew(self, rel, force)
    Leases.renew = blocking
ready.write_text(str(len(units)))
while not go.exists():
    time.sleep(0.02)
stats = U.run_units(units, store, progress=False, log=lambda m: None)
print(json.dumps({"ran": [m["key"] for m in stats.markers], "skipped": stats.skipped}))
"""


def _config(zoo, root: Path, kind: str) -> dict:
    one = [{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}]
    prose = [{"name": "prose", "embedded": "prose", "split": "validation"}]
    if kind == "scan":
        return scan_config_dict(zoo, root, sampling={"num_segments": 40, "segment_length": 32, "shard_size": 10,
                                                     "seed": 3})
    if kind == "knnlm":
        return scan_config_dict(zoo, root, models=one, datasets=prose,
                                sampling={"num_segments": 30, "segment_length": 32, "shard_size": 30, "seed": 3},
                                analysis={"bin_size": 10, "steps": ["knnlm"], "knnlm": {
                                    "window": 32, "datastore_tokens": 900, "pool_windows": 24, "eval_windows": 6,
                                    "chunks": [4, 8], "seeds": 3, "shard_windows": 8, "k": 32, "max_layers": 1,
                                    "sites": ["block"]}})
    if kind == "gap":  # a table per model@revision, one tensor read (no model loaded)
        return scan_config_dict(zoo, root, analysis={"bin_size": 10, "steps": ["gap"], "gap": {
            "domains": ["digits"], "reference": {"name": "common", "words": [  # the micro zoo's few whole words
                "the", "of", "to", "in", "is", "and", "for", "if", "return", "def", "self", "not"]}}})
    if kind == "finetune":  # a table per entry: fine-tune, then measure base and fine-tuned model
        tiny = {"zoo": "gpt2-tiny", "steps": 2, "batch_size": 4, "seq_len": 32, "eval_every": 2}
        return scan_config_dict(zoo, root, name="units-finetune", models=one, datasets=prose,
                                sampling={"num_segments": 30, "segment_length": 32, "shard_size": 30, "seed": 3},
                                analysis={"bin_size": 10, "steps": ["finetune"], "finetune": [
                                    {**tiny, "method": "lora"}, {**tiny, "method": "full"},
                                    {**tiny, "method": "lora", "domain": "code"}]})
    return scan_config_dict(zoo, root, models=one, datasets=prose,
                            analysis={"bin_size": 10, "steps": ["hardness"], "hardness": {
                                "query_sets": [{"kind": "embedded_cloze", "domain": "prose", "split": "test",
                                                "context": 16, "continuation": 4, "n": 60}],
                                "slice_size": 10, "seeds": 2, "calibration_seeds": 2, "shard_size": 15}})


def _units(cfg_dict: dict, kind: str) -> tuple[Store, list[Unit]]:
    from dispersion.config import parse_config

    cfg = parse_config(cfg_dict)
    store = Store(cfg.root)
    if kind == "scan":
        from dispersion.measure.scan import plan

        return store, list(plan(cfg, store, log=QUIET))
    from dispersion.analyses import STEPS
    from dispersion.analyses.registry import StepContext, plan_steps

    return store, plan_steps(STEPS, StepContext(cfg, store, [], {}, log=QUIET), only=[kind])[kind].units


def _published(store: Store, units: list[Unit]) -> dict[str, str]:
    """Every published file of the units with the checksum of its bytes now."""
    out = {}
    for u in units:
        for rel in (store.read_json(u.marker_rel) or {})[CHECKSUMS]:
            out[rel] = store.checksum(rel)
    return out


def _children(tmp_path: Path, cfg_path: Path, kind: str, n: int, stop: str = "-") -> tuple[list, Path]:
    go = tmp_path / f"go-{kind}-{n}-{stop != '-'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cfg_path), kind, str(tmp_path / f"ready-{go.name}-{i}"),
                               str(go), stop], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(n)]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready-{go.name}-{i}").exists() for i in range(n)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()
        time.sleep(0.05)
    go.write_text("go")
    return procs, go


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_unit_kind_resumes_after_a_kill_and_is_computed_once_by_two_runs(micro_zoo, tmp_path, kind):
    # a clean run: the reference bytes
    clean_store, clean_units = _units(_config(micro_zoo, tmp_path / "clean", kind), kind)
    assert len(clean_units) >= 3 and all(isinstance(u, Unit) for u in clean_units)
    stats = run_units(clean_units, clean_store, progress=False, log=QUIET)
    assert stats.ran == len(clean_units) and stats.rows == sum(u.size for u in clean_units)
    reference = _published(clean_store, clean_units)
    assert run_units(clean_units, clean_store, progress=False, log=QUIET).ran == 0  # a rerun does no work

    # SIGKILL while the second unit holds its lease: the rerun on this host takes it over at once
    killed = tmp_path / "killed"
    cfg_path = tmp_path / f"{kind}-killed.json"
    cfg_path.write_text(json.dumps(_config(micro_zoo, killed, kind)))
    stop = tmp_path / f"{kind}-stopped"
    (proc,), _ = _children(tmp_path, cfg_path, kind, 1, stop=str(stop))
    deadline = time.monotonic() + 240
    while not stop.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    store, units = _units(_config(micro_zoo, killed, kind), kind)
    held = stop.read_text()
    assert store.exists(held) and held in {lease_rel(u) for u in units}  # the dead run's lease is still there
    assert sum(is_done(store, u, log=QUIET) for u in units) == 1
    t0 = time.monotonic()
    again = run_units(units, store, progress=False, log=QUIET)  # lease_seconds stays 600: no waiting for expiry
    assert time.monotonic() - t0 < 120 and again.ran == len(units) - 1 and again.skipped == 1
    assert _published(store, units) == reference
    assert verify_root(store, log=QUIET).ok and not list((killed / "_leases").rglob("*.json"))

    # two runs at once: each unit computed exactly once, the same bytes
    both = tmp_path / "both"
    cfg_path = tmp_path / f"{kind}-both.json"
    cfg_path.write_text(json.dumps(_config(micro_zoo, both, kind)))
    procs, _ = _children(tmp_path, cfg_path, kind, 2)
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    ran = [k for r in results for k in r["ran"]]
    assert sorted(ran) == sorted(u.key for u in units)  # every unit once, none twice
    assert sum(r["skipped"] for r in results) == len(units)  # each run skipped what the other ran
    store, units = _units(_config(micro_zoo, both, kind), kind)
    assert _published(store, units) == reference and not list((both / "_leases").rglob("*.json"))


@pytest.mark.slow
def test_two_knnlm_scans_on_one_root_build_each_shard_once(micro_zoo, tmp_path):
    """Two `dispersion scan` commands of a kNN-LM config started together on one root: the
    kNN-LM shards are built once in all (what each measured adds up to the plan), and both
    end with the same tables."""
    cfg = _config(micro_zoo, tmp_path / "root", "knnlm")
    path = tmp_path / "knnlm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "dispersion.cli", "scan", "--no-progress", "--config", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
        outs.append(out)
    _, units = _units(cfg, "knnlm")
    measured = [int(m.group(1)) for out in outs
                for m in re.finditer(r"analysis knnlm: measured (\d+) of (\d+) units", out)]
    totals = {int(m.group(1)) for out in outs for m in re.finditer(r"analysis knnlm: measured \d+ of (\d+)", out)}
    assert sum(measured) == len(units) and totals <= {len(units)}, outs
    assert not list((tmp_path / "root" / "_leases").rglob("*.json"))
    assert verify_root(Store(str(tmp_path / "root")), log=QUIET).ok


def test_ray_options_come_from_one_function():
    from tasks.ray_units import ray_options, torch_threads

    half = RaySpec(num_cpus=0.5, max_restarts=2)
    actor, task = ray_options(half, actor=True), ray_options(half, actor=False)
    for opts in (actor, task):  # half a CPU runs one thread, never OMP_NUM_THREADS=0 ("every CPU")
        assert opts["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
        assert opts["num_cpus"] == 0.5 and opts["num_gpus"] == half.num_gpus
    assert actor["max_restarts"] == actor["max_task_retries"] == 2 and "max_retries" not in actor
    assert task["max_retries"] == 2 and "max_restarts" not in task
    assert [torch_threads(c) for c in (0.25, 1, 2, 3.5)] == [1, 1, 2, 3]


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    from dispersion.core.leases import Leases, dead_holder

    store = Store(str(tmp_path))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    rel = "_leases/x/shard-00000.json"
    Leases(store, owner="alive").claim(rel)
    body = json.loads((tmp_path / rel).read_text())
    assert body["pid"] == os.getpid() and body["start"] and not dead_holder(body)
    assert Leases(store, owner="other").claim(rel) is not None  # a live holder keeps it
    # the same lease as a process of this host that is gone, then as one of another host
    (tmp_path / rel).write_text(json.dumps({**body, "pid": dead_pid}))
    assert dead_holder(json.loads((tmp_path / rel).read_text()))
    assert Leases(store, owner="other").claim(rel) is None  # taken over though not expired
    (tmp_path / rel).write_text(json.dumps({**body, "owner": "x", "pid": dead_pid, "host": "elsewhere"}))
    assert Leases(store, owner="third").claim(rel) is not None  # another host: the expiry rule
    (tmp_path / rel).write_text(json.dumps({**body, "owner": "x", "pid": os.getppid(), "start": "1"}))
    assert dead_holder(json.loads((tmp_path / rel).read_text()))  # a live pid that another process started: reused
    assert not dead_holder({**body, "start": "1"})  # this process's own pid is never judged dead
