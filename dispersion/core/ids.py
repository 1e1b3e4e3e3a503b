"""Identifiers: the one content digest and the one revision -> training-step parser.

Keys and fingerprints (extraction spec, work unit, weights, zoo build, training run,
fine-tune folder, sweep arm) are a ``digest`` of a JSON payload, so equal inputs give equal
keys on every machine. Three identities that stored data is keyed by keep the hash they were
defined with, so existing roots stay valid: ``segment_id`` and the sample key
(:mod:`dispersion.measure.sampling`) and the embedded corpus's split of documents
(:mod:`dispersion.measure.corpus`). Files (GGUF weights, published shards) are hashed by
their bytes with ``checksum``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable

_STEP = re.compile(r"(?:^|[^A-Za-z0-9])step(\d+)(?=$|[^0-9])|^step(\d+)")


def digest(payload: object, chars: int = 12) -> str:
    """Hex blake2b-128 of ``payload`` as canonical JSON (sorted keys), cut to ``chars`` (<= 32)."""
    if not 1 <= chars <= 32:
        raise ValueError(f"chars must be in 1..32, got {chars}")
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()[:chars]


def checksum(data: bytes | Iterable[bytes]) -> str:
    """Hex blake2b-128 (32 characters) of a file's bytes, given whole or as chunks (streamed)."""
    h = hashlib.blake2b(digest_size=16)
    for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
        h.update(chunk)
    return h.hexdigest()


def step_of(revision: str) -> int | None:
    """The training step named by a revision: ``step1000``, OLMo's ``stage1-step1000-tokens4B``,
    a checkpoint folder ``step30``; ``None`` for names without one (``main``, a commit hash)."""
    m = _STEP.search(revision)
    if m is None:
        return None
    return int(m.group(1) or m.group(2))


def step_folder(name: str) -> int | None:
    """N of a checkpoint folder named exactly ``step{N}``; ``None`` for any other name
    (``step30.tmp``, ``.tmp-step30-...``, ``final``)."""
    return int(name[4:]) if name.startswith("step") and name[4:].isdigit() else None


def revision_order(revision: str) -> tuple[float, str]:
    """Sort key: revisions by training step (``step30`` < ``step300``), names without a step last."""
    s = step_of(revision)
    return (float("inf") if s is None else float(s), revision)
