"""Units of measuring work (:mod:`dispersion.measure.units`) on Ray actors: the executor
:class:`RayActors` of the one runner loop (:func:`dispersion.measure.units.run_with`).

One actor per GPU (``ray.num_gpus``) or per CPU slot (``ray.num_cpus``). Each actor gets a
queue in which the units of one model are contiguous (:func:`dispersion.measure.units.balance`),
so a model is loaded once per chunk; with more actors than models, large models are split.
Every unit kind runs the same way: a scan's shard, a kNN-LM datastore or evaluation shard, a
query-set shard, a step's table. Actors restart when their process dies (``max_restarts``) and
their pending calls are retried; a retried call first checks the unit's done marker, and outputs are
published atomically, so a crash never duplicates or loses a row. Each unit runs under a lease
of this run (:func:`dispersion.measure.units.run_leased`): a retry re-takes it at once, and
another run of the same root waits for it instead of computing it again.

Only units and small markers travel between driver and actors; the data stays in storage.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence

import ray

from dispersion.core.config import RaySpec
from dispersion.core.errors import DispersionError
from dispersion.core.leases import LEASE_SECONDS, Leases
from dispersion.core.progress import Progress
from dispersion.core.storage import Store
from dispersion.core.threads import set_torch_threads
from dispersion.measure.units import Loaded, RunStats, Unit, advance, balance, lease_rel, run_leased, run_with


class RayError(DispersionError):
    """Ray cannot be reached or started."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A RayError unless something listens at ``address`` (``host:port`` or ``ray://host:port``)."""
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
        check_reachable(address)
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as err:
            raise RayError(f"ray.address: cannot join {address!r}: {str(err).splitlines()[0]}") from None
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def torch_threads(num_cpus: float) -> int:
    """The torch threads of a task or actor holding ``num_cpus`` CPUs: at least one (``0.5``
    CPU runs one thread; ``OMP_NUM_THREADS=0`` would mean "every CPU" to the thread budget)."""
    return max(1, int(num_cpus))


def ray_options(spec: RaySpec, *, actor: bool) -> dict:
    """The one set of Ray options of every actor and task of this package: resources, restarts
    or retries, and the environment (``OMP_NUM_THREADS`` from ``num_cpus``)."""
    env = {"OMP_NUM_THREADS": str(torch_threads(spec.num_cpus)), "TOKENIZERS_PARALLELISM": "false"}
    retry = ({"max_restarts": spec.max_restarts, "max_task_retries": spec.max_restarts} if actor
             else {"max_retries": spec.max_restarts})
    return {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, **retry, "runtime_env": {"env_vars": env}}


@ray.remote
class UnitActor:
    """Holds one loaded model (kept while consecutive units share it); runs one unit per call."""

    def __init__(self, root: str, owner: str, lease_seconds: float = LEASE_SECONDS):
        self.store = Store(root)
        self.leases = Leases(self.store, owner=owner, seconds=lease_seconds)
        self.loaded = Loaded()
        set_torch_threads()  # OMP_NUM_THREADS: this actor's num_cpus (runtime_env)

    def pid(self) -> int:
        return os.getpid()

    def run(self, unit: Unit) -> tuple[str, dict]:
        """``("ran", marker)``, ``("done", marker)`` (a retry after a crash, or another run
        finished it) or ``("leased", lease)`` (another live run is computing it)."""
        return run_leased(unit, self.store, self.leases, self.loaded)


def gather(refs: list, spec: RaySpec, what: str = "unit"):
    """Yield ``(ref, result)`` as each Ray call finishes; a stall of ``spec.stall_timeout_s``
    with nothing finishing is a RayError."""
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1, timeout=spec.stall_timeout_s)
        if not done:
            raise RayError(f"ray.stall_timeout_s: no {what} finished in {spec.stall_timeout_s:g} s; "
                           f"{len(remaining)} of {len(refs)} still pending")
        yield done[0], ray.get(done[0])


def _slots(spec: RaySpec) -> int:
    res = ray.cluster_resources()
    slots = int(res.get("CPU", 1) // spec.num_cpus) if spec.num_cpus else 1
    if spec.num_gpus:
        slots = min(slots, int(res.get("GPU", 0) // spec.num_gpus))
        if slots < 1:
            raise RayError(f"ray.num_gpus: the cluster has {res.get('GPU', 0)} GPUs, an actor asks {spec.num_gpus}")
    return max(1, slots)


class RayActors:
    """The Ray executor of :func:`dispersion.measure.units.run_with`: one :class:`UnitActor`
    per queue of :func:`dispersion.measure.units.balance` (at most one per slot), started only
    when units are pending; a Ray instance this run started is shut down at the end."""

    def __init__(self, root: str, spec: RaySpec, lease_seconds: float = LEASE_SECONDS) -> None:
        self.root, self.spec, self.lease_seconds = root, spec, lease_seconds
        self.actors: list = []
        self.started = False

    def start(self, pending: Sequence[Unit], leases: Leases, bar: Progress) -> None:
        self.leases, self.bar = leases, bar
        self.started = connect(self.spec)
        n = len(balance(pending, min(len(pending), self.spec.max_actors or _slots(self.spec))))
        cls = UnitActor.options(**ray_options(self.spec, actor=True))  # type: ignore[attr-defined]
        self.actors = [cls.remote(self.root, leases.owner, self.lease_seconds) for _ in range(n)]

    def results(self, queue: Sequence[Unit]) -> Iterator[tuple[Unit, str, dict]]:
        refs = {actor.run.remote(u): u for actor, q in zip(self.actors, balance(queue, len(self.actors))) for u in q}
        for ref, (status, info) in gather(list(refs), self.spec):
            unit = refs[ref]
            if status == "ran":
                advance(self.bar, unit, unit.size)
            yield unit, status, info

    def close(self, finished: bool, pending: Sequence[Unit]) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if not finished and self.actors:  # free this run's leases of the units its killed actors held
            for u in pending:
                try:
                    self.leases.release(lease_rel(u))
                except Exception:  # noqa: BLE001 - best effort: they expire anyway
                    break
        if self.started:
            ray.shutdown()


def run_on_ray(units: Sequence[Unit], root: str, spec: RaySpec, *,
               progress: Callable[[dict], None] | None = None, log: Callable[[str], None] = print,
               owner: str | None = None, lease_seconds: float = LEASE_SECONDS) -> RunStats:
    """Run every pending unit on Ray actors (:func:`dispersion.measure.units.run_with` with
    :class:`RayActors`); ``progress`` gets the marker of each unit that ran, with ``elapsed``.
    Units run under leases owned by ``owner`` (pass the same owner to a retry of this run)."""
    actors = RayActors(root, spec, lease_seconds)
    return run_with(actors, units, Store(root), progress=False, log=log, owner=owner, lease_seconds=lease_seconds,
                    on_ran=progress)
