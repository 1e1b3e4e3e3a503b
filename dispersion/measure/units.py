"""Units of measuring work, and the one runner that does them.

A *unit* is the smallest piece of measuring work that publishes files: one shard of a scan's
segments through one model@revision (:class:`dispersion.measure.scan.WorkUnit`), one kNN-LM
datastore or evaluation shard (:class:`dispersion.measure.knnlm.KnnUnit`), one shard of a
query set (:class:`dispersion.measure.queries.QueryUnit`). Every kind has

* ``key``: the digest of every input that determines its files, recorded in its done marker;
* ``marker_rel``: its done marker, written last, naming the files and their checksums;
  :meth:`Unit.expect` lists the marker fields that must match for the unit to count as done;
* ``model_key``: units that share it share one loaded model (:meth:`Unit.load`);
* ``size``: its rows (segments, windows, queries), for progress; an optional ``cost`` (expected
  compute, e.g. FLOPs; default ``size``) weighs the progress ETA;
* :meth:`Unit.run`: compute with the loaded model and publish, data first, marker last.

An analysis step whose measurement is one small table per model@revision (a condensation map,
the states of n-gram clusters, an output-embedding gap, a fine-tuning run's before and after)
uses :class:`TableUnit`.

Its lease lives at :func:`dispersion.core.layout.lease_of` its marker. :func:`run_with` is the
runner: one loop over the pending units, run by an :class:`Executor` (:class:`InProcess`, which
:func:`run_units` uses, or the Ray actors of ``tasks/ray_units.py``), waiting for the units
another live run holds (or running them here once that lease expires), with progress and the
run's lease owner. Every executor runs each unit through :func:`run_leased`: skip a unit whose
marker checks out, take its lease, load its model unless the one held has the same
``model_key``, run it while renewing the lease, release the lease. So a rerun resumes, a killed
run loses at most its units in flight, and runs of one root at the same time compute each unit
once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from dispersion.core import layout
from dispersion.core.errors import DataError
from dispersion.core.ids import digest
from dispersion.core.integrity import CHECKSUMS, marker_done
from dispersion.core.leases import LEASE_SECONDS, Leases, describe
from dispersion.core.progress import Progress
from dispersion.core.storage import Store

Tick = Callable[[int], None]  # called with the rows just finished


@runtime_checkable
class Unit(Protocol):
    """One piece of measuring work (see the module docstring)."""

    @property
    def key(self) -> str: ...

    @property
    def marker_rel(self) -> str: ...

    @property
    def model_key(self) -> Hashable: ...

    @property
    def size(self) -> int: ...

    def expect(self) -> dict: ...

    def describe(self) -> str: ...

    def load(self) -> Any: ...

    def run(self, store: Store, loaded: Any, progress: Tick | None = None) -> dict: ...


def cost_of(unit: Unit) -> float:
    """A unit's expected compute (its ``cost`` when it has one, else its rows)."""
    return float(getattr(unit, "cost", None) or unit.size)


def model_of(unit: Any) -> Any:
    """Load ``unit.mr``'s model in ``unit.dtype`` on ``unit.device`` (``auto``: CUDA when present)."""
    from dispersion.measure.modeling import load_model, resolve_device

    return load_model(unit.mr.source, dtype=unit.dtype, device=resolve_device(unit.device), field=unit.mr.field)


def source_of(unit: Any) -> Any:
    """No model: the measurement reads ``unit.mr.source``'s files itself (e.g. one tensor)."""
    return unit.mr.source


