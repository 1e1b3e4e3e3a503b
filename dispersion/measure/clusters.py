"""Within- and between-cluster dispersion of n-gram clusters (paper 001 section 2.3, Fig. 7).

The paper collects 10-grams of the WikiText-103 training set that occur at least 100 times,
retrieves 100 occurrences of each "accompanied by a 100-token left context", treats those
contexts as one cluster of "semantically similar contexts that share the same 10-gram
*continuation*", builds 500 such clusters, and follows, over training checkpoints,

* ``within``  = mean over clusters of the mean cosine distance of each member to its centroid,
* ``between`` = mean pairwise cosine distance among the centroids,

next to the training loss (Fig. 7). Both are :func:`dispersion.measure.metrics.cluster_dispersion`.

What is clustered (``ClusterSpec.anchor``):

* ``"context"`` (default, the paper's reading): the member is the T-token left context that
  *precedes* the n-gram; its representation is the hidden state at the context's last token,
  i.e. the context vector h_N that predicts the n-gram's first token (paper 2.1: "a chosen
  final-layer vector, h_N for the full sequence"). The n-gram itself is not fed to the model,
  so the only thing the members share is what comes *next*.
* ``"ngram"`` (a common re-implementation): the model is fed the T-token left context *and*
  the n-gram (T + n tokens) and the state at the n-gram's last token is taken. The last n
  inputs are then identical in every member, which makes clusters much tighter by
  construction; offered for comparison, not what the paper describes.

In both cases the chosen state is the state at the **last token of the window**, and every
window of a run has the same length (T, or T + n), so batches need no padding.

Pipeline (pure functions over arrays, one job each):

1. :func:`find_ngram_clusters` -- token documents -> :class:`Clusters` (n-grams, windows, labels);
2. :func:`cluster_states`      -- a model and the (N, L) windows -> the chosen hidden states;
3. :func:`cluster_dispersion_table` -- states + labels -> rows of :data:`CLUSTERS_SCHEMA`;
4. :func:`run_clusters`        -- all of the above over a list of model@revision (checkpoints);
5. :func:`dispersion.analyses.clusters.plot_clusters` -- the PNG of Fig. 7 (within, between vs
   step; loss on a twin axis), with the ``clusters`` analysis step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from dispersion.core.config import LayerRef, Site, Strict
from dispersion.core.errors import ConfigError, DataError, ModelError, NonFiniteError
from dispersion.measure.metrics import cluster_dispersion

__all__ = [
    "CLUSTERS_SCHEMA",
    "EMBEDDED_DEFAULTS",
    "FIELD",
    "ClusterSpec",
    "Clusters",
    "cluster_dispersion_table",
    "cluster_states",
    "find_ngram_clusters",
    "measure_table",
    "run_clusters",
    "token_docs_from_texts",
    "train_losses",
]

FIELD = "analysis.clusters"  # the run-config field of ClusterSpec (prefixes error messages)
Target = tuple[str, str]     # (layer name, site), as in dispersion.measure.capture

_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial hash


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #
class ClusterSpec(Strict):
    """Options of the n-gram cluster analysis (paper 001 section 2.3); paper values are the defaults.

    Attributes:
        n: n-gram length (paper: 10).
        min_count: M, an n-gram qualifies when it occurs at least M times inside documents,
            overlapping occurrences included (paper: 100).
        per_cluster: C, occurrences sampled per cluster among those with >= T tokens of left
            context in their document (paper: 100). A cluster needs at least 2 such occurrences.
        context: T, left-context tokens (paper: 100).
        max_clusters: K, clusters kept among the qualifying n-grams (paper: 500).
        select: how the K clusters are picked: ``random`` (a seeded uniform sample of the
            qualifying n-grams; the paper does not say, this is the neutral reading) or
            ``frequent`` (most frequent first, ties in token order).
        min_distinct: drop n-grams with fewer distinct tokens (paper: no filter, 1; 2 drops
            runs of one repeated token such as blank lines or indentation).
        anchor: ``context`` (paper: state at the last left-context token, the n-gram is the
            continuation) or ``ngram`` (state at the n-gram's last token); see the module doc.
        seed: seeds the choice of clusters and of occurrences.
        layer: layer(s) whose state is taken: ``0``..``n``, ``final`` or ``all`` (as extraction).
        site: ``block`` (residual stream), ``attn`` or ``mlp`` (sub-layer outputs), or a list.
        prepend_bos: feed ``[BOS] + window`` (as extraction.prepend_bos).
        dataset: name of the configured dataset whose documents are clustered (None: the first).
    """

    n: Annotated[int, Field(ge=1)] = 10
    min_count: Annotated[int, Field(ge=2)] = 100
    per_cluster: Annotated[int, Field(ge=2)] = 100
    context: Annotated[int, Field(ge=1)] = 100
    max_clusters: Annotated[int, Field(ge=2)] = 500
    select: Literal["random", "frequent"] = "random"
    min_distinct: Annotated[int, Field(ge=1)] = 1
    anchor: Literal["context", "ngram"] = "context"
    seed: int = 0
    layer: LayerRef | list[LayerRef] = "final"
    site: Site | list[Site] = "block"
    prepend_bos: bool = True
    dataset: str | None = None

    @property
    def window_length(self) -> int:
        """Tokens fed per member (without BOS): T for ``context``, T + n for ``ngram``."""
        return self.context + (self.n if self.anchor == "ngram" else 0)


# Scaled for the embedded corpus and the zoo (context 256; window T + BOS = 33 tokens). With the
# zoo tokenizer (vocab 4096), both domains:
#   train split (2.72 M tokens, 812 docs, as in the paper: n-grams of the training set):
#     7018 qualifying 5-grams -> K = 64 clusters, 1874 contexts (median 32 per cluster);
#   validation split (0.46 M tokens, 185 docs): 348 qualifying -> K = 64, 1707 contexts.
# Prose alone is small: train 177 qualifying, validation only 2 (use min_count=10 there: 32).
EMBEDDED_DEFAULTS = ClusterSpec(n=5, min_count=20, per_cluster=32, context=32, max_clusters=64)


def _check_spec(spec: ClusterSpec) -> None:
    """Re-check the numeric options (a spec built with model_construct/model_copy skips pydantic)."""
    for name, low in (("n", 1), ("min_count", 2), ("per_cluster", 2), ("context", 1),
                      ("max_clusters", 2), ("min_distinct", 1)):
        v = getattr(spec, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{FIELD}.{name}: must be an integer >= {low}, got {v!r}")
    if spec.min_distinct > spec.n:
        raise ConfigError(f"{FIELD}.min_distinct: {spec.min_distinct} exceeds n={spec.n}")
    if spec.select not in ("random", "frequent"):
        raise ConfigError(f"{FIELD}.select: must be 'random' or 'frequent', got {spec.select!r}")
    if spec.anchor not in ("context", "ngram"):
        raise ConfigError(f"{FIELD}.anchor: must be 'context' or 'ngram', got {spec.anchor!r}")


# --------------------------------------------------------------------------- #
# clusters of n-gram occurrences
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class Clusters:
    """K clusters of n-gram occurrences, N members in all, ordered by cluster then position.

    Attributes:
        ngrams: (K, n) int64 token ids of each cluster's n-gram.
        counts: (K,) occurrences of the n-gram inside documents (overlaps included).
        eligible: (K,) of those, occurrences with >= T tokens of left context.
        doc, start: (N,) document index and n-gram start (token offset in the document).
        labels: (N,) cluster index 0..K-1 of each member.
        n, context, anchor: as in :class:`ClusterSpec`.
        n_qualifying: n-grams that passed M, min_distinct and >= 2 eligible occurrences
            (the pool the K clusters were drawn from).
    """

    ngrams: np.ndarray
    counts: np.ndarray
    eligible: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    labels: np.ndarray
    n: int
    context: int
    anchor: str
    n_qualifying: int
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def n_clusters(self) -> int:
        return int(self.ngrams.shape[0])

    @property
    def n_occurrences(self) -> int:
        return int(self.labels.shape[0])

    @property
    def window_length(self) -> int:
        return self.context + (self.n if self.anchor == "ngram" else 0)

    @property
    def windows(self) -> np.ndarray:
        """(N, 3) int64 ``(doc, begin, end)``: the tokens ``doc[begin:end]`` fed for each member.

        ``begin = start - T``; ``end = start`` (anchor ``context``) or ``start + n`` (``ngram``).
        The chosen state is the one at position ``end - 1``."""
        begin = self.start - self.context
        end = self.start + (self.n if self.anchor == "ngram" else 0)
        return np.stack([self.doc, begin, end], axis=1)

    def token_windows(self, token_docs: Sequence[np.ndarray]) -> np.ndarray:
        """(N, L) int64 token ids of every window (L = :attr:`window_length`)."""
        w = self.windows
        L = self.window_length
        out = np.empty((len(w), L), dtype=np.int64)
        for i, (d, b, e) in enumerate(w):
            row = np.asarray(token_docs[int(d)])[b:e]
            if row.shape[0] != L:
                raise DataError(f"{FIELD}: window {i} (doc {d}, {b}:{e}) is outside its document; "
                                "were these clusters found on other token documents?")
            out[i] = row
        return out


def _concat_docs(token_docs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All documents in one int64 array, with each document's start offset and length."""
    if len(token_docs) == 0:
        raise DataError(f"{FIELD}.dataset: no token documents to cluster")
    arrays = []
    for i, d in enumerate(token_docs):
        a = np.asarray(d)
        if a.ndim != 1:
            raise DataError(f"{FIELD}.dataset: token document {i} must be 1-D, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{FIELD}.dataset: token document {i} must hold integer ids, got {a.dtype}")
        if a.size and int(a.min()) < 0:
            raise DataError(f"{FIELD}.dataset: token document {i} has a negative id {int(a.min())}")
        arrays.append(a.astype(np.int64, copy=False))
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    ids = np.concatenate(arrays) if lengths.sum() else np.zeros(0, np.int64)
    return ids, offsets, lengths


def _ngram_hash(ids: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    r"""64-bit polynomial hash of the n-gram at each start: :math:`\sum_j (x_{p+j}+1) B^{n-1-j} \bmod 2^{64}`.

    Vectorised over all starts (n passes over the array, uint64 arithmetic wraps). Equal
    n-grams hash equally; unequal ones may collide, which :func:`find_ngram_clusters` detects
    by comparing tokens, so a collision can never merge two n-grams into one cluster.
    """
    h = np.zeros(starts.shape[0], dtype=np.uint64)
    for j in range(n):
        h *= _HASH_BASE
        h += ids[starts + j].astype(np.uint64) + np.uint64(1)
    return h


def _rows_equal(ids: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """``ids[a:a+n] == ids[b:b+n]`` row-wise, without an (len(a), n) temporary."""
    eq = np.ones(a.shape[0], dtype=bool)
    for j in range(n):
        eq &= ids[a + j] == ids[b + j]
    return eq


def _exact_groups(ids: np.ndarray, pos: np.ndarray, key: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group the n-gram starts ``pos`` (already grouped by hash ``key``) by their exact tokens.

    Returns ``(pos, gid)`` sorted by group with dense group ids. Fast path: compare each start
    with its hash group's first start; only groups holding a mismatch (a hash collision) are
    split exactly with ``np.unique(axis=0)`` on their token rows.
    """
    order = np.argsort(key, kind="stable")
    pos, key = pos[order], key[order]
    first = np.ones(pos.shape[0], dtype=bool)
    first[1:] = key[1:] != key[:-1]
    gid = np.cumsum(first) - 1
    rep = pos[first][gid]
    bad = ~_rows_equal(ids, pos, rep, n)
    if not bad.any():
        return pos, gid
    # collision path: re-label every member of a colliding hash group by its exact n-gram
    bad_groups = np.unique(gid[bad])
    in_bad = np.isin(gid, bad_groups)
    idx = np.flatnonzero(in_bad)
    rows = ids[pos[idx][:, None] + np.arange(n)]
    _, sub = np.unique(np.column_stack([gid[idx], rows]), axis=0, return_inverse=True)
    new_gid = gid.copy()
    new_gid[idx] = gid.max() + 1 + sub.reshape(-1)
    order = np.argsort(new_gid, kind="stable")
    pos, new_gid = pos[order], new_gid[order]
    _, dense = np.unique(new_gid, return_inverse=True)
    return pos, dense.reshape(-1)


def find_ngram_clusters(token_docs: Sequence[np.ndarray], spec: ClusterSpec) -> Clusters:
    """Clusters of left contexts that share an n-gram continuation (paper 001 section 2.3).

    1. every n-gram start p inside a document (never across a document boundary) is hashed
       (:func:`_ngram_hash`); ``np.unique`` counts the hashes;
    2. hash groups with count >= M are verified token by token (collisions are split, so a
       cluster is always one exact n-gram); n-grams with count >= M stay;
    3. optional filter: at least ``min_distinct`` distinct tokens;
    4. an occurrence is *eligible* when it has >= T tokens of left context in its document;
       n-grams with < 2 eligible occurrences are dropped (a cluster needs 2 members);
    5. K = ``max_clusters`` of the remaining n-grams are picked: ``random`` = the first K of a
       seeded permutation of the n-grams in token order, ``frequent`` = highest count first
       (ties in token order); both are independent of the hash function;
    6. per cluster, C = ``per_cluster`` eligible occurrences are sampled without replacement
       (seeded, in cluster order; all of them when fewer), members sorted by position.

    Cost: O(n N) for hashing plus sorting N hashes.

    Raises:
        ConfigError: an option out of range (names the field ``analysis.clusters.<name>``).
        DataError: bad token documents, or fewer than 2 n-grams qualify (names ``min_count``).
    """
    _check_spec(spec)
    t0 = time.perf_counter()
    n, M, T = int(spec.n), int(spec.min_count), int(spec.context)
    ids, offsets, lengths = _concat_docs(token_docs)
    doc_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    ends = offsets + lengths
    starts = np.flatnonzero(np.arange(ids.size, dtype=np.int64) + n <= ends[doc_of])
    if starts.size == 0:
        raise DataError(f"{FIELD}.n: no document has {n} tokens ({len(lengths)} documents, "
                        f"longest {int(lengths.max(initial=0))})")
    h = _ngram_hash(ids, starts, n)
    uniq, inv, counts = np.unique(h, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    t_hash = time.perf_counter()
    cand = counts[inv] >= M
    if not cand.any():
        raise DataError(f"{FIELD}.min_count: no {n}-gram occurs >= {M} times in {len(lengths)} documents "
                        f"({ids.size} tokens; the most frequent occurs {int(counts.max())} times)")
    pos, gid = _exact_groups(ids, starts[cand], inv[cand], n)
    g_counts = np.bincount(gid)
    g_first = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])  # first member of each group
    ngrams = ids[pos[g_first][:, None] + np.arange(n)]
    keep = g_counts >= M
    if not keep.any():
        raise DataError(f"{FIELD}.min_count: no {n}-gram occurs >= {M} times in {len(lengths)} documents "
                        f"(after exact verification the most frequent occurs {int(g_counts.max())} times)")
    if spec.min_distinct > 1:
        srt = np.sort(ngrams, axis=1)
        distinct = 1 + (np.diff(srt, axis=1) != 0).sum(axis=1)
        keep &= distinct >= spec.min_distinct
    eligible_mask = (pos - offsets[doc_of[pos]]) >= T
    g_eligible = np.bincount(gid, weights=eligible_mask, minlength=g_counts.size).astype(np.int64)
    keep &= g_eligible >= 2
    qual = np.flatnonzero(keep)
    if qual.size < 2:
        raise DataError(f"{FIELD}.min_count: {qual.size} {n}-gram(s) occur >= {M} times with >= 2 occurrences "
                        f"having {T} tokens of left context (min_distinct={spec.min_distinct}); need >= 2 "
                        "clusters: lower min_count or context, or use more text")
    # canonical (token) order of the qualifying n-grams, independent of the hash function
    canon = qual[np.lexsort(ngrams[qual].T[::-1])]
    rng = np.random.default_rng(spec.seed)
    if spec.select == "frequent":
        chosen = canon[np.argsort(-g_counts[canon], kind="stable")][: spec.max_clusters]
    else:
        chosen = canon[rng.permutation(canon.size)[: spec.max_clusters]]
    # members: eligible occurrences of each chosen group, sampled in cluster order
    bounds = np.r_[g_first, pos.size]
    docs_out, starts_out, labels_out = [], [], []
    for k, g in enumerate(chosen):
        p = pos[bounds[g]:bounds[g + 1]]
        p = np.sort(p[eligible_mask[bounds[g]:bounds[g + 1]]])
        if p.size > spec.per_cluster:
            p = np.sort(rng.choice(p, size=spec.per_cluster, replace=False))
        d = doc_of[p]
        docs_out.append(d)
        starts_out.append(p - offsets[d])
        labels_out.append(np.full(p.size, k, dtype=np.int64))
    t1 = time.perf_counter()
    return Clusters(ngrams=ngrams[chosen].astype(np.int64), counts=g_counts[chosen].astype(np.int64),
                    eligible=g_eligible[chosen], doc=np.concatenate(docs_out), start=np.concatenate(starts_out),
                    labels=np.concatenate(labels_out), n=n, context=T, anchor=spec.anchor,
                    n_qualifying=int(qual.size),
                    timings={"hash_s": t_hash - t0, "total_s": t1 - t0, "tokens": float(ids.size)})


# --------------------------------------------------------------------------- #
# token documents
# --------------------------------------------------------------------------- #
def token_docs_from_texts(texts: Iterable[str], tokenizer, batch: int = 256) -> list[np.ndarray]:
    """Token ids of each text with a ``transformers`` tokenizer, no special tokens added."""
    out: list[np.ndarray] = []
    buf: list[str] = []

    def flush() -> None:
        enc = tokenizer(buf, add_special_tokens=False)["input_ids"]
        out.extend(np.asarray(e, dtype=np.int64) for e in enc)
        buf.clear()

    for t in texts:
        buf.append(t)
        if len(buf) == batch:
            flush()
    if buf:
        flush()
    return out


# --------------------------------------------------------------------------- #
# hidden states
# --------------------------------------------------------------------------- #
def _resolve_targets(model, layer, site) -> list[Target]:
    from dispersion.measure.capture import SITES, layer_names, targets
    from dispersion.measure.modeling import num_layers

    layers = [layer] if isinstance(layer, (int, str)) else list(layer)
    sites = [site] if isinstance(site, str) else list(site)
    for s in sites:
        if s not in SITES:
            raise ConfigError(f"{FIELD}.site: unknown site {s!r} (expected one of {', '.join(SITES)})")
    try:
        names = layer_names(layers, num_layers(model.config))
    except ModelError as err:
        raise ConfigError(f"{FIELD}.layer: {str(err).split(': ', 1)[-1]}") from None
    tg = targets(names, sites)
    if not tg:
        raise ConfigError(f"{FIELD}.site: sites {sites} do not exist at layers {names} (attn/mlp: blocks 1..n only)")
    return tg


def cluster_states(model, windows: np.ndarray, layer: LayerRef | Sequence[LayerRef] = "final",
                   site: str | Sequence[str] = "block", *, batch_size: int = 32, device=None,
                   prepend_bos: bool = True, bos_token_id: int | None = None) -> dict[Target, np.ndarray]:
    """The hidden state at the last token of every window, per (layer, site) target.

    ``windows`` is an (N, L) integer array (all windows have one length, so there is no
    padding); with ``prepend_bos`` the model sees ``[BOS] + window``. Layers and sites are
    those of :mod:`dispersion.measure.capture`: ``0`` = input of block 1, ``l`` = output of
    block ``l`` (residual stream, before the final norm), ``final`` = final-norm output (HF
    ``hidden_states[-1]``); ``attn``/``mlp`` = the sub-layer outputs of block ``l``. A
    :class:`~dispersion.measure.capture.Capture` reducer keeps the last position only
    (O(batch x d) per target), in inference mode; the forward stops after the deepest
    requested block unless ``final`` is asked.

    Args:
        model: a causal LM (``transformers``), in eval mode.
        bos_token_id: for ``prepend_bos``; default the model's BOS, else its EOS
            (:func:`~dispersion.measure.capture.resolve_bos`).
        device: where to run; None = where the model is (otherwise the model is moved there).

    Returns:
        ``{(layer_name, site): float32 (N, d)}``.
    """
    import torch

    from dispersion.measure.capture import Capture, resolve_bos
    from dispersion.measure.modeling import max_positions

    W = np.asarray(windows)
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise DataError(f"{FIELD}: windows must be a non-empty (N, L) array, got shape {W.shape}")
    if not np.issubdtype(W.dtype, np.integer):
        raise DataError(f"{FIELD}: windows must hold integer token ids, got {W.dtype}")
    if batch_size < 1:
        raise ConfigError(f"extraction.batch_size: must be >= 1, got {batch_size}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(W.min()) < 0 or int(W.max()) >= vocab:
        raise DataError(f"{FIELD}.dataset: token id out of range 0..{vocab - 1} for this model "
                        "(were the documents tokenized with another tokenizer?)")
    if prepend_bos:
        bos_token_id = resolve_bos(model if bos_token_id is None else bos_token_id, f"{FIELD}.prepend_bos")
    off = int(prepend_bos)
    limit = max_positions(model.config)
    if limit is not None and W.shape[1] + off > limit:
        raise ConfigError(f"{FIELD}.context: windows of {W.shape[1]} tokens{' + BOS' if off else ''} exceed "
                          f"the model's context ({limit})")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    tg = _resolve_targets(model, layer, site)
    N = W.shape[0]
    out: dict[Target, np.ndarray] = {}
    cur: dict[Target, Any] = {}

    def record(t: Target, hidden) -> None:  # reducer: the state at the last position, [B, d]
        cur[t] = hidden[:, -1, :].float()

    with Capture(model, tg, record, stop_early=True) as capture, torch.inference_mode():
        for s0 in range(0, N, batch_size):
            chunk = torch.as_tensor(W[s0:s0 + batch_size], dtype=torch.long)
            if off:
                assert bos_token_id is not None  # resolved above when prepend_bos
                chunk = torch.cat([torch.full((chunk.shape[0], 1), bos_token_id, dtype=torch.long), chunk], 1)
            chunk = chunk.to(dev)
            cur.clear()
            capture.forward(input_ids=chunk, attention_mask=torch.ones_like(chunk))
            for t in tg:
                v = cur[t].cpu().numpy()
                if t not in out:
                    out[t] = np.empty((N, v.shape[1]), dtype=np.float32)
                out[t][s0:s0 + v.shape[0]] = v
    for t, v in out.items():
        if not np.isfinite(v).all():
            raise NonFiniteError(f"{FIELD}: hidden state {'/'.join(t)} is not finite for "
                                 f"{int((~np.isfinite(v).all(1)).sum())} window(s)")
    return out


# --------------------------------------------------------------------------- #
# table
# --------------------------------------------------------------------------- #
CLUSTERS_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("step", pa.int64()), ("dataset", pa.string()),
    ("layer", pa.string()), ("site", pa.string()), ("anchor", pa.string()), ("n", pa.int64()),
    ("context", pa.int64()), ("n_clusters", pa.int64()), ("n_occurrences", pa.int64()),
    ("within", pa.float64()), ("between", pa.float64()), ("ratio", pa.float64()),
    ("within_euclidean", pa.float64()), ("between_euclidean", pa.float64()),
    ("train_loss", pa.float64()), ("val_loss", pa.float64()),
])
"""One row per (model, revision, layer, site). ``within``/``between``: cosine (paper 2.3);
``ratio`` = between / within; ``*_euclidean``: the same with the L2 distance; ``train_loss`` /
``val_loss``: the zoo's train log at that checkpoint (null for other models)."""


def cluster_dispersion_table(model: str, revision: str, states: Mapping[Target, np.ndarray], clusters: Clusters,
                             *, train_loss: float | None = None, val_loss: float | None = None,
                             dataset: str | None = None) -> pa.Table:
    r"""Rows of :data:`CLUSTERS_SCHEMA` for one model@revision, one per (layer, site) of ``states``.

    .. math::
        \text{within} = \frac{1}{K}\sum_k \frac{1}{|C_k|}\sum_{i\in C_k} \delta(x_i, c_k), \quad
        \text{between} = \binom{K}{2}^{-1}\sum_{k<l} \delta(c_k, c_l)

    with :math:`\delta = 1 - \cos` (paper 001 section 2.3) and again with the L2 distance,
    from :func:`dispersion.measure.metrics.cluster_dispersion`; ``ratio = between / within``.
    """
    from dispersion.core.ids import step_of

    rows = []
    for (layer, site), X in states.items():
        if X.shape[0] != clusters.n_occurrences:
            raise DataError(f"{FIELD}: {X.shape[0]} states for {clusters.n_occurrences} cluster members")
        try:
            within, between = cluster_dispersion(X, clusters.labels, "cosine")
            within_e, between_e = cluster_dispersion(X, clusters.labels, "euclidean")
        except ValueError as err:
            raise NonFiniteError(f"{FIELD}: {model}@{revision} layer {layer}/{site}: {err}") from None
        rows.append({"model": model, "revision": revision, "step": step_of(revision), "dataset": dataset,
                     "layer": layer, "site": site, "anchor": clusters.anchor, "n": clusters.n,
                     "context": clusters.context, "n_clusters": clusters.n_clusters,
                     "n_occurrences": clusters.n_occurrences, "within": within, "between": between,
                     "ratio": between / within if within > 0 else math.inf,
                     "within_euclidean": within_e, "between_euclidean": between_e,
                     "train_loss": train_loss, "val_loss": val_loss})
    return pa.Table.from_pylist(rows, schema=CLUSTERS_SCHEMA)


def train_losses(location: str | os.PathLike, revision: str | None) -> tuple[float | None, float | None]:
    """``(train_loss, val_loss)`` at a zoo checkpoint, else ``(None, None)``.

    A zoo model is a local folder ``{cache}/{zoo name}/step{N}`` whose parent holds the zoo's
    ``train_log.json`` (:func:`dispersion.measure.zoo_cache.zoo_train_log`); the record with ``step == N``
    is used (N from the folder name, or from ``revision`` when the folder is the root).
    """
    from dispersion.core.ids import step_of
    from dispersion.measure.zoo_cache import zoo_train_log

    path = Path(location).expanduser()
    root = path if (path / "train_log.json").is_file() else path.parent
    step = step_of(path.name) if root != path else (step_of(revision) if revision else None)
    if step is None or not (root / "train_log.json").is_file():
        return None, None
    try:
        log = zoo_train_log(root.parent, root.name)
    except ModelError:  # not a zoo model name
        return None, None
    for rec in log.get("checkpoints", []):
        if rec.get("step") == step:
            return rec.get("train_loss"), rec.get("val_loss")
    return None, None


def run_clusters(models: Sequence[tuple[str, Any, str | None]], token_docs: Sequence[np.ndarray] | None,
                 spec: ClusterSpec, *, clusters: Clusters | None = None, dataset: str | None = None,
                 dtype: str = "float32", device: str = "auto", batch_size: int = 32,
                 log: Callable[[str], None] | None = None) -> pa.Table:
    """The cluster table (:data:`CLUSTERS_SCHEMA`) over model checkpoints (paper 001 Fig. 7).

    Clusters are found once (:func:`find_ngram_clusters` on ``token_docs``, unless ``clusters``
    is given) and the same windows are fed to every ``(name, source, revision)``; ``source``
    is a :class:`dispersion.measure.modeling.ModelSource` or a model id / folder (resolved with
    ``revision``; ``stepN`` = sub-folder of a local folder). Every model must use the
    tokenizer the documents were tokenized with. Models are loaded one at a time and only the
    (N, d) states of the current one are held.
    """
    from dispersion.measure.modeling import ModelSource, load_model, resolve_device, resolve_dtype, resolve_source

    if clusters is None:
        if token_docs is None:
            raise DataError(f"{FIELD}.dataset: give token_docs or clusters")
        clusters = find_ngram_clusters(token_docs, spec)
        if log:
            log(f"clusters: {clusters.n_clusters} of {clusters.n_qualifying} qualifying {clusters.n}-grams, "
                f"{clusters.n_occurrences} contexts ({clusters.timings['total_s']:.2f}s)")
    windows = clusters.token_windows(token_docs) if token_docs is not None else None
    if windows is None:
        raise DataError(f"{FIELD}.dataset: token_docs are needed to build the windows")
    dev = resolve_device(device)
    tables = []
    for name, source, revision in models:
        src = source if isinstance(source, ModelSource) else resolve_source(str(source), revision, field="models")
        t0 = time.perf_counter()
        model = load_model(src, dtype=resolve_dtype(dtype, dev), device=dev, field="models")
        try:
            states = cluster_states(model, windows, spec.layer, spec.site, batch_size=batch_size,
                                    prepend_bos=spec.prepend_bos)
        finally:
            del model
        tl, vl = train_losses(src.location, revision) if src.local else (None, None)
        rev = revision or "main"
        tables.append(cluster_dispersion_table(name, rev, states, clusters, train_loss=tl, val_loss=vl,
                                               dataset=dataset if dataset is not None else spec.dataset))
        if log:
            log(f"clusters: {name}@{rev} done in {time.perf_counter() - t0:.1f}s")
    if not tables:
        return CLUSTERS_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def measure_table(model, inputs: tuple) -> pa.Table:
    """The :data:`CLUSTERS_SCHEMA` rows of one model@revision: the measurement of a
    :class:`dispersion.measure.units.TableUnit` of the ``clusters`` step, ``inputs`` =
    ``(name, revision, source, windows, clusters, spec, dataset, batch_size)``."""
    name, revision, source, windows, clusters, spec, dataset, batch_size = inputs
    states = cluster_states(model, windows, spec.layer, spec.site, batch_size=batch_size,
                            prepend_bos=spec.prepend_bos)
    tl, vl = train_losses(source.location, revision) if source.local else (None, None)
    return cluster_dispersion_table(name, revision, states, clusters, train_loss=tl, val_loss=vl, dataset=dataset)
