"""Exceptions whose message is the one line a user sees (the CLI prints it and exits 1)."""


class DispersionError(Exception):
    """Base class: bad input or a failed precondition, with a one-line message."""


class ConfigError(DispersionError):
    """A run config is missing, malformed or invalid; the message names the field."""


class DataError(DispersionError):
    """A dataset, text field or sampling request cannot be satisfied."""


class ModelError(DispersionError):
    """A model path, hub id or revision cannot be loaded, or does not fit the request."""


class NonFiniteError(DispersionError):
    """A perplexity or hidden state came out NaN or infinite."""


class IntegrityError(DataError):
    """A published file is missing, unreadable or no longer matches the checksum its done
    marker recorded. ``path`` is relative to the root; a scan recomputes the unit."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return (f"{self.path}: {self.reason}; rerun the `dispersion scan` that wrote this root: it recomputes "
                f"every missing or damaged unit (`dispersion verify` lists the damaged files)")


class StorageError(DispersionError):
    """The root refused a write for a reason of its own (full, over quota, read-only, not
    writable, failing): nothing half-written stays, and a rerun resumes once it is fixed."""


# errno -> what the one line says (the object-store equivalents arrive as PermissionError / OSError)
STORAGE_ERRNOS = {28: "no space left on the device holding", 122: "disk quota exceeded on",
                  30: "read-only file system holding", 13: "permission denied writing into",
                  5: "I/O error on the device holding"}


def storage_error(err: OSError, root: str, rel: str, nbytes: int | None = None) -> StorageError | None:
    """The one-line :class:`StorageError` for an OS error of :data:`STORAGE_ERRNOS` while
    publishing ``rel`` under ``root``; ``None`` for any other error."""
    what = STORAGE_ERRNOS.get(err.errno or -1)
    if what is None and isinstance(err, PermissionError):
        what = STORAGE_ERRNOS[13]
    if what is None:
        return None
    need = f"{nbytes:,} bytes needed for {rel}" if nbytes is not None else f"writing {rel}"
    return StorageError(f"{what} {root}: {need}; make room (or fix the root), then run the same command again: "
                        f"finished units are kept")


class Terminated(BaseException):
    """The process received SIGTERM (what Ray, Prefect, Kubernetes and Slurm send to stop a job):
    raised like ``KeyboardInterrupt`` so that every ``finally`` runs (leases released, temporary
    files removed) before the command exits."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
