"""Ray work: extraction actors that each hold one model@revision and extract its shards.

One actor per GPU (``ray.num_gpus``) or per CPU slot (``ray.num_cpus``). Each actor gets a
queue of work units in which a model@revision's units are contiguous (``balance``), so a
model is loaded once per chunk; with more actors than models, large models are split.
Actors restart when their process dies (``max_restarts``) and their pending calls are
retried; a retried call first checks the unit's completion marker, and outputs are
published atomically, so a crash never duplicates or loses a segment. Each unit runs under
a lease of this run (``dispersion.core.leases``): a retry re-takes it at once, and another
run scanning the same root at the same time waits for it instead of extracting it again.

Only shard paths and small markers travel back to the driver; the data stays in storage.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import ray

from dispersion.config import RunConfig
from dispersion.core.config import RaySpec
from dispersion.core.errors import DispersionError
from dispersion.core.leases import LEASE_SECONDS, Leases, describe, new_owner
from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from dispersion.measure.scan import WorkUnit, balance, is_done, load_extractor, poll_seconds, run_leased


class RayError(DispersionError):
    """Ray cannot be reached or started."""


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    if address.startswith("ray://"):
        host, _, port = address[len("ray://"):].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise RayError(f"ray.address: cannot reach {address!r} ({err})") from None


def connect(spec: RaySpec) -> bool:
    """Join the configured cluster (``ray.address`` or ``RAY_ADDRESS``) or start a local Ray.

    Returns True when this call started a private local instance (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        _check_reachable(address)
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as err:
            raise RayError(f"ray.address: cannot join {address!r}: {str(err).splitlines()[0]}") from None
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


@ray.remote
class ExtractActor:
    """Holds the current model@revision's extractor; runs one work unit per call."""

    def __init__(self, config_json: str, root: str, owner: str, lease_seconds: float = LEASE_SECONDS):

        self.config = RunConfig.model_validate_json(config_json)
        self.store = Store(root)
        self.leases = Leases(self.store, owner=owner, seconds=lease_seconds)
        self.current: tuple[str, str] | None = None
        self.extractor = None
        set_torch_threads()  # OMP_NUM_THREADS: this actor's num_cpus (runtime_env)

    def pid(self) -> int:
        return os.getpid()

    def _extractor(self, unit: WorkUnit):
        key = (unit.mr.model, unit.mr.revision)
        if self.current != key:
            self.extractor = None
            self.extractor = load_extractor(unit.mr, self.config.extraction, unit.dtype)
            self.current = key
        return self.extractor

    def run(self, unit: WorkUnit) -> tuple[str, dict]:
        """``("ran", marker)``, ``("done", marker)`` (a retry after a crash, or another run
        finished it) or ``("leased", lease)`` (another live run is extracting it)."""
        if is_done(self.store, unit):
            return "done", self.store.read_json(unit.marker_rel) or {}
        return run_leased(unit, self.store, self.leases, self._extractor)


def gather(refs: list, spec: RaySpec, what: str = "unit"):
    """Yield ``(ref, result)`` as each Ray task finishes; a stall of ``spec.stall_timeout_s``
    with nothing finishing is a RayError."""
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1, timeout=spec.stall_timeout_s)
        if not done:
            raise RayError(f"ray.stall_timeout_s: no {what} finished in {spec.stall_timeout_s:g} s; "
                           f"{len(remaining)} of {len(refs)} still pending")
        yield done[0], ray.get(done[0])


def run_tasks(remote_fn, calls: list[tuple], spec: RaySpec, what: str,
              progress: Callable[[dict], None] | None = None) -> None:
    """One Ray task per argument tuple of ``calls`` (``spec.num_cpus`` / ``num_gpus`` each, its
    torch threads from ``OMP_NUM_THREADS = num_cpus``, retried ``spec.max_restarts`` times);
    ``progress`` gets each task's result dict, with ``elapsed``, as it finishes."""
    started = connect(spec)
    task = remote_fn.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_retries=spec.max_restarts,
                             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(spec.num_cpus))),
                                                       "TOKENIZERS_PARALLELISM": "false"}})
    t0 = time.perf_counter()
    try:
        refs = [task.remote(*args) for args in calls]
        for _, result in gather(refs, spec, what):
            if progress is not None:
                progress({**result, "elapsed": time.perf_counter() - t0})
    finally:
        if started:
            ray.shutdown()


def _slots(spec: RaySpec) -> int:
    res = ray.cluster_resources()
    slots = int(res.get("CPU", 1) // spec.num_cpus) if spec.num_cpus else 1
    if spec.num_gpus:
        slots = min(slots, int(res.get("GPU", 0) // spec.num_gpus))
        if slots < 1:
            raise RayError(f"ray.num_gpus: the cluster has {res.get('GPU', 0)} GPUs, an actor asks {spec.num_gpus}")
    return max(1, slots)


def extract_on_ray(config: RunConfig, units: list[WorkUnit], root: str,
                   progress: Callable[[dict], None] | None = None,
                   log: Callable[[str], None] = print, *, owner: str | None = None,
                   lease_seconds: float = LEASE_SECONDS) -> tuple[list[dict], int]:
    """Run every pending unit on Ray actors; returns the completion markers of all units and
    how many units ran now. A unit whose files no longer match its marker is logged (``log``)
    and runs again.

    Units run under leases owned by ``owner`` (one per call unless given: pass the same
    owner to a retry of this run so that it re-takes its own leases at once). A unit leased
    by another live run is waited for, or run here once that lease expires."""
    store = Store(root)
    pending = [u for u in units if not is_done(store, u, log=log)]
    if not pending:
        return [store.read_json(u.marker_rel) for u in units], 0
    owner = owner or new_owner()
    started = connect(config.ray)
    spec = config.ray
    queues = balance(pending, min(len(pending), spec.max_actors or _slots(spec)))
    cls = ExtractActor.options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                               max_restarts=spec.max_restarts, max_task_retries=spec.max_restarts,
                               runtime_env={"env_vars": {"OMP_NUM_THREADS": str(int(spec.num_cpus)),
                                                         "TOKENIZERS_PARALLELISM": "false"}})
    actors = [cls.remote(config.model_dump_json(), root, owner, lease_seconds) for _ in queues]
    t0 = time.perf_counter()
    ran = 0
    said: float | None = None
    finished = False
    try:
        while queues:
            refs = {actor.run.remote(u): u for actor, queue in zip(actors, queues) for u in queue}
            waiting: list[tuple[WorkUnit, dict]] = []
            for ref, (status, info) in gather(list(refs), spec):
                if status == "ran":
                    ran += 1
                    if progress is not None:
                        progress({**info, "elapsed": time.perf_counter() - t0})
                elif status == "leased":
                    waiting.append((refs[ref], info))
            if waiting and (said is None or time.monotonic() - said > 60):
                log(f"waiting for {len(waiting)} work unit(s) that another run is extracting "
                    f"({waiting[0][0].describe()}: {describe(waiting[0][1])})")
                said = time.monotonic()
            if waiting:
                time.sleep(poll_seconds(lease_seconds))
            left = [u for u, _ in waiting if not is_done(store, u, log=log)]
            queues = balance(left, len(actors)) if left else []
        finished = True
    finally:
        for actor in actors:
            ray.kill(actor)
        if not finished:  # free this run's leases of the units its killed actors held
            leases = Leases(store, owner=owner)
            for u in pending:
                try:
                    leases.release(u.lease_rel)
                except Exception:  # noqa: BLE001 - best effort: they expire anyway
                    break
        if started:
            ray.shutdown()
    return [store.read_json(u.marker_rel) for u in units], ran