@dataclass(frozen=True, eq=False)
class TableUnit:
    """One table measured with one model@revision for analysis step ``step``, published as
    ``measured/step=.../model=.../revision=.../spec=.../shard-00000.parquet``.

    ``measure(loaded, inputs) -> pa.Table`` and ``load(unit) -> loaded`` (:func:`model_of`,
    :func:`source_of`) are module-level functions, so a Ray actor receives them by name;
    ``inputs`` is everything else the measurement reads and ``inputs_key`` the digest of what
    in it changes the numbers (with the weights' fingerprint and the dtype it is the key)."""

    step: str
    mr: Any                  # dispersion.measure.scan.ModelRevision
    inputs: Any
    inputs_key: str
    measure: Callable[[Any, Any], pa.Table]
    load_with: Callable[[Any], Any] = model_of
    dtype: str = "float32"
    device: str = "auto"

    @property
    def key(self) -> str:
        mr = self.mr
        return digest([self.step, mr.model, mr.revision, mr.source.location, mr.source.revision, mr.fingerprint,
                       self.inputs_key, self.dtype], chars=20)

    @property
    def partition(self) -> str:
        return layout.measured_partition(self.step, self.mr.model, self.mr.revision, self.key[:12])

    @property
    def rel(self) -> str:
        return layout.measured_table(self.partition)

    @property
    def marker_rel(self) -> str:
        return layout.measured_marker(self.partition)

    @property
    def size(self) -> int:
        return 1

    @property
    def model_key(self) -> tuple[str, str, str, str, str]:
        return (self.load_with.__name__, self.mr.model, self.mr.revision, self.dtype, self.device)

    def expect(self) -> dict:
        return {"key": self.key}

    def describe(self) -> str:
        return f"{self.mr.model}@{self.mr.revision} {self.step}"

    def load(self) -> Any:
        return self.load_with(self)

    def run(self, store: Store, loaded: Any, progress: Tick | None = None) -> dict:
        t0 = time.perf_counter()
        table = self.measure(loaded, self.inputs)
        sums = {self.rel: store.write_table(self.rel, table)}
        marker = {"key": self.key, "rows": table.num_rows, "files": [self.rel], CHECKSUMS: sums,
                  "unit": self.describe(), "seconds": round(time.perf_counter() - t0, 3)}
        store.write_json(self.marker_rel, marker)
        if progress is not None:
            progress(1)
        return marker

    def read(self, store: Store) -> pa.Table:
        """The published table, checked against the checksum its marker recorded."""
        marker = store.read_json(self.marker_rel) or {}
        if marker.get("key") != self.key:
            raise DataError(f"{self.marker_rel}: {self.describe()} is not measured; run `dispersion scan` first")
        return store.read_shard(self.rel, (marker.get(CHECKSUMS) or {}).get(self.rel))


def lease_rel(unit: Unit) -> str:
    return layout.lease_of(unit.marker_rel)


def is_done(store: Store, unit: Unit, log: Callable[[str], None] = print) -> bool:
    """Done: the marker holds ``unit.expect()`` and every file it names still matches its
    checksum (:func:`dispersion.core.integrity.marker_done`: a damaged unit is logged in one
    line and pending again)."""
    return marker_done(store, unit.marker_rel, unit.expect(), unit.describe(), log)


class Loaded:
    """The one model a runner holds: loaded for a unit, kept while the next units share its
    ``model_key``, dropped before the next one loads."""

    def __init__(self, on_load: Callable[[Unit], None] | None = None) -> None:
        self.key: Hashable = None
        self.value: Any = None
        self.on_load = on_load

    def get(self, unit: Unit) -> Any:
        if self.key != unit.model_key or self.value is None:
            self.key, self.value = None, None  # free the old model before the new one loads
            if self.on_load is not None:
                self.on_load(unit)
            self.value = unit.load()
            self.key = unit.model_key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


def run_leased(unit: Unit, store: Store, leases: Leases, loaded: Loaded, progress: Tick | None = None,
               log: Callable[[str], None] = print) -> tuple[str, dict]:
    """Run ``unit`` under its lease: ``("ran", marker)``; ``("done", marker)`` when it is
    published already (another run, or a retry after a crash); ``("leased", lease)`` when
    another live run holds it (try later). The lease is renewed while the unit runs and
    released once it is published or failed."""
    rel = lease_rel(unit)
    holder = leases.claim(rel, note=unit.describe())
    if holder is not None:
        return "leased", holder
    try:
        if is_done(store, unit, log=log):
            return "done", store.read_json(unit.marker_rel) or {}
        model = loaded.get(unit)
        leases.renew(rel, force=True)  # loading may have taken a while

        def tick(n: int) -> None:
            leases.renew(rel)
            if progress is not None:
                progress(n)
        return "ran", unit.run(store, model, tick)
    finally:
        leases.release(rel)


