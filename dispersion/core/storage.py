"""The artifact store: Parquet, JSON and bytes under one fsspec root (a local folder by
default, ``s3://bucket/prefix`` in production), written atomically. Paths come from
:mod:`dispersion.core.layout`.

Every file is written to a hidden temporary name in its folder and then moved into place
(``os.replace`` locally, copy + delete on object stores), so a reader never sees a partial
file and the ``*.parquet`` globs of the catalog never match a temporary one. A work unit
writes its data files first and its completion marker last, with the checksum of every
file it published (``write_table`` returns it); a unit is done when its marker names the
row count it was asked for and every file still matches its checksum
(:mod:`dispersion.core.integrity`). Shards named by a marker are read with ``read_shard``,
which checks them against that checksum.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dispersion.core.errors import DataError, IntegrityError, StorageError, first_line, storage_error
from dispersion.core.ids import checksum

FEATURE_BASE = [
    pa.field("segment_id", pa.int64(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("n_scored", pa.int32(), nullable=False),
    pa.field("nll_sum", pa.float64(), nullable=False),
    pa.field("ppl", pa.float64(), nullable=False),
    pa.field("last_token_nll", pa.float32(), nullable=False),
    pa.field("last_token_ppl", pa.float64(), nullable=False),
]


def feature_schema(context_lengths: list[int], next_nll: bool = False) -> pa.Schema:
    """Feature columns; ``next_nll`` adds ``next_nll_c{c}`` (the ``context`` pool's targets)."""
    extra = [pa.field(f"last_nll_c{c}", pa.float32()) for c in context_lengths]
    if next_nll:
        extra += [pa.field(f"next_nll_c{c}", pa.float32()) for c in context_lengths]
    return pa.schema(FEATURE_BASE + extra)


def vector_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("segment_id", pa.int64(), nullable=False),
        pa.field("vec", pa.list_(pa.float16(), dim), nullable=False),
        pa.field("norm", pa.float32(), nullable=False),
        pa.field("within", pa.float32()),  # within-segment token dispersion (same for every pool)
    ])


def vector_column(v: np.ndarray) -> pa.FixedSizeListArray:
    v = np.ascontiguousarray(v, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), type=pa.float16()), v.shape[1])


CREATE_SECONDS = 30.0  # how long a local exclusive create retries while other runs' releases prune its folder
# how long an object-store call is retried through an outage (``DISPERSION_STORE_RETRY_S``)
RETRY_SECONDS = float(os.environ.get("DISPERSION_STORE_RETRY_S") or 60.0)


