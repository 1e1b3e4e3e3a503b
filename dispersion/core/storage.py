"""The artifact store: Parquet, JSON and bytes under one fsspec root (a local folder by
default, ``s3://bucket/prefix`` in production), written atomically. Paths come from
:mod:`dispersion.core.layout`.

Every file is written to a hidden temporary name in its folder and then moved into place
(``os.replace`` locally, copy + delete on object stores), so a reader never sees a partial
file and the ``*.parquet`` globs of the catalog never match a temporary one. A work unit
writes its data files first and its completion marker last: a unit is done when its
marker exists and names the row count it was asked for.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dispersion.core.errors import DataError

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


RETRY_SECONDS = 60.0  # how long an object-store call is retried through an outage


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
                if _is_credentials_error(err) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    return wrapper


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
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **options)
        self.base = self.base.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def url(self, rel: str = "") -> str:
        """A URL other tools (DuckDB, Polars) can open."""
        full = self.path(rel) if rel else self.base
        return full if self.local else self.fs.unstrip_protocol(full)

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
        """``write(tmp)`` into a hidden sibling of ``final``, then rename it into place."""
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(parent, exist_ok=True)
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @_retrying
    def _publish(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        if not self.local:
            self.fs.pipe_file(final, data)
            return

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                fh.write(data)
        self._replace_local(final, write)

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self._publish(rel, buf.getvalue())

    @_retrying
    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as fh:
            return pq.read_table(fh)

    @_retrying
    def num_rows(self, rel: str) -> int:
        """Row count from the Parquet footer (no data read)."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    def write_json(self, rel: str, payload: dict) -> None:
        self._publish(rel, json.dumps(payload, indent=1, sort_keys=True, default=str).encode())

    @_retrying
    def read_json(self, rel: str) -> dict | None:
        try:
            with self.fs.open(self.path(rel), "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None

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