def by_model(units: Iterable[Unit]) -> dict[Hashable, list[Unit]]:
    """Units grouped by ``model_key``, in first-seen order (one load per group)."""
    groups: dict[Hashable, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.model_key, []).append(u)
    return groups


def balance(units: Sequence[Unit], n_workers: int) -> list[list[Unit]]:
    """Split units into per-worker queues: each model's units (``model_key``) are cut into
    contiguous chunks (one model load per chunk) in proportion to their rows, so that more
    workers than models are all used, and chunks go longest-first to the least-loaded worker."""
    groups = list(by_model(units).values())
    total = sum(u.size for u in units) or 1
    chunks: list[list[Unit]] = []
    for group in groups:
        rows = sum(u.size for u in group)
        k = min(len(group), max(1, round(n_workers * rows / total)))
        step = -(-len(group) // k)
        chunks.extend(group[i:i + step] for i in range(0, len(group), step))
    queues: list[list[Unit]] = [[] for _ in range(max(1, n_workers))]
    load = [0] * len(queues)
    for chunk in sorted(chunks, key=lambda c: -sum(u.size for u in c)):
        w = load.index(min(load))
        queues[w].extend(chunk)
        load[w] += sum(u.size for u in chunk)
    return [q for q in queues if q]


def poll_seconds(lease_seconds: float) -> float:
    """How often a run re-checks units that another run holds."""
    return min(5.0, max(0.05, lease_seconds / 20))


@dataclass
class RunStats:
    """What :func:`run_with` did with its units."""

    planned: int = 0
    skipped: int = 0   # done already, or finished by another run meanwhile
    ran: int = 0
    rows: int = 0      # rows of the units that ran here
    seconds: float = 0.0
    markers: list[dict] = field(default_factory=list)  # of the units that ran here

    def count(self, status: str, unit: Unit, info: dict) -> None:
        """One result of :func:`run_leased` (``leased`` is counted once it is settled)."""
        if status == "ran":
            self.markers.append(info)
            self.ran += 1
            self.rows += unit.size
        elif status == "done":
            self.skipped += 1


class Waiting:
    """Units another run holds: logged at most once a minute, re-checked after a pause."""

    def __init__(self, store: Store, lease_seconds: float, log: Callable[[str], None]) -> None:
        self.store, self.lease_seconds, self.log = store, lease_seconds, log
        self.said: float | None = None

    def settle(self, held: Sequence[tuple[Unit, dict]], stats: RunStats,
               on_done: Callable[[Unit], None] | None = None) -> list[Unit]:
        """The held units still pending after a pause; those another run published meanwhile
        count as skipped (and go to ``on_done``)."""
        if not held:
            return []
        if self.said is None or time.monotonic() - self.said > 60:
            self.log(f"waiting for {len(held)} unit(s) that another run is computing "
                     f"({held[0][0].describe()}: {describe(held[0][1])})")
            self.said = time.monotonic()
        time.sleep(poll_seconds(self.lease_seconds))
        left = []
        for unit, _ in held:
            if is_done(self.store, unit, log=self.log):
                stats.skipped += 1
                if on_done is not None:
                    on_done(unit)
            else:
                left.append(unit)
        return left


def advance(bar: Progress, unit: Unit, rows: int) -> None:
    """``rows`` more rows of ``unit`` done, with their share of its cost (the ETA follows cost)."""
    bar.update(rows, work=rows * cost_of(unit) / max(unit.size, 1))


class Executor(Protocol):
    """Where :func:`run_with` runs the pending units: :class:`InProcess`, or Ray actors
    (``tasks/ray_units.py``). Each unit runs through :func:`run_leased`."""

    def start(self, pending: Sequence[Unit], leases: Leases, bar: Progress) -> None:
        """Get ready for ``pending`` (start workers); ``leases`` are the run's, under its owner."""

    def results(self, queue: Sequence[Unit]) -> Iterator[tuple[Unit, str, dict]]:
        """Run every unit of ``queue``; yield ``(unit, status, info)`` of :func:`run_leased` as
        each finishes, advancing ``bar`` by the rows that ran."""
        ...

    def close(self, finished: bool, pending: Sequence[Unit]) -> None:
        """Stop the workers; when the run did not finish, free the leases they held."""


class InProcess:
    """Units one after the other in this process, each model loaded once per run of
    consecutive units that share it; progress counts rows as they are computed."""

    def __init__(self, store: Store, log: Callable[[str], None] = print) -> None:
        self.store, self.log = store, log

    def start(self, pending: Sequence[Unit], leases: Leases, bar: Progress) -> None:
        self.leases, self.bar = leases, bar
        self.loaded = Loaded(on_load=lambda u: bar.note(u.describe().split(" ")[0]))

    def results(self, queue: Sequence[Unit]) -> Iterator[tuple[Unit, str, dict]]:
        for unit in queue:
            status, info = run_leased(unit, self.store, self.leases, self.loaded, progress=self.tick(unit),
                                      log=self.log)
            yield unit, status, info

    def tick(self, unit: Unit) -> Tick:
        return lambda n: advance(self.bar, unit, n)

    def close(self, finished: bool, pending: Sequence[Unit]) -> None:
        self.leases.release_all()
        self.loaded.clear()


def run_units(units: Sequence[Unit], store: Store, *, what: str = "extract", unit_name: str = "segments",
              progress: bool = True, log: Callable[[str], None] = print, owner: str | None = None,
              lease_seconds: float = LEASE_SECONDS, on_ran: Callable[[dict], None] | None = None) -> RunStats:
    """Run every pending unit in this process (:func:`run_with` and :class:`InProcess`)."""
    return run_with(InProcess(store, log), units, store, what=what, unit_name=unit_name, progress=progress,
                    log=log, owner=owner, lease_seconds=lease_seconds, on_ran=on_ran)


def run_with(executor: Executor, units: Sequence[Unit], store: Store, *, what: str = "extract",
             unit_name: str = "segments", progress: bool = True, log: Callable[[str], None] = print,
             owner: str | None = None, lease_seconds: float = LEASE_SECONDS,
             on_ran: Callable[[dict], None] | None = None) -> RunStats:
    """The runner: every pending unit of ``units`` run by ``executor`` (:class:`InProcess`, or
    Ray actors), each under its lease of this run (``owner``; one per call unless given: a
    retry that passes the same owner re-takes its own leases at once).

    Units of one model are contiguous in the queue (one load per run of them). Progress counts
    rows (``unit_name``) with N/M and an ETA; ``on_ran`` gets the marker of each unit that ran,
    with ``elapsed`` seconds. A unit whose files no longer match its marker is logged and runs
    again; a unit another live run holds is waited for (or run here once its lease expires)
    before this call returns."""
    stats = RunStats(planned=len(units))
    waiting = Waiting(store, lease_seconds, log)
    pending = [u for u in units if not is_done(store, u, log=log)]
    stats.skipped = len(units) - len(pending)
    if not pending:
        if units:
            log(f"all {len(units)} {what} units already done")
        return stats
    t0 = time.perf_counter()
    queue: list[Unit] = [u for group in by_model(pending).values() for u in group]
    bar = Progress(sum(u.size for u in pending), what, unit=unit_name, log=log, enabled=progress,
                   work=sum(cost_of(u) for u in pending))
    leases = Leases(store, owner=owner, seconds=lease_seconds)
    finished = False
    try:
        executor.start(pending, leases, bar)
        while queue:
            held: list[tuple[Unit, dict]] = []
            for unit, status, info in executor.results(queue):
                stats.count(status, unit, info)
                if status == "ran" and on_ran is not None:
                    on_ran({**info, "elapsed": time.perf_counter() - t0})
                elif status == "leased":
                    held.append((unit, info))
                elif status == "done":
                    advance(bar, unit, unit.size)
            queue = waiting.settle(held, stats, on_done=lambda u: advance(bar, u, u.size))
        finished = True
    except BaseException as err:  # Ctrl-C, SIGTERM: the command says how far this run got
        err.units_done = (stats.ran, len(pending))  # type: ignore[attr-defined]
        raise
    finally:
        executor.close(finished, pending)
        leases.sweep()
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
