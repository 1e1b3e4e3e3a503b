r"""Query sets with correctness labels, and one model's measurement of them (paper 001
Sec. 3.1 and B.1: ranking example hardness without labels).

A *query set* is a table of :data:`QUERY_SCHEMA` (``query_id``, ``text``, ``correct``,
``task``, optional ``slice``) from one of three sources:

* :func:`read_lm_eval_samples` -- the ``samples_<task>_<date>.jsonl`` files that
  lm-evaluation-harness 0.4.x writes with ``--log_samples --output_path P`` (one JSON object
  per document and filter: ``doc_id``, ``doc``, ``target``, ``arguments`` =
  ``{"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}``, ``resps``,
  ``filtered_resps``, ``filter``, ``metrics`` (the metric names), the hashes, and every metric
  as a key, e.g. ``"acc": 1.0``). The query text is the request context the model saw,
  ``arguments.gen_args_0.arg_0`` (few-shot examples and chat template included, as lm-eval
  rendered them); ``correct`` is the chosen metric (``acc`` by default, ``acc_norm`` or any
  0/1 metric); the task comes from the file name.
* :func:`read_query_table` -- a CSV or Parquet table with ``query_id``, ``text``,
  ``correct`` and optionally ``task`` and ``slice``.
* :func:`build_cloze` -- an embedded multiple-choice cloze, so a run needs no hub: from the
  held-out split of the embedded corpus, a context of T tokens and its true continuation of K
  tokens among C - 1 continuations of other documents of the same domain. Every model answers
  it itself (:func:`answer_cloze`), by lm-eval's ``acc`` rule: the choice with the highest
  summed log-likelihood

  .. math:: \hat c = \arg\max_c \sum_{k=1}^{K} \log p(y^{(c)}_k \mid x_{1..T}, y^{(c)}_{<k}),

  so correct/incorrect labels exist for every model, zoo and real.

One model's measurement of a query (:class:`QueryUnit`, read back with :func:`read_measured`) is
what the hardness analysis reads: the pooled hidden states of the query text (the paper's choice is the final layer's
last-token state; other layers, sites and the ``mean`` pool are selectable), the within-query
token dispersion of those states (as :mod:`dispersion.measure.extract` defines it), and the
perplexity of the query text, ``ppl = exp(-(1/n) sum_t log p(x_t | x_<t))``, over the same
tokens the scan scores (all of them after a BOS, else all but the first). The cloze does this
in **one forward pass per context**: the context pass gives the states and the perplexity and
its KV cache, repeated once per choice, scores the C continuations.

Measurements are stored as shards under ``queries/`` (:func:`dispersion.core.layout.query_shard`),
each published atomically with a done marker that records its key and checksum, so a rerun
reads them instead of running the model again.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dispersion.core import layout
from dispersion.core.errors import ConfigError, DataError, ModelError, NonFiniteError
from dispersion.core.ids import digest
from dispersion.core.integrity import CHECKSUMS
from dispersion.core.storage import Store, arrow_bytes, parse_parquet, vector_column
from dispersion.measure.capture import Capture, Target, layer_names, targets
from dispersion.measure.corpus import Document

__all__ = [
    "LM_EVAL_FILE",
    "QUERY_SCHEMA",
    "Cloze",
    "ClozeAnswers",
    "Measured",
    "QuerySet",
    "QuerySpec",
    "answer_cloze",
    "build_cloze",
    "lm_eval_sample_files",
    "QueryUnit",
    "query_units",
    "read_measured",
    "measure_texts",
    "query_arrays",
    "read_lm_eval_samples",
    "read_query_table",
    "vector_name",
    "within_name",
]

QUERY_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("correct", pa.bool_()),      # null for the embedded cloze until a model answers it
    pa.field("task", pa.string(), nullable=False),
    pa.field("slice", pa.string()),
])
"""A query set: one row per query, ``query_id`` unique within the set."""

# samples_<task>_<date>.jsonl, the date as lm-eval's EvaluationTracker writes it (2024-05-01T12-30-59.123456)
LM_EVAL_FILE = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.jsonl$")


# --------------------------------------------------------------------------- #
# query sets from files
# --------------------------------------------------------------------------- #
def _fs_paths(paths: Iterable[str], pattern: str) -> list[str]:
    """Files named by ``paths`` (files, folders searched recursively for ``pattern``, globs),
    local or fsspec URLs, sorted and without duplicates."""
    import fnmatch

    import fsspec

    out: list[str] = []
    for p in paths:
        fs, base = fsspec.core.url_to_fs(os.path.expanduser(str(p)))
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        unstrip = (lambda x: x) if proto in ("file", "local") else fs.unstrip_protocol
        if any(c in base for c in "*?["):
            found = [f for f in fs.glob(base) if fs.isfile(f)]
        elif fs.isdir(base):
            found = [f for f in fs.find(base) if fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern)]
        elif fs.isfile(base):
            found = [base]
        else:
            raise DataError(f"paths: {p!r} does not exist")
        if not found:
            raise DataError(f"paths: no {pattern} file under {p!r}")
        out.extend(unstrip(f) for f in found)
    return sorted(dict.fromkeys(out))


def lm_eval_sample_files(paths: Iterable[str]) -> dict[str, str]:
    """``{task: file}`` of the lm-eval sample files under ``paths`` (files, folders, globs).

    Raises:
        DataError: a file not named ``samples_<task>_<date>.jsonl``, or two files of one task
            (two runs in one output folder: name the one to read).
    """
    out: dict[str, str] = {}
    for f in _fs_paths(paths, "samples_*.jsonl"):
        m = LM_EVAL_FILE.match(f.rsplit("/", 1)[-1])
        if m is None:
            raise DataError(f"paths: {f!r} is not an lm-eval sample file (samples_<task>_<date>.jsonl)")
        task = m.group("task")
        if task in out:
            raise DataError(f"paths: two sample files of task {task!r} ({out[task]!r}, {f!r}); give one of them")
        out[task] = f
    return out


def _label(value: Any, where: str, metric: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: metric {metric!r} is {value!r}, not 0/1 (choose a per-document 0/1 metric "
                    "such as acc, acc_norm or exact_match)")


def read_lm_eval_samples(paths: Iterable[str], *, metric: str = "acc", filter: str | None = None) -> pa.Table:
    """A :data:`QUERY_SCHEMA` table from lm-eval 0.4.x sample logs (see the module doc).

    ``query_id`` is ``{task}/{doc_id}``; ``text`` is ``arguments.gen_args_0.arg_0``, the
    context of the document's first request (every request of a multiple-choice document
    shares it); ``correct`` is the document's ``metric`` value (0/1). Tasks scored under
    several filters (generation tasks: ``strict-match``, ``flexible-extract``) log one line
    per filter: ``filter`` picks one, and is required then.

    Raises:
        DataError: unreadable lines, a missing metric (the message lists those logged), a
            metric that is not 0/1, several filters without ``filter``, duplicate documents.
    """
    import fsspec

    files = lm_eval_sample_files(paths)
    ids: list[str] = []
    texts: list[str] = []
    labels: list[bool] = []
    tasks: list[str] = []
    for task, path in files.items():
        rows: dict[str, list[tuple[int, str, bool]]] = {}  # filter -> (doc_id, text, correct)
        with fsspec.open(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                    doc_id = int(rec["doc_id"])
                    text = rec["arguments"]["gen_args_0"]["arg_0"]
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(f"{where}: not an lm-eval sample line ({type(err).__name__}: {err})") from None
                if not isinstance(text, str):
                    raise DataError(f"{where}: arguments.gen_args_0.arg_0 is not a string")
                if metric not in rec:
                    logged = rec.get("metrics") or [k for k in rec if k not in (
                        "doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                        "doc_hash", "prompt_hash", "target_hash")]
                    raise DataError(f"{where}: no metric {metric!r} (logged: {', '.join(map(str, logged))})")
                rows.setdefault(str(rec.get("filter", "none")), []).append(
                    (doc_id, text, _label(rec[metric], where, metric)))
        if not rows:
            raise DataError(f"{path}: no samples")
        if filter is not None:
            if filter not in rows:
                raise DataError(f"{path}: no samples under filter {filter!r} (logged: {', '.join(rows)})")
            chosen = rows[filter]
        elif len(rows) > 1:
            raise DataError(f"{path}: samples under several filters ({', '.join(rows)}); choose one with filter")
        else:
            chosen = next(iter(rows.values()))
        seen: set[int] = set()
        for doc_id, text, ok in sorted(chosen, key=lambda r: r[0]):
            if doc_id in seen:
                raise DataError(f"{path}: document {doc_id} logged twice under one filter")
            seen.add(doc_id)
            ids.append(f"{task}/{doc_id}")
            texts.append(text)
            labels.append(ok)
            tasks.append(task)
    return pa.table({"query_id": ids, "text": texts, "correct": pa.array(labels, pa.bool_()), "task": tasks,
                     "slice": pa.nulls(len(ids), pa.string())}, schema=QUERY_SCHEMA)


def _bool_column(col: pa.ChunkedArray, where: str) -> pa.Array:
    values = col.to_pylist()
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            v = {"true": True, "false": False, "1": True, "0": False}.get(v.strip().lower(), v)
        if isinstance(v, bool):
            out.append(v)
        elif isinstance(v, (int, float)) and v in (0, 1):
            out.append(bool(v))
        else:
            raise DataError(f"{where}: row {i}: correct is {v!r}, not true/false or 0/1")
    return pa.array(out, pa.bool_())


def read_query_table(path: str, *, task: str | None = None) -> pa.Table:
    """A :data:`QUERY_SCHEMA` table from a CSV or Parquet file (local path or fsspec URL)
    with columns ``query_id``, ``text``, ``correct`` (true/false or 0/1) and optionally
    ``task`` (default ``task``, else the file's stem) and ``slice``.

    Raises:
        DataError: a missing column, an unreadable file, an empty text, a duplicate id.
    """
    import fsspec
    import pyarrow.csv as pcsv

    name = str(path).rsplit("/", 1)[-1]
    try:
        with fsspec.open(os.path.expanduser(str(path)), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"path: no such file {path!r}") from None
    try:
        if name.endswith((".parquet", ".pq")):
            table = parse_parquet(data)
        else:
            table = pcsv.read_csv(pa.BufferReader(arrow_bytes(data)), convert_options=pcsv.ConvertOptions(
                column_types={"query_id": pa.string(), "text": pa.string(), "task": pa.string(),
                              "slice": pa.string()}))
    except (pa.ArrowException, ValueError, OSError) as err:
        raise DataError(f"{path}: cannot read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") \
            from None
    missing = [c for c in ("query_id", "text", "correct") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)})")
    n = table.num_rows
    stem = task or name.rsplit(".", 1)[0]
    tasks = table.column("task").cast(pa.string()) if "task" in table.column_names else pa.array([stem] * n)
    slices = table.column("slice").cast(pa.string()) if "slice" in table.column_names else pa.nulls(n, pa.string())
    out = pa.table({"query_id": table.column("query_id").cast(pa.string()),
                    "text": table.column("text").cast(pa.string()),
                    "correct": _bool_column(table.column("correct"), str(path)),
                    "task": tasks, "slice": slices}, schema=QUERY_SCHEMA.remove_metadata())
    return _checked(out, str(path))


def _checked(table: pa.Table, where: str) -> pa.Table:
    ids = table.column("query_id").to_pylist()
    if any(i is None or i == "" for i in ids):
        raise DataError(f"{where}: a query_id is empty")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{where}: query_id {dup!r} appears twice")
    if any(t is None or not t.strip() for t in table.column("text").to_pylist()):
        raise DataError(f"{where}: a query text is empty")
    if table.num_rows == 0:
        raise DataError(f"{where}: no queries")
    return table.cast(QUERY_SCHEMA)


# --------------------------------------------------------------------------- #
# the embedded cloze
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class Cloze:
    """N multiple-choice cloze queries: a context of T tokens, C continuations of K tokens.

    Attributes:
        queries: :data:`QUERY_SCHEMA` table (``text`` = the decoded context, ``correct`` null).
        contexts: (N, T) int64 token ids.
        options: (N, C, K) int64: option ``answer[i]`` is the true continuation of query i, the
            others are continuations from other documents of the same domain.
        answer: (N,) int64 index of the true continuation.
    """

    queries: pa.Table
    contexts: np.ndarray
    options: np.ndarray
    answer: np.ndarray

    @property
    def n(self) -> int:
        return int(self.contexts.shape[0])

    def take(self, rows: slice) -> Cloze:
        return Cloze(self.queries.slice(rows.start, rows.stop - rows.start), self.contexts[rows],
                     self.options[rows], self.answer[rows])


def build_cloze(documents: Sequence[Document], tokenizer, *, name: str, context: int = 64,
                continuation: int = 8, choices: int = 4, n: int = 1000, seed: int = 0) -> Cloze:
    """The embedded multiple-choice cloze over ``documents`` (one domain's held-out split).

    1. N windows of T + K tokens are sampled without overlap, as
       :func:`dispersion.measure.sampling.sample_segments` samples segments (documents cut at
       offsets 0, T + K, ...; N windows drawn without replacement, seeded; each document
       tokenized once): the first T tokens are the context, the last K the true continuation;
    2. each query gets C - 1 distractors: the continuations of other queries drawn at random
       (seeded) from *other documents*, each different from the true one and from each other;
    3. the true continuation takes a random position among the C options.

    ``query_id`` is ``{name}/{doc_id}@{offset}``; ``task`` is ``name``.

    Raises:
        DataError: too few windows of T + K tokens, or too few documents for C - 1 distractors.
    """
    if context < 1 or continuation < 1 or choices < 2 or n < 1:
        raise ConfigError(f"{name}: needs context >= 1, continuation >= 1, choices >= 2, n >= 1")
    L = context + continuation
    encoded = _encode(tokenizer, [d.text for d in documents])
    counts = np.asarray([len(t) // L for t in encoded], dtype=np.int64)
    if n > int(counts.sum()):
        raise DataError(f"{name}: asked for {n} cloze queries of {context} + {continuation} tokens but the "
                        f"documents hold only {int(counts.sum())} windows (lower n)")
    chosen = np.sort(np.random.default_rng(seed).choice(int(counts.sum()), size=n, replace=False))
    ends = np.cumsum(counts)
    doc_idx = np.searchsorted(ends, chosen, side="right")
    offsets = ((chosen - (ends - counts)[doc_idx]) * L).tolist()
    tokens = np.asarray([encoded[d][o:o + L] for d, o in zip(doc_idx, offsets)], dtype=np.int64)  # [N, T + K]
    docs = np.asarray([documents[d].doc_id for d in doc_idx], dtype=object)
    ctx, cont = tokens[:, :context], tokens[:, context:]
    rng = np.random.default_rng([seed, 0xC102E])
    options = np.empty((n, choices, continuation), dtype=np.int64)
    answer = rng.integers(0, choices, size=n)
    for i in range(n):
        picked: list[np.ndarray] = [cont[i]]
        for j in rng.permutation(n):
            if docs[j] == docs[i] or any(np.array_equal(cont[j], p) for p in picked):
                continue
            picked.append(cont[j])
            if len(picked) == choices:
                break
        if len(picked) < choices:
            raise DataError(f"{name}: query {i} finds only {len(picked) - 1} distinct continuations in other "
                            f"documents for {choices - 1} distractors (raise n or lower choices)")
        others = iter(picked[1:])
        for c in range(choices):
            options[i, c] = cont[i] if c == answer[i] else next(others)
    texts = tokenizer.batch_decode(ctx.tolist())
    ids = [f"{name}/{d}@{o}" for d, o in zip(docs, offsets)]
    queries = pa.table({"query_id": ids, "text": texts, "correct": pa.nulls(n, pa.bool_()), "task": [name] * n,
                        "slice": pa.nulls(n, pa.string())}, schema=QUERY_SCHEMA)
    return Cloze(queries, ctx, options, answer.astype(np.int64))


# --------------------------------------------------------------------------- #
# measurement
# --------------------------------------------------------------------------- #
@dataclass
class Measured:
    """Per-query results, in query order (N queries).

    ``n_scored``, ``nll_sum``, ``ppl``: (N,) the query text's scored tokens, summed NLL and
    perplexity; ``vectors``: (layer, site, pool) -> (N, d) float32 pooled states;
    ``within``: (layer, site) -> (N,) within-query token dispersion (NaN below 2 tokens).
    """

    n_tokens: np.ndarray
    n_scored: np.ndarray
    nll_sum: np.ndarray
    ppl: np.ndarray
    vectors: dict[tuple[str, str, str], np.ndarray]
    within: dict[Target, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ClozeAnswers(Measured):
    """:class:`Measured` plus the answers: ``loglik`` (N, C) summed continuation
    log-likelihoods, ``chosen`` (N,) argmax (first of ties), ``correct`` (N,) bool."""

    loglik: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    chosen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def _token_logprob(lm_head, softcap: float | None, hidden, ids):
    """log p(ids[i] | state hidden[i]) for rows of ``hidden`` [M, d], ``ids`` [M]; logits in
    chunks of at most :data:`dispersion.measure.extract.LOGIT_BUDGET` values."""
    import torch

    from dispersion.measure.extract import LOGIT_BUDGET

    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    chunk = max(1, LOGIT_BUDGET // lm_head.weight.shape[0])
    for s in range(0, hidden.shape[0], chunk):
        logits = lm_head(hidden[s:s + chunk]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        out[s:s + chunk] = logits.gather(1, ids[s:s + chunk, None]).squeeze(1) - torch.logsumexp(logits, -1)
    return out


def _cache_argument(base) -> str:
    """The keyword a base model's forward takes its KV cache by (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def answer_cloze(model, cloze: Cloze, *, layers: Sequence[int | str] = ("final",),
                 sites: Sequence[str] = ("block",), pools: Sequence[str] = ("last",),
                 prepend_bos: bool = True, bos_token_id: int | None = None,
                 batch_size: int = 16) -> ClozeAnswers:
    """Answer the cloze and measure its contexts, one forward pass per batch of contexts.

    Per batch of B contexts ``[BOS] x_1..x_T``:

    1. one pass of the base model under :class:`dispersion.measure.capture.Capture` with
       its KV cache: the states of the requested targets pooled over the T context positions
       (``last`` = at x_T, ``mean`` = over x_1..x_T; the BOS position is not pooled), their
       within-context token dispersion, the NLL of the context (x_1..x_T after a BOS, else
       x_2..x_T), and log p(y_1 | x) of every option's first token from the state at x_T;
    2. the cache repeated C times (``batch_repeat_interleave``) and the B x C options' tokens
       y_1..y_{K-1} fed once: log p(y_k | x, y_<k) for k = 2..K.

    The answer is the option with the highest sum (lm-eval's ``acc``; the first of ties).
    """
    import torch

    from dispersion.measure.capture import resolve_bos
    from dispersion.measure.modeling import max_positions, num_layers, text_config

    N, T = cloze.contexts.shape
    C, K = cloze.options.shape[1:]
    off = int(prepend_bos)
    if prepend_bos:
        bos_token_id = resolve_bos(model if bos_token_id is None else bos_token_id, "extraction.prepend_bos")
    limit = max_positions(model.config)
    if limit is not None and off + T + K > limit:
        raise ConfigError(f"hardness: cloze of {T} + {K} tokens{' + BOS' if off else ''} exceeds the model's "
                          f"context ({limit})")
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(cloze.contexts.max()) >= vocab or int(cloze.options.max()) >= vocab:
        raise DataError(f"hardness: token id out of range 0..{vocab - 1} (built with another tokenizer?)")
    tg = targets(layer_names(layers, num_layers(model.config)), sites)
    dev = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    vecs: dict[tuple[str, str, str], np.ndarray] = {}
    within: dict[Target, np.ndarray] = {}
    nll_sum = np.empty(N, np.float64)
    loglik = np.empty((N, C), np.float64)
    cur: dict[Any, Any] = {}

    def reduce(t: Target, hidden) -> None:  # [B, off + T, d] -> pooled [B, d] and within [B]
        h = hidden[:, off:].float()
        if "last" in pools:
            cur[(*t, "last")] = h[:, -1]
        if "mean" in pools:
            cur[(*t, "mean")] = h.mean(1)
        n = h.shape[1]
        unit = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        s = unit.sum(1).double()
        cur[t] = 1.0 - ((s ** 2).sum(-1) - n) / max(n * (n - 1), 1) if n >= 2 else \
            torch.full((h.shape[0],), float("nan"), dtype=torch.float64)

    t0 = time.perf_counter()
    with torch.inference_mode():
        for s0 in range(0, N, batch_size):
            ctx = torch.as_tensor(cloze.contexts[s0:s0 + batch_size], dtype=torch.long)
            opts = torch.as_tensor(cloze.options[s0:s0 + batch_size], dtype=torch.long).to(dev)  # [B, C, K]
            B = ctx.shape[0]
            if off:
                ctx = torch.cat([torch.full((B, 1), int(bos_token_id), dtype=torch.long), ctx], 1)  # type: ignore[arg-type]
            ctx = ctx.to(dev)
            cur.clear()
            with Capture(model, tg, reduce) as cap:
                hidden, cache = cap.forward_cached(input_ids=ctx, attention_mask=torch.ones_like(ctx))
            # context NLL: state p predicts token p + 1
            lp_ctx = _token_logprob(lm_head, softcap, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                                    ctx[:, 1:].reshape(-1)).view(B, -1)
            nll_sum[s0:s0 + B] = (-lp_ctx.double().sum(1)).cpu().numpy()
            last = hidden[:, -1:].expand(B, C, hidden.shape[-1]).reshape(B * C, -1)  # [B*C, d]
            ll = _token_logprob(lm_head, softcap, last, opts[:, :, 0].reshape(-1)).view(B, C).double()
            if K > 1:
                cache.batch_repeat_interleave(C)  # [B*C, heads, off + T, d_head]: row b*C + c = context b
                feed = opts[:, :, :-1].reshape(B * C, K - 1)
                mask = torch.ones((B * C, ctx.shape[1] + K - 1), dtype=torch.long, device=dev)
                out = model.base_model(input_ids=feed, attention_mask=mask, use_cache=True,
                                       **{_cache_argument(model.base_model): cache})
                h2 = out.last_hidden_state  # [B*C, K-1, d]
                lp = _token_logprob(lm_head, softcap, h2.reshape(-1, h2.shape[-1]),
                                    opts[:, :, 1:].reshape(-1)).view(B, C, K - 1)
                ll = ll + lp.double().sum(-1)
            del cache
            loglik[s0:s0 + B] = ll.cpu().numpy()
            for key, v in cur.items():
                if len(key) == 3:
                    vecs.setdefault(key, np.empty((N, v.shape[1]), np.float32))[s0:s0 + B] = v.cpu().numpy()
                else:
                    within.setdefault(key, np.empty(N, np.float32))[s0:s0 + B] = v.cpu().numpy()
    n_scored = np.full(N, T + off - 1, np.int32)
    ppl = np.exp(nll_sum / np.maximum(n_scored, 1))
    chosen = np.argmax(loglik, axis=1)
    res = ClozeAnswers(np.full(N, T, np.int32), n_scored, nll_sum, ppl, vecs, within,
                       {"forward_s": time.perf_counter() - t0}, loglik=loglik, chosen=chosen,
                       correct=chosen == cloze.answer)
    _check(res)
    return res


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast path, no length warnings
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def measure_texts(model, tokenizer, texts: Sequence[str], *, layers: Sequence[int | str] = ("final",),
                  sites: Sequence[str] = ("block",), pools: Sequence[str] = ("last",), prepend_bos: bool = True,
                  max_tokens: int = 512, batch_size: int = 16) -> Measured:
    """Measure query texts with :class:`dispersion.measure.extract.Extractor` (one forward
    pass per batch): pooled states, within-query dispersion and perplexity of each text's
    tokens (no special tokens; a BOS before them with ``prepend_bos``). A text longer than
    ``max_tokens`` keeps its **last** ``max_tokens`` tokens: the end of a prompt, where the
    question is, and the state the last-token pool reads."""
    from dispersion.measure.capture import bos_or_eos, resolve_bos
    from dispersion.measure.extract import Extractor
    from dispersion.measure.modeling import max_positions

    limit = max_positions(model.config)
    keep = max_tokens if limit is None else min(max_tokens, limit - int(prepend_bos))
    ids = [np.asarray(t[-keep:], dtype=np.int64) for t in _encode(tokenizer, texts)]
    short = [i for i, t in enumerate(ids) if len(t) < (1 if prepend_bos else 2)]
    if short:
        raise DataError(f"hardness: query {short[0]} has {len(ids[short[0]])} tokens: too short to score")
    bos = resolve_bos(tokenizer, "extraction.prepend_bos") if prepend_bos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos_or_eos(tokenizer) or 0)
    ex = Extractor(model, layers=layers, sites=sites, pools=list(pools), prepend_bos=prepend_bos,
                   bos_token_id=bos, batch_size=batch_size, pad_token_id=pad)
    out = ex.extract(ids)
    f = out.features
    return Measured(np.asarray([len(t) for t in ids], np.int32), f["n_scored"], f["nll_sum"], f["ppl"],
                    {k: v.astype(np.float32) for k, v in out.vectors.items()}, out.within, out.timings)


def _check(m: Measured) -> None:
    bad = ~np.isfinite(m.ppl)
    if bad.any():
        raise NonFiniteError(f"hardness: perplexity is not finite for {int(bad.sum())} quer(ies)")
    for key, v in m.vectors.items():
        if not np.isfinite(v).all():
            raise NonFiniteError(f"hardness: hidden state {'/'.join(key)} is not finite")


# --------------------------------------------------------------------------- #
# stored measurements
# --------------------------------------------------------------------------- #
def vector_name(layer: str, site: str, pool: str) -> str:
    """Column of a stored query shard holding the (layer, site, pool) vectors."""
    return f"vec/{layer}/{site}/{pool}"


def within_name(layer: str, site: str) -> str:
    """Column of a stored query shard holding the within-query dispersion at (layer, site)."""
    return f"within/{layer}/{site}"


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
        queries = _checked(queries.select(QUERY_SCHEMA.names).cast(QUERY_SCHEMA), name)
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