def arrow_bytes(data: bytes) -> pa.Buffer:
    """``data`` copied into an Arrow-owned buffer.

    Arrow readers (Parquet, CSV) may release their input on one of Arrow's own threads after
    the call returns; a buffer that wraps a Python object then needs the interpreter, which
    at exit is gone (the process aborts). An Arrow-owned copy needs nothing from Python.
    """
    buf = pa.allocate_buffer(len(data))
    np.frombuffer(buf, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    return buf


def parse_parquet(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's bytes as a table; every Parquet read of the package goes through here."""
    return pq.ParquetFile(pa.BufferReader(arrow_bytes(data))).read(columns=columns)


def tmp_name(parent: str, name: str) -> str:
    """A hidden temporary sibling of ``parent/name`` naming this process:
    ``.{name}.tmp-{pid}-{random}`` (see :func:`stale_tmp`)."""
    return f"{parent}/.{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stale_tmp(path: str) -> bool:
    """A temporary file of :func:`tmp_name` whose writer (a process of this host) no longer runs."""
    from dispersion.core.processes import gone

    tail = path.rsplit(".tmp-", 1)[-1].split("-")
    return len(tail) == 2 and tail[0].isdigit() and int(tail[0]) != os.getpid() and gone(int(tail[0]), None)


def _retrying(method):
    """Retry a remote-store call with backoff through transient outages (connection refused,
    timeouts, 5xx) for up to ``RETRY_SECONDS``; local calls and missing files fail at once."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.local:
            return method(self, *args, **kwargs)
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                return method(self, *args, **kwargs)
            except (FileNotFoundError, PermissionError, DataError):
                raise
            except Exception as err:  # noqa: BLE001 - botocore/aiohttp errors have no common base
                if _is_credentials_error(err):
                    raise
                if time.monotonic() + delay > deadline:
                    raise StorageError(f"{self.url()} did not answer for {RETRY_SECONDS:.0f} s ({_first_line(err)}); "
                                       f"run the same command again when it is back: finished units are "
                                       f"kept") from err
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    return wrapper


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_credentials_error(err: BaseException) -> bool:
    return "credential" in type(err).__name__.lower() or "NoCredentials" in repr(err)


@dataclass
class Store:
    """An fsspec root; paths given to methods are relative to it.

    Local folders publish through a hidden temporary file and ``os.replace``; object stores
    publish with one PUT, which is atomic there (an object is visible only once complete).
    Credentials and endpoints of object stores come from the environment or the cloud
    profile (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...), never from configs.
    """

    root: str
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        if not str(self.root).strip():
            raise DataError("root: must not be empty ('' would mean the working directory)")
        options = dict(self.storage_options or {})
        if self.root.startswith(("s3://", "s3a://")):
            options.setdefault("use_listings_cache", False)  # other processes write here too
            options.setdefault("skip_instance_cache", True)
            # Bounded waits: a dropped connection fails in seconds and ``_retrying`` takes over,
            # instead of a socket read waiting on a peer that is gone.
            options.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 30,
                                                 "retries": {"max_attempts": 2}})
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.root, **options)
        except (ValueError, ImportError) as err:  # "Protocol not known: foo", "Install gcsfs to access ..."
            raise DataError(f"root: cannot open {self.root!r}: {first_line(err)} (give a local folder "
                            f"or an fsspec URL such as s3://bucket/prefix)") from None
        self.base = self.base.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def url(self, rel: str = "") -> str:
        """A URL other tools (DuckDB, Polars) can open."""
        full = self.path(rel) if rel else self.base
        return full if self.local else self.fs.unstrip_protocol(full)

    def browser_url(self, rel: str, seconds: int = 7 * 24 * 3600) -> str:
        """A URL a web browser opens: ``file://`` for a local root, a presigned HTTP(S) URL valid
        for ``seconds`` on S3 (its endpoint's, so a local S3 server's too); the store URL where
        the store cannot sign."""
        if self.local:
            return Path(self.path(rel)).resolve().as_uri()
        try:
            return str(self.fs.sign(self.path(rel), expiration=seconds))
        except (NotImplementedError, AttributeError, ValueError):
            return self.url(rel)

    def check(self) -> None:
        """Fail early, in one line, when the root cannot be used (missing bucket, no
        credentials, unreachable endpoint)."""
        if self.local:
            return
        bucket = self.base.split("/", 1)[0]
        try:
            self.fs.ls(bucket)
        except FileNotFoundError:
            raise DataError(f"root: bucket {bucket!r} does not exist ({self.root})") from None
        except PermissionError as err:
            raise DataError(f"root: access to {self.root} denied: {str(err).splitlines()[0]}") from None
        except Exception as err:  # noqa: BLE001
            if _is_credentials_error(err):
                raise DataError(f"root: no credentials for {self.root} (set AWS_ACCESS_KEY_ID and "
                                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"root: cannot reach {self.root}: {first}") from None

    @_retrying
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    @staticmethod
    def _replace_local(final: str, write) -> None:
        """``write(tmp)`` into a hidden sibling of ``final``, then rename it into place. The
        sibling names this process (:func:`tmp_name`); siblings of ``final`` left by writers that
        no longer run (killed mid-write) are removed first."""
        parent, name = final.rsplit("/", 1)
        tmp = tmp_name(parent, name)
        os.makedirs(parent, exist_ok=True)
        for stale in glob.glob(f"{glob.escape(parent)}/.{glob.escape(name)}.tmp-*"):
            if stale_tmp(stale):
                with contextlib.suppress(OSError):
                    os.remove(stale)
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _publish(self, rel: str, data: bytes) -> None:
        try:
            self._publish_retrying(rel, data)
        except OSError as err:  # full, over quota, read-only, refused: one line (the temporary file is gone)
            refused = storage_error(err, self.url(), rel, len(data))
            if refused is None:
                raise
            raise refused from None

    @_retrying
    def _publish_retrying(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        if not self.local:
            self.fs.pipe_file(final, data)
            return

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)
        self._replace_local(final, write)

    def write_table(self, rel: str, table: pa.Table) -> str:
        """Publish ``table`` as Parquet; returns the checksum of the bytes written."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        self._publish(rel, data)
        return checksum(data)

    def read_table(self, rel: str) -> pa.Table:
        """A Parquet file of the store (results, markers' tables), not checked against a marker."""
        return parse_parquet(self._read_bytes(rel))

    def read_bytes(self, rel: str) -> bytes:
        """A whole file's bytes (figures, reports); shards are read with :meth:`read_shard`."""
        return self._read_bytes(rel)

    @_retrying
    def _read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read()

    def read_shard(self, rel: str, expected: str | None, columns: list[str] | None = None) -> pa.Table:
        """A published shard, checked against the checksum its done marker recorded
        (``expected``; ``None`` for markers written without checksums). A missing, altered
        or unreadable file raises :class:`IntegrityError` naming it."""
        try:
            data = self._read_bytes(rel)
        except FileNotFoundError:
            raise IntegrityError(rel, "missing") from None
        if expected is not None and checksum(data) != expected:
            raise IntegrityError(rel, "checksum mismatch (changed after it was published)")
        try:
            return parse_parquet(data, columns)
        except (pa.ArrowException, ValueError, OSError) as err:
            raise IntegrityError(rel, f"unreadable Parquet ({_first_line(err)})") from None

    @_retrying
    def checksum(self, rel: str) -> str:
        """The checksum of a stored file's bytes, streamed (``FileNotFoundError`` if absent)."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return checksum(iter(lambda: fh.read(1 << 22), b""))

    @_retrying
    def num_rows(self, rel: str) -> int:
        """Row count from the Parquet footer (no data read); an unreadable footer raises
        :class:`IntegrityError`."""
        with self.fs.open(self.path(rel), "rb") as fh:
            try:
                return pq.ParquetFile(fh).metadata.num_rows
            except FileNotFoundError:
                raise
            except (pa.ArrowException, ValueError, OSError) as err:
                raise IntegrityError(rel, f"unreadable Parquet ({_first_line(err)})") from None

    @_retrying
    def prune_empty(self, rel: str, top: str) -> None:
        """Remove the folders above ``rel`` that are empty now, up to (not including) ``top``
        (local roots; object stores have no folders)."""
        if not self.local:
            return
        stop = self.path(top).rstrip("/")
        parent = os.path.dirname(self.path(rel))
        while parent.startswith(stop + "/"):
            try:
                os.rmdir(parent)
            except OSError:  # not empty (or gone)
                return
            parent = os.path.dirname(parent)

    def prune_tree(self, top: str) -> None:
        """Remove every empty folder below ``top`` (local roots), deepest first. A folder another
        run makes meanwhile may go too: ``create`` makes it again."""
        if not self.local:
            return
        top_folder = self.path(top).rstrip("/")
        for folder, _, _ in os.walk(top_folder, topdown=False):
            if folder != top_folder:
                with contextlib.suppress(OSError):  # not empty (or gone)
                    os.rmdir(folder)

    @_retrying
    def files(self, top: str) -> list[str]:
        """Every file below ``top``, relative to the root (none when ``top`` does not exist)."""
        n = len(self.base) + 1
        try:
            return sorted(p[n:] for p in self.fs.find(self.path(top)))
        except FileNotFoundError:
            return []

    def stale_temporaries(self) -> list[str]:
        """Temporary files under a local root whose writer no longer runs (a command killed
        mid-write), relative to the root; an object store keeps none (uploads are atomic)."""
        if not self.local:
            return []
        root = self.path("").rstrip("/")
        out = []
        for folder, _, files in os.walk(root):
            out += [os.path.relpath(os.path.join(folder, f), root) for f in files
                    if f.startswith(".") and ".tmp-" in f and stale_tmp(os.path.join(folder, f))]
        return sorted(out)

    def remove(self, rel: str) -> None:
        """Delete a file; a missing one is not an error."""
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def write_json(self, rel: str, payload: dict) -> None:
        self._publish(rel, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())

    @_retrying
    def read_json(self, rel: str) -> dict | None:
        """The JSON object at ``rel``, ``None`` if there is none; a file that is not a JSON
        object raises :class:`IntegrityError`."""
        try:
            with self.fs.open(self.path(rel), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            raise IntegrityError(rel, "not valid JSON") from None
        if not isinstance(payload, dict):
            raise IntegrityError(rel, "not a JSON object")
        return payload

    @_retrying
    def glob(self, pattern: str) -> list[str]:
        n = len(self.base) + 1
        return sorted(p[n:] for p in self.fs.glob(self.path(pattern)))

    def write_text(self, rel: str, text: str) -> None:
        self._publish(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._publish(rel, data)

    @_retrying
    def upload(self, local: str, rel: str) -> None:
        """Copy a local file to ``rel``, published atomically (streamed: large weights are fine)."""
        final = self.path(rel)
        if not self.local:
            self.fs.put_file(local, final)  # S3: multipart, visible only once complete
            return
        self._replace_local(final, lambda tmp: shutil.copyfile(local, tmp))

    @_retrying
    def download(self, rel: str, local: str) -> None:
        """Copy ``rel`` to a local file (through a temporary sibling)."""
        tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.get_file(self.path(rel), tmp)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    # -- conditional writes (leases, see dispersion.core.leases) -----------------------------------
    #
    # Each object has a version tag: its ETag on S3, a content hash locally. ``create`` writes
    # only where nothing is; ``replace_if`` and ``delete_if`` act only while the object still
    # has the tag the caller read. Locally ``create`` hard-links a complete hidden file into
    # place (exclusive and atomic), and ``replace_if``/``delete_if`` hold an advisory lock on
    # the folder; on S3 they are conditional requests (``If-None-Match: *``, ``If-Match``),
    # which AWS S3, MinIO and moto honour. Other fsspec stores get a best-effort emulation
    # (check, then write), which two writers can race.

    @property
    def conditional(self) -> bool:
        """Whether ``create``/``replace_if``/``delete_if`` are exclusive on this store."""
        return self.local or hasattr(self.fs, "_call_s3")

    def _s3_key(self, rel: str) -> dict:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return {"Bucket": bucket, "Key": key}

    def create(self, rel: str, data: bytes) -> str | None:
        """Write ``rel`` only if nothing is there; its version tag, or ``None`` if it exists."""
        try:
            return self._create(rel, data)
        except OSError as err:
            refused = storage_error(err, self.url(), rel, len(data))
            if refused is None:
                raise
            raise refused from None

    @_retrying
    def _create(self, rel: str, data: bytes) -> str | None:
        final = self.path(rel)
        if self.local:
            parent, name = final.rsplit("/", 1)
            tmp = tmp_name(parent, name)
            deadline = time.monotonic() + CREATE_SECONDS
            for attempt in itertools.count():  # a folder another run empties and removes meanwhile is made again
                if attempt >= 3:  # a busy root: step out of the others' rhythm for a moment
                    time.sleep(random.uniform(0, 0.002 * min(attempt, 50)))
                try:
                    os.makedirs(parent, exist_ok=True)
                    with open(tmp, "wb") as fh:
                        fh.write(data)
                    os.link(tmp, final)  # fails if ``final`` exists; the content is complete when it appears
                except FileExistsError:
                    return None
                except FileNotFoundError:
                    if time.monotonic() > deadline:
                        raise
                    continue
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                return _content_tag(data)
        if self.conditional:
            try:
                return self.fs.call_s3("put_object", Body=data, IfNoneMatch="*", **self._s3_key(rel))["ETag"]
            except OSError as err:
                if _precondition_failed(err):
                    return None
                raise
        if self.fs.exists(final):
            return None
        self.fs.pipe_file(final, data)
        return _content_tag(data)

    @_retrying
    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """``(content, version tag)`` of ``rel``, ``None`` if it does not exist."""
        if self.conditional and not self.local:
            from fsspec.asyn import sync

            async def get() -> tuple[bytes, str]:
                resp = await self.fs._call_s3("get_object", **self._s3_key(rel))
                async with resp["Body"] as body:
                    return await body.read(), resp["ETag"]
            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
        try:
            with self.fs.open(self.path(rel), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, _content_tag(data)

    def _local_if(self, rel: str, tag: str, action: Callable[[], object]) -> bool:
        """Under the folder's lock, run ``action`` only while ``rel``'s version tag is ``tag``;
        whether it ran (not when the file changed, vanished, or its folder is gone)."""
        try:
            with _FolderLock(self.path(rel).rsplit("/", 1)[0]):
                current = self.read_versioned(rel)
                if current is None or current[1] != tag:
                    return False
                action()
        except FileNotFoundError:  # the folder is gone
            return False
        return True

    @_retrying
    def replace_if(self, rel: str, data: bytes, tag: str) -> str | None:
        """Overwrite ``rel`` only while its version tag is ``tag``; the new tag, else ``None``."""
        if self.local:
            return _content_tag(data) if self._local_if(rel, tag, lambda: self._publish(rel, data)) else None
        if self.conditional:
            try:
                return self.fs.call_s3("put_object", Body=data, IfMatch=tag, **self._s3_key(rel))["ETag"]
            except FileNotFoundError:
                return None
            except OSError as err:
                if _precondition_failed(err):
                    return None
                raise
        current = self.read_versioned(rel)
        if current is None or current[1] != tag:
            return None
        self.fs.pipe_file(self.path(rel), data)
        return _content_tag(data)

    @_retrying
    def delete_if(self, rel: str, tag: str) -> bool:
        """Delete ``rel`` only while its version tag is ``tag``; whether this call deleted it."""
        if self.local:
            return self._local_if(rel, tag, lambda: os.remove(self.path(rel)))
        if self.conditional:
            try:
                self.fs.call_s3("delete_object", IfMatch=tag, **self._s3_key(rel))
            except FileNotFoundError:
                return False
            except OSError as err:
                if _precondition_failed(err):
                    return False
                raise
            return True
        current = self.read_versioned(rel)
        if current is None or current[1] != tag:
            return False
        self.fs.rm_file(self.path(rel))
        return True


def _content_tag(data: bytes) -> str:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _precondition_failed(err: BaseException) -> bool:
    """An S3 conditional request refused (412 Precondition Failed, 409 Conditional Request Conflict)."""
    if isinstance(err, FileExistsError):
        return True
    codes = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
    for e in (err, err.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in codes:
            return True
    return False


class _FolderLock:
    """An exclusive advisory lock (``flock``) on a local folder, held for a ``with`` block."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fd = -1

    def __enter__(self) -> None:
        import fcntl

        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the lock
