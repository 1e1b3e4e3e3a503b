r"""Query sets with correctness labels, and one model's measurement of them (paper 001
Sec. 3.1 and B.1: ranking example hardness without labels).

A *query set* is a table of :data:`~dispersion.measure.query_sources.QUERY_SCHEMA` (``query_id``,
``text``, ``correct``, ``task``, optional ``slice``) from lm-evaluation-harness sample logs or a
table (:mod:`dispersion.measure.query_sources`), or the embedded multiple-choice cloze that every
model answers itself by lm-eval's ``acc`` rule (:mod:`dispersion.measure.cloze`,
:func:`~dispersion.measure.answering.answer_cloze`), so labels exist for every model, zoo and real.

One model's measurement of a query (:class:`QueryUnit`, read back with :func:`read_measured`) is
what the hardness analysis reads: the pooled hidden states of the query text (the paper's choice
is the final layer's last-token state; other layers, sites and the ``mean`` pool are selectable), the within-query
token dispersion of those states (as :mod:`dispersion.measure.extract` defines it), and the
perplexity of the query text, ``ppl = exp(-(1/n) sum_t log p(x_t | x_<t))``, over the same
tokens the scan scores (all of them after a BOS, else all but the first). The cloze does this
in **one forward pass per context**: the context pass gives the states and the perplexity and
its KV cache, repeated once per choice, scores the C continuations.

The forward passes are :mod:`dispersion.measure.answering`; this module holds the query set,
its measurement spec and its shards.

Measurements are stored as shards under ``queries/`` (:func:`dispersion.core.layout.query_shard`),
each published atomically with a done marker that records its key and checksum, so a rerun
reads them instead of running the model again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dispersion.core import layout
from dispersion.core.errors import DataError, ModelError
from dispersion.core.ids import digest
from dispersion.core.integrity import CHECKSUMS
from dispersion.core.storage import Store, vector_column
from dispersion.measure.answering import Measured, answer_cloze, measure_texts, vector_name, within_name
from dispersion.measure.cloze import Cloze
from dispersion.measure.query_sources import QUERY_SCHEMA, checked_queries


@dataclass(frozen=True, eq=False)
class QuerySet:
    """A named query set: its queries (:data:`QUERY_SCHEMA`), the content key its stored
    measurements are filed under, and, for the embedded cloze, its token arrays."""

    name: str
    key: str
    queries: pa.Table
    cloze: Cloze | None = None
    model: str | None = None       # the model whose answers the labels are (None: each model answers)
    revision: str | None = None

    @classmethod
    def of_table(cls, name: str, queries: pa.Table, *, model: str | None = None,
                 revision: str | None = None) -> QuerySet:
        queries = checked_queries(queries.select(QUERY_SCHEMA.names).cast(QUERY_SCHEMA), name)
        key = digest([name, queries.column("query_id").to_pylist(), queries.column("text").to_pylist(),
                      queries.column("correct").to_pylist()], chars=12)
        return cls(name, key, queries, None, model, revision)

    @classmethod
    def of_cloze(cls, name: str, cloze: Cloze, definition: object) -> QuerySet:
        return cls(name, digest([name, definition], chars=12), cloze.queries, cloze)


@dataclass(frozen=True)
class QuerySpec:
    """What one measurement of a query set records (its key is part of every shard's path)."""

    layers: tuple[int | str, ...] = ("final",)
    sites: tuple[str, ...] = ("block",)
    pools: tuple[str, ...] = ("last",)
    prepend_bos: bool = True
    max_tokens: int = 512
    dtype: str = "float32"
    batch_size: int = 16
    shard_size: int = 256

    def key(self) -> str:
        return digest([list(self.layers), list(self.sites), sorted(self.pools), self.prepend_bos,
                       self.max_tokens, self.dtype], chars=12)


def _shard_table(q: pa.Table, m: Measured, chosen: np.ndarray | None, correct: np.ndarray,
                 loglik: np.ndarray | None) -> pa.Table:
    """A stored shard: the queries' ids and labels, then the measurement."""
    cols: dict[str, Any] = {
        "query_id": q.column("query_id"), "task": q.column("task"), "slice": q.column("slice"),
        "correct": pa.array(correct.astype(bool), pa.bool_()),
        "chosen": pa.array(chosen, pa.int32()) if chosen is not None else pa.nulls(q.num_rows, pa.int32()),
        "n_tokens": pa.array(m.n_tokens, pa.int32()), "n_scored": pa.array(m.n_scored, pa.int32()),
        "nll_sum": pa.array(m.nll_sum, pa.float64()), "ppl": pa.array(m.ppl, pa.float64()),
    }
    if loglik is not None:
        cols["loglik"] = pa.FixedSizeListArray.from_arrays(pa.array(loglik.reshape(-1), pa.float64()),
                                                           loglik.shape[1])
    for (layer, site, pool), v in sorted(m.vectors.items()):
        cols[vector_name(layer, site, pool)] = vector_column(v)
    for (layer, site), w in sorted(m.within.items()):
        cols[within_name(layer, site)] = pa.array(w, pa.float32())
    return pa.table(cols)


@dataclass(frozen=True)
class QueryUnit:
    """One shard (rows ``start:stop``) of one query set measured by one model@revision with one
    :class:`QuerySpec`: a unit of :mod:`dispersion.measure.units`. Its key hashes the weights'
    fingerprint, the set's content key, the spec, the shard and its rows."""

    mr: Any                  # dispersion.measure.scan.ModelRevision
    qs: QuerySet
    spec: QuerySpec
    shard: int
    start: int
    stop: int
    device: str = "cpu"

    @property
    def partition(self) -> str:
        return layout.query_partition(self.mr.model, self.mr.revision, self.qs.name, self.qs.key, self.spec.key())

    @property
    def rel(self) -> str:
        return layout.query_shard(self.partition, self.shard)

    @property
    def marker_rel(self) -> str:
        return layout.query_marker(self.partition, self.shard)

    @property
    def key(self) -> str:
        return digest([self.mr.fingerprint, self.qs.key, self.spec.key(), self.shard, self.size], chars=20)

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def model_key(self) -> tuple[str, str, str, str, str]:
        return ("model+tokenizer", self.mr.model, self.mr.revision, self.spec.dtype, self.device)

    def expect(self) -> dict:
        return {"key": self.key, "rows": self.size}

    def describe(self) -> str:
        return f"{self.mr.model}@{self.mr.revision} {self.qs.name} shard {self.shard}"

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``."""
        from dispersion.measure.modeling import load_model, load_tokenizer

        mr = self.mr
        tok = load_tokenizer(mr.source, field=mr.field)
        return load_model(mr.source, dtype=self.spec.dtype, device=self.device, field=mr.field), tok

    def run(self, store: Store, loaded: tuple[Any, Any], progress: Callable[[int], None] | None = None) -> dict:
        """Measure the shard and publish it, data first, marker last; returns the marker."""
        model, tok = loaded
        spec, qs = self.spec, self.qs
        pick = qs.queries.slice(self.start, self.size)
        common = dict(layers=spec.layers, sites=spec.sites, pools=spec.pools, prepend_bos=spec.prepend_bos,
                      batch_size=spec.batch_size)
        if qs.cloze is not None:
            from dispersion.measure.capture import resolve_bos

            bos = resolve_bos(tok, "extraction.prepend_bos") if spec.prepend_bos else None
            ans = answer_cloze(model, qs.cloze.take(slice(self.start, self.stop)), bos_token_id=bos,
                               **common)  # type: ignore[arg-type]
            table = _shard_table(pick, ans, ans.chosen, ans.correct, ans.loglik)
        else:
            m = measure_texts(model, tok, pick.column("text").to_pylist(), max_tokens=spec.max_tokens,
                              **common)  # type: ignore[arg-type]
            table = _shard_table(pick, m, None, np.asarray(pick.column("correct").to_pylist(), bool), None)
        sums = {self.rel: store.write_table(self.rel, table)}
        marker = {"key": self.key, "rows": self.size, "files": [self.rel], CHECKSUMS: sums,
                  "queryset": qs.name, "model": self.mr.model, "revision": self.mr.revision,
                  "unit": self.describe()}
        store.write_json(self.marker_rel, marker)
        if progress is not None:
            progress(self.size)
        return marker


def query_units(mr: Any, qs: QuerySet, spec: QuerySpec, device: str = "cpu") -> list[QueryUnit]:
    """The shards of ``spec.shard_size`` queries of one model@revision's measurement of ``qs``."""
    from dispersion.measure.sampling import shard_slices

    return [QueryUnit(mr, qs, spec, k, a, b, device)
            for k, (a, b) in enumerate(shard_slices(qs.queries.num_rows, spec.shard_size))]


def read_measured(store: Store, units: Sequence[QueryUnit]) -> pa.Table:
    """The published shards of ``units`` (one query set's), concatenated, each checked against
    the checksum its marker recorded: ``query_id``, ``task``, ``slice``, ``correct``,
    ``chosen`` (cloze), ``n_tokens``, ``n_scored``, ``nll_sum``, ``ppl``, ``loglik`` (cloze),
    ``vec/{layer}/{site}/{pool}``, ``within/{layer}/{site}``."""
    tables = []
    for u in units:
        marker = store.read_json(u.marker_rel) or {}
        if marker.get("key") != u.key:
            raise DataError(f"{u.marker_rel}: {u.describe()} is not measured; run `dispersion scan` first")
        tables.append(store.read_shard(u.rel, (marker.get(CHECKSUMS) or {}).get(u.rel)))
    return pa.concat_tables(tables)


def query_arrays(table: pa.Table, layer: str, site: str, pool: str) -> np.ndarray:
    """(N, d) float32 vectors of one (layer, site, pool) from a :func:`read_measured` table."""
    name = vector_name(layer, site, pool)
    if name not in table.column_names:
        raise ModelError(f"hardness: no stored vectors for layer {layer} site {site} pool {pool}")
    col = table.column(name).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size).astype(np.float32)
