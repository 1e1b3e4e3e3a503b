"""The checks every ``dispersion`` command and every flow runs before it samples, loads or
writes anything, so that bad input ends in one ``error:`` line and leaves the root as it was.

:func:`preflight` is the one entry point (the CLI's ``scan``, ``report``, ``analyze``,
``query``, ``train-sweep``, and ``python -m flows`` and the flows themselves call it):

* **consent**: every ``trust_remote_code: true`` in the config (a model's or a dataset's)
  also needs ``--trust-remote-code`` on the command line (the flows: their
  ``trust_remote_code`` parameter), because a config may come from ``http://`` or ``s3://``;
* **the root**: its protocol is known to fsspec; an object-store root has credentials and
  its bucket exists; a local root is a folder, or can become one (no regular file on its
  path), and for commands that write, a file can be created there (a read-only file
  system or a folder without write permission is refused). The write check creates one
  hidden file and removes it at once.

The config file itself is checked when it is read (:func:`dispersion.core.config.read_yaml`:
found, a file, UTF-8, a known protocol); models, tokenizers and datasets are checked by the
scan's plan before it samples or publishes anything (docs/GUARANTEES.md).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from pydantic import BaseModel

from dispersion.core.errors import ConfigError, DataError, first_line
from dispersion.core.storage import Store

REMOTE_CODE_FLAG = "--trust-remote-code"


def remote_code_fields(config: object, where: str = "") -> list[str]:
    """The field paths (``models.0.trust_remote_code``) that are ``true`` in a config."""
    out: list[str] = []
    if isinstance(config, BaseModel):
        for name in type(config).model_fields:
            value = getattr(config, name)
            path = f"{where}.{name}" if where else name
            if name == "trust_remote_code" and value is True:
                out.append(path)
            else:
                out.extend(remote_code_fields(value, path))
    elif isinstance(config, (list, tuple)):
        for i, item in enumerate(config):
            out.extend(remote_code_fields(item, f"{where}.{i}" if where else str(i)))
    elif isinstance(config, dict):
        for key, item in config.items():
            out.extend(remote_code_fields(item, f"{where}.{key}" if where else str(key)))
    return out


def check_remote_code(config: object, allowed: bool) -> None:
    """Refuse ``trust_remote_code: true`` anywhere in ``config`` unless ``allowed`` (the
    command-line flag): it runs code from a model's or dataset's repository."""
    fields = remote_code_fields(config)
    if fields and not allowed:
        more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
        raise ConfigError(f"{fields[0]}: true would run code from the model's or dataset's repository{more}; "
                          f"allow it with {REMOTE_CODE_FLAG} (flows: the trust_remote_code parameter)")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a file or a folder)."""
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _check_local(store: Store, root: str, write: bool) -> None:
    path = Path(store.base or "/")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        if existing == path:
            raise DataError(f"root: {root} is a file, not a folder")
        raise DataError(f"root: {root} cannot be created: {existing} is a file, not a folder")
    if not write:
        return
    probe = existing / f".dispersion-preflight-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        reason = err.strerror or first_line(err)
        where = "" if existing == path else f" (its nearest existing folder {existing})"
        raise DataError(f"root: {root} is not writable{where}: {reason}") from None
    os.close(fd)
    os.unlink(probe)


def _check_remote(store: Store, root: str, write: bool) -> None:
    store.check()  # bucket exists, credentials present, endpoint reachable
    if not write:
        return
    probe = store.path(f".dispersion-preflight-{uuid.uuid4().hex[:8]}")
    try:
        store.fs.pipe_file(probe, b"")
    except Exception as err:  # noqa: BLE001 - botocore/aiohttp errors have no common base
        raise DataError(f"root: cannot write to {root}: {first_line(err)}") from None
    try:
        store.fs.rm_file(probe)
    except Exception:  # noqa: BLE001, S110 - a store that allows writes but not deletes keeps the empty probe
        pass


def check_root(root: str, *, write: bool = True) -> Store:
    """The :class:`Store` of ``root`` once it is known to be usable (see module doc);
    ``write=False`` for commands that only read (``query``)."""
    store = Store(root)  # an unknown protocol or an empty root raises DataError here
    if store.local:
        _check_local(store, root, write)
    else:
        _check_remote(store, root, write)
    return store


def preflight(root: str, config: object | None = None, *, write: bool = True,
              trust_remote_code: bool = False) -> Store:
    """Every check that can fail cheaply before a command or a flow touches models, data
    or the root: consent for remote code in ``config`` (any config model), then the root.
    Returns the root's :class:`Store`. Raises a :class:`DispersionError` with one line."""
    if config is not None:
        check_remote_code(config, trust_remote_code)
    return check_root(root, write=write)
