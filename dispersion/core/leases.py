"""Leases: which run is working on a piece of work right now, so that concurrent runs and
retries split the work instead of doing it twice.

A lease is a small JSON object (``owner``, ``host``, ``pid``, its ``start`` time and pid namespace
``pidns``, ``expires``, ``note``) at a path under the store (``_leases/`` + the path of the unit's
done marker under ``_done/``, see :func:`dispersion.core.layout.lease_of`),
written with an exclusive create (:meth:`dispersion.core.storage.Store.create`: a hard link
locally, ``If-None-Match: *`` on S3). Whoever creates it holds it until it is released or
expires:

* ``claim`` takes a free lease, re-takes one of its own ``owner`` (a retry of the same run),
  takes over an expired one or one whose holder was a process of this host that is gone (its
  pid no longer runs, or names a process started at another time: a killed run's units are
  free at once on the host it ran on), and otherwise returns the holder's lease;
* ``renew`` pushes ``expires`` forward (the holder calls it while it works);
* ``release`` deletes it once the work is published.

Renewing, releasing and taking over are conditional on the version the caller read
(``replace_if``/``delete_if``), so two runs that find one expired lease cannot both take it
(locally and on S3; other object stores get a best-effort emulation). Expiry compares the
``expires`` a host wrote with the reader's wall clock: hosts sharing a store should have
clocks that agree to well within ``seconds`` (NTP). A holder on another host that stops
renewing (a killed process) keeps its work leased until ``expires``; a holder too slow to
renew may lose its lease and then only repeats work whose outputs are published atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable

from dispersion.core.layout import done_of
from dispersion.core.processes import gone, pid_namespace, start_time
from dispersion.core.storage import Store

LEASE_SECONDS = 600.0  # how long a lease lives without renewal


def new_owner() -> str:
    """A token naming one run (host, process and a random part)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _parse(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def dead_holder(lease: dict) -> bool:
    """The lease was written by a process of this host (and pid namespace) that no longer runs."""
    pid = lease.get("pid")
    return (lease.get("host") == socket.gethostname() and lease.get("pidns") == pid_namespace()
            and isinstance(pid, int) and pid != os.getpid() and gone(pid, lease.get("start")))


def describe(lease: dict, now: float | None = None) -> str:
    """``host pid N, expires in Ts`` for log lines."""
    left = float(lease.get("expires", 0)) - (time.time() if now is None else now)
    return f"{lease.get('host', '?')} pid {lease.get('pid', '?')}, expires in {max(0.0, left):.0f}s"


class Leases:
    """The leases one run (``owner``) holds in ``store``; each lives ``seconds`` unless renewed."""

    def __init__(self, store: Store, owner: str | None = None, seconds: float = LEASE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.owner = owner or new_owner()
        self.seconds = float(seconds)
        self.clock = clock
        self._held: dict[str, tuple[str, bytes, float]] = {}  # rel -> (tag, body, monotonic time written)
        self._start = start_time(os.getpid()) or ""

    def _body(self, note: str) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "start": self._start, "pidns": pid_namespace(),
                           "expires": round(self.clock() + self.seconds, 3), "note": note}).encode()

    def live(self, lease: dict) -> bool:
        """A readable lease that has not expired and whose holder may still run (not a gone
        process of this host)."""
        return bool(lease) and float(lease.get("expires", 0)) > self.clock() and not dead_holder(lease)

    def holds(self, rel: str) -> bool:
        return rel in self._held

    def claim(self, rel: str, note: str = "") -> dict | None:
        """Take the lease at ``rel``: ``None`` when this owner holds it now, else the live
        lease of the run that holds it."""
        for _ in range(8):
            body = self._body(note)
            try:
                tag = self.store.create(rel, body)
            except BaseException:  # a signal between making the folder and the lease: no empty folder stays
                self.store.prune_empty(rel, "_leases")
                raise
            if tag is not None:
                self._held[rel] = (tag, body, time.monotonic())
                return None
            current = self.store.read_versioned(rel)
            if current is None:  # released meanwhile
                continue
            data, tag = current
            lease = _parse(data)
            if lease.get("owner") == self.owner:  # ours: a retry of this run
                new = self.store.replace_if(rel, body, tag)
                if new is not None:
                    self._held[rel] = (new, body, time.monotonic())
                    return None
                continue
            if self.live(lease):
                return lease
            # expired, its holder gone, or unreadable: whoever deletes this version takes over
            self.store.delete_if(rel, tag)
        current = self.store.read_versioned(rel)
        return (_parse(current[0]) if current else {}) or {"owner": "?", "expires": self.clock() + self.seconds}

    def renew(self, rel: str, force: bool = False) -> bool:
        """Push the expiry of a held lease forward (at most every quarter lease unless
        ``force``); False when the lease was lost to another run."""
        if rel not in self._held:
            return False
        tag, body, written = self._held[rel]
        if not force and time.monotonic() - written < self.seconds / 4:
            return True
        note = _parse(body).get("note", "")
        new_body = self._body(note)
        new = self.store.replace_if(rel, new_body, tag)
        if new is None:
            current = self.store.read_versioned(rel)
            if current is None or current[0] != new_body:  # not a retried write of ours
                del self._held[rel]
                return False
            new = current[1]
        self._held[rel] = (new, new_body, time.monotonic())
        return True

    def release(self, rel: str) -> None:
        """Give up the lease at ``rel``: the one this object holds, or else one of this owner's
        written by another process of the same run (a retried Ray actor)."""
        held = self._held.pop(rel, None)
        try:
            if not (held is not None and self.store.delete_if(rel, held[0])):
                current = self.store.read_versioned(rel)
                if current is not None and _parse(current[0]).get("owner") == self.owner:
                    self.store.delete_if(rel, current[1])
        finally:  # also when a signal stops the release half-way: no empty folder stays
            self.store.prune_empty(rel, "_leases")

    def release_all(self) -> None:
        """Release every held lease; one that cannot be released (the store fails) is left to
        expire, and the others are still released."""
        for rel in list(self._held):
            try:
                self.release(rel)
            except Exception:  # noqa: BLE001 - best effort on the way out (it expires)
                self._held.pop(rel, None)

    def sweep(self) -> int:
        """Remove the leases nobody holds any more and the empty lease folders under the root;
        best effort. A lease goes when it is this owner's (its release failed, e.g. the store
        was down), expired, held by a gone process of this host, unreadable, or its unit's
        done marker exists (the work is published: a rerun skips it and would never touch
        the lease again). Returns how many leases went."""
        removed = 0
        with contextlib.suppress(OSError):
            for rel in self.store.files("_leases"):
                if rel in self._held:
                    continue
                current = self.store.read_versioned(rel)
                if current is None:
                    continue
                lease = _parse(current[0])
                stale = not self.live(lease) or lease.get("owner") == self.owner or self.store.exists(done_of(rel))
                if stale and self.store.delete_if(rel, current[1]):
                    removed += 1
            self.store.prune_tree("_leases")
        return removed

    def holder(self, rel: str) -> dict | None:
        """The live lease at ``rel`` (anyone's), ``None`` when it is free or expired."""
        current = self.store.read_versioned(rel)
        if current is None:
            return None
        lease = _parse(current[0])
        return lease if self.live(lease) else None
