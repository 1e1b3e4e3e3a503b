"""Deterministic segment sampling (paper 001 A.1.2, step 1).

Documents are tokenized without special tokens and cut into non-overlapping windows of
exactly L tokens (``offset = 0, L, 2L, ...``; a shorter tail is dropped). N windows are
drawn without replacement by ``numpy.random.default_rng(seed)`` and kept in corpus order.
``segment_id`` is a 63-bit hash of (dataset key, document id, offset, L): the same
segment has the same id in every run and every shard layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from dispersion.core.errors import DataError
from dispersion.measure.corpus import Document

SEGMENT_SCHEMA = pa.schema([
    pa.field("segment_id", pa.int64(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("offset", pa.int32(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])


def segment_id(dataset_key: str, doc_id: str, offset: int, length: int) -> int:
    digest = hashlib.blake2b(f"{dataset_key}|{doc_id}|{offset}|{length}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialization (vocab, merges, normalizer, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def sample_key(dataset_key: str, tok_fingerprint: str, num_segments: int, length: int, seed: int,
               shard_size: int) -> str:
    """Hash of everything that determines a sample and its shard layout."""
    blob = f"{dataset_key}|{tok_fingerprint}|{num_segments}|{length}|{seed}|{shard_size}".encode()
    return hashlib.blake2b(blob, digest_size=6).hexdigest()


def _encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast path, no length warnings
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[tuple[int, Document]]]:
    batch: list[tuple[int, Document]] = []
    for i, d in enumerate(docs):
        batch.append((i, d))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def sample_segments(docs: Sequence[Document] | Callable[[], Iterable[Document]], tokenizer, *, length: int,
                    num_segments: int, seed: int, dataset_key: str, dataset_name: str = "dataset",
                    batch: int = 256) -> pa.Table:
    """Sample ``num_segments`` non-overlapping ``length``-token segments; a SEGMENT_SCHEMA table.

    Two passes over the documents (a sequence, or a function that opens them again, e.g. a
    streamed dataset): the first counts the windows of each document, the second tokenizes
    only the documents that hold a chosen window. Memory holds the counts and the chosen
    segments, never the tokenized corpus.
    """
    open_docs = docs if callable(docs) else (lambda: iter(docs))
    counts: list[int] = []
    for chunk in _batches(open_docs(), batch):
        counts.extend(len(ids) // length for ids in _encode(tokenizer, [d.text for _, d in chunk]))
    if not counts:
        raise DataError(f"datasets.{dataset_name}: no documents")
    counts_arr = np.asarray(counts, dtype=np.int64)
    total = int(counts_arr.sum())
    if num_segments > total:
        raise DataError(f"datasets.{dataset_name}: asked for {num_segments} segments of {length} tokens "
                        f"but the data has only {total} (sampling.num_segments)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=num_segments, replace=False))
    ends = np.cumsum(counts_arr)
    doc_idx = np.searchsorted(ends, chosen, side="right")
    offsets = (chosen - (ends - counts_arr)[doc_idx]) * length
    wanted: dict[int, list[int]] = {}
    for row, d in enumerate(doc_idx):
        wanted.setdefault(int(d), []).append(row)
    seg_tokens: list[np.ndarray | None] = [None] * num_segments
    doc_ids: list[str] = [""] * num_segments
    for chunk in _batches(open_docs(), batch):
        keep = [(i, d) for i, d in chunk if i in wanted]
        if not keep:
            continue
        for (i, d), ids in zip(keep, _encode(tokenizer, [d.text for _, d in keep])):
            for row in wanted[i]:
                seg_tokens[row] = ids[offsets[row]:offsets[row] + length]
                doc_ids[row] = d.doc_id
    if any(t is None or len(t) != length for t in seg_tokens):
        raise DataError(f"datasets.{dataset_name}: documents changed between two reads (non-deterministic source)")
    texts = tokenizer.batch_decode([t.tolist() for t in seg_tokens if t is not None])  # all set: checked above
    return pa.table({
        "segment_id": pa.array([segment_id(dataset_key, di, int(o), length)
                                for di, o in zip(doc_ids, offsets)], pa.int64()),
        "doc_id": pa.array(doc_ids, pa.string()),
        "offset": pa.array(offsets.astype(np.int32), pa.int32()),
        "n_tokens": pa.array(np.full(num_segments, length, np.int32), pa.int32()),
        "token_ids": pa.array(seg_tokens, pa.list_(pa.int32())),
        "text": pa.array(texts, pa.string()),
    }, schema=SEGMENT_SCHEMA)


def shard_slices(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of consecutive shards."""
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]
