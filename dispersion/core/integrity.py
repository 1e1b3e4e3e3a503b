"""Done markers and the files they vouch for: which files a marker names, whether each is
still the file that was published, and the same check over a whole root.

A marker written by this version records ``checksums``: ``{path: checksum of the file's
bytes}`` (:func:`dispersion.core.ids.checksum`) for every file it publishes. A file matches
when its bytes hash to that value. Markers written before checksums existed name their
files (unit markers: ``files``; sample markers: one shard per entry of ``rows``) without
one; their files are checked the way such markers always were: the file exists, its
Parquet footer reads, and it holds the recorded number of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dispersion.core import layout
from dispersion.core.errors import IntegrityError
from dispersion.core.storage import Store

CHECKSUMS = "checksums"  # marker field: {path relative to the root: checksum of the file's bytes}


@dataclass(frozen=True)
class Damage:
    """A file a marker names that is missing, unreadable or altered."""

    path: str  # relative to the root
    reason: str
    marker: str  # the marker naming it

    def line(self) -> str:
        return f"{self.path}: {self.reason}"


def recorded(markers: Iterable[dict]) -> dict[str, str]:
    """Every ``{path: checksum}`` the markers recorded (empty for markers without checksums)."""
    out: dict[str, str] = {}
    for m in markers:
        out.update(m.get(CHECKSUMS) or {})
    return out


def marker_files(marker_rel: str, marker: dict) -> dict[str, tuple[str | None, int | None]]:
    """``{path: (checksum or None, rows expected or None)}`` of every file a marker names."""
    sums: dict[str, str] = marker.get(CHECKSUMS) or {}
    rows = marker.get("rows")
    if marker_rel.startswith("_done/segments/"):
        parts = layout.partition_values(marker_rel)
        per_shard = rows if isinstance(rows, list) else []
        names = [layout.segments_shard(parts["dataset"], parts["sample"], k) for k in range(len(per_shard))]
        out: dict[str, tuple[str | None, int | None]] = {
            rel: (sums.get(rel), n) for rel, n in zip(names, per_shard)}
    else:
        n = rows if isinstance(rows, int) else None
        out = {rel: (sums.get(rel), n) for rel in marker.get("files", [])}
    for rel, cs in sums.items():
        out.setdefault(rel, (cs, None))
    return out


def check_file(store: Store, rel: str, expected: str | None, rows: int | None) -> str | None:
    """Why ``rel`` is not the file its marker vouches for, or ``None`` when it is."""
    try:
        if expected is not None:
            return None if store.checksum(rel) == expected else "checksum mismatch (changed after it was published)"
        n = store.num_rows(rel)
    except FileNotFoundError:
        return "missing"
    except IntegrityError as err:
        return err.reason
    return None if rows is None or n == rows else f"{n} rows, expected {rows}"


def check_marker(store: Store, marker_rel: str, marker: dict, first_only: bool = False) -> list[Damage]:
    """Every damaged file the marker names (only the first with ``first_only``)."""
    out = []
    for rel, (expected, rows) in marker_files(marker_rel, marker).items():
        reason = check_file(store, rel, expected, rows)
        if reason is not None:
            out.append(Damage(rel, reason, marker_rel))
            if first_only:
                break
    return out


def marker_done(store: Store, marker_rel: str, expect: dict, what: str,
                log: Callable[[str], None] = print) -> bool:
    """Whether a unit is done: its marker holds ``expect`` (its key, its size) and every file
    it names still matches the checksum it recorded (markers without checksums: exists and
    holds that many rows). An unreadable marker or a damaged file is logged in one line and
    the marker removed, so the unit ``what`` is pending again."""
    from dispersion.core.errors import IntegrityError

    try:
        marker = store.read_json(marker_rel)
    except IntegrityError as err:  # an unreadable marker
        log(f"warning: {err.path}: {err.reason}; recomputing {what}")
        store.remove(marker_rel)
        return False
    if not marker or any(marker.get(k) != v for k, v in expect.items()):
        return False
    damage = check_marker(store, marker_rel, marker, first_only=True)
    if not damage:
        return True
    log(f"warning: {damage[0].line()}; recomputing {what}")
    store.remove(marker_rel)
    return False


@dataclass
class RootCheck:
    """What :func:`verify_root` found."""

    markers: int = 0
    files: int = 0
    without_checksums: int = 0  # markers written before checksums: checked by rows only
    damaged: list[Damage] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # markers removed by ``repair``
    temporaries: list[str] = field(default_factory=list)  # left by writers killed mid-write (local roots)

    repaired_temporaries: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged

    def summary(self) -> str:
        bad_markers = len({d.marker for d in self.damaged})
        text = (f"checked {self.files} files of {self.markers} done markers: "
                + ("all match" if self.ok else f"{len(self.damaged)} damaged in {bad_markers} markers"))
        if self.without_checksums:
            text += f"; {self.without_checksums} markers carry no checksums (checked by row count only)"
        if self.temporaries:
            text += (f"; {len(self.temporaries)} temporary files of interrupted writes"
                     + (" removed" if self.repaired_temporaries else " (`--repair` removes them)"))
        if self.removed:
            text += f"; removed {len(self.removed)} markers: the next scan recomputes them"
        elif not self.ok:
            text += "; `dispersion verify --repair` removes their markers so the next scan recomputes them"
        return text


def verify_root(store: Store, repair: bool = False, log: Callable[[str], None] = print) -> RootCheck:
    """Check every file of every done marker under the root (samples, work units, query-set
    shards, kNN-LM shards and trained indexes, analysis steps' measured tables), logging one line per damaged file; with
    ``repair`` remove the markers naming one, so the next scan redoes their work."""
    result = RootCheck()
    patterns = (layout.SEGMENTS_MARKERS, layout.UNIT_MARKERS, layout.QUERY_MARKERS, layout.KNN_MARKERS,
                layout.KNN_INDEX_MARKERS, layout.MEASURED_MARKERS)
    for marker_rel in [rel for pattern in patterns for rel in store.glob(pattern)]:
        result.markers += 1
        try:
            marker = store.read_json(marker_rel)
        except IntegrityError as err:
            damage = [Damage(marker_rel, err.reason, marker_rel)]
        else:
            if marker is None:  # removed meanwhile
                continue
            files = marker_files(marker_rel, marker)
            result.files += len(files)
            result.without_checksums += not marker.get(CHECKSUMS)
            damage = check_marker(store, marker_rel, marker)
        for d in damage:
            log(f"damaged: {d.line()}")
        result.damaged += damage
        if damage and repair:
            store.remove(marker_rel)
            result.removed.append(marker_rel)
    result.temporaries = store.stale_temporaries()
    for rel in result.temporaries:
        log(f"temporary: {rel} (its writer no longer runs)")
        if repair:
            store.remove(rel)
    result.repaired_temporaries = repair and bool(result.temporaries)
    return result
