"""Local folders published atomically: build in a hidden sibling, then move into place.

A finished folder holds a ``_SUCCESS`` marker whose text is its build key; a folder is
complete exactly when the marker names the key asked for. Temporary siblings carry the pid
of the process that writes them, so stale ones (their process is gone) can be removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUCCESS = "_SUCCESS"


def cache_root(cache: str | os.PathLike) -> Path:
    """A cache folder setting (``~`` expanded) as an absolute path."""
    return Path(cache).expanduser().absolute()


def read_marker(folder: Path) -> str | None:
    """The build key in ``folder/_SUCCESS``, ``None`` when the build is not complete."""
    try:
        return (folder / SUCCESS).read_text().strip()
    except OSError:
        return None


def tmp_sibling(final: Path) -> Path:
    """A hidden temporary sibling of ``final`` named after this process (see :func:`clean_stale_tmp`)."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def install_folder(tmp: Path, final: Path, key: str | None) -> None:
    """Move a finished build folder into place; an old/stale ``final`` is swapped out first
    (with a ``key``: unless it is a finished build of that key, which is kept)."""
    if final.exists():
        if key is not None and read_marker(final) == key:  # someone else finished the same build meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = final.with_name(f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if key is None or read_marker(final) != key:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def publishing(final: Path, key: str | None = None) -> Iterator[Path]:
    """Build the folder ``final`` atomically: yields an empty hidden sibling to fill. When the
    block ends, ``_SUCCESS`` naming ``key`` (when given) is written and the sibling moved into
    place (:func:`install_folder`); when the block raises, the sibling is deleted and the error
    passes on. Stale siblings left by dead processes are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(final.parent)
    tmp = tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if key is not None:
            (tmp / SUCCESS).write_text(key + "\n")
        install_folder(tmp, final, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_tmp(cache: Path) -> None:
    """Remove temporary build folders left by processes that no longer run."""
    if not cache.is_dir():
        return
    for p in cache.iterdir():
        if not (p.name.startswith(".tmp-") or p.name.startswith(".old-")):
            continue
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
            continue  # still running
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
