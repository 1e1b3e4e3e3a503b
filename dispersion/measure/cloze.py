"""The embedded multiple-choice cloze (paper 001 Sec. 3.1 without a hub): from the held-out
split of the embedded corpus, a context of T tokens and its true continuation of K tokens among
C - 1 distractors; every model answers it itself
(:func:`dispersion.measure.answering.answer_cloze`), so correct/incorrect labels exist for every
model, zoo and real.

Two kinds of distractors:

* ``other_documents``: continuations of other documents of the same domain (easy: a topic
  change gives them away; real models answer most queries right);
* ``same_document``: the K-token spans of the query's own document nearest to the true
  continuation, outside the context (after it at T + K, T + 2K, ..., before it at -K, -2K, ...,
  alternating, nearest first): same topic, same vocabulary, same style, so only the local
  continuation tells them apart (:func:`nearby_starts`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from dispersion.core.errors import ConfigError, DataError
from dispersion.measure.corpus import Document
from dispersion.measure.query_sources import QUERY_SCHEMA


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


Distractors = Literal["other_documents", "same_document"]


def nearby_starts(context_start: int, context: int, continuation: int, length: int, count: int) -> list[int]:
    """The starts of the ``count`` K-token spans of a document of ``length`` units nearest to
    the true continuation (which starts at ``context_start + context``), none overlapping the
    context or the true continuation: after it at +K, +2K, ..., before the context at -K,
    -2K, ..., alternating (after first); fewer when the document has no more room."""
    true = context_start + context
    out: list[int] = []
    j = 1
    while len(out) < count:
        after, before = true + j * continuation, context_start - j * continuation
        if after + continuation > length and before < 0:
            break
        for start in (after, before):
            if 0 <= start and start + continuation <= length and len(out) < count:
                out.append(start)
        j += 1
    return out


@dataclass(frozen=True)
class Draw:
    """Which windows and options a cloze uses, over any units (token ids, words).

    Attributes:
        doc: (N,) index of each query's document.
        offset: (N,) start of each query's window (its context) in its document, in units.
        options: N lists of C spans (tuples of K units); ``options[i][answer[i]]`` is the
            true continuation.
        answer: (N,) int64 position of the true continuation.
    """

    doc: list[int]
    offset: list[int]
    options: list[list[tuple]]
    answer: np.ndarray


def draw_cloze(units: Sequence[Sequence], doc_ids: Sequence[str], *, name: str, context: int, continuation: int,
               choices: int, n: int, seed: int, distractors: Distractors) -> Draw:
    """The windows and options of a cloze over documents cut into ``units`` (one sequence per
    document):

    1. N windows of T + K units are sampled without overlap, as
       :func:`dispersion.measure.sampling.sample_segments` samples segments (documents cut at
       offsets 0, T + K, ...; N windows drawn without replacement, seeded): the first T units
       are the context, the last K the true continuation; with ``same_document`` distractors
       only windows whose document holds C - 1 spans around them are drawn;
    2. each query gets C - 1 distractors, each different from the true continuation and from
       each other: ``other_documents`` -- the continuations of other queries drawn at random
       (seeded) from other documents; ``same_document`` -- the nearest spans of its own
       document (:func:`nearby_starts`; a span equal to one already picked is skipped for the
       next nearest);
    3. the true continuation takes a random position among the C options.

    Raises:
        ConfigError: a size below 1 (or fewer than 2 choices).
        DataError: too few windows of T + K units, or too few distinct distractors.
    """
    if context < 1 or continuation < 1 or choices < 2 or n < 1:
        raise ConfigError(f"{name}: needs context >= 1, continuation >= 1, choices >= 2, n >= 1")
    L = context + continuation
    near = distractors == "same_document"
    # [W] every window (document, offset); with same-document distractors only those with room around them
    windows = [(d, o) for d, t in enumerate(units) for o in range(0, len(t) // L * L, L)
               if not near or len(nearby_starts(o, context, continuation, len(t), choices - 1)) == choices - 1]
    if n > len(windows):
        raise DataError(f"{name}: asked for {n} cloze queries of {context} + {continuation} units but the "
                        f"documents hold only {len(windows)} windows{' with room for the distractors' if near else ''}"
                        " (lower n)")
    chosen = np.sort(np.random.default_rng(seed).choice(len(windows), size=n, replace=False))
    doc = [windows[c][0] for c in chosen]
    offset = [windows[c][1] for c in chosen]
    true = [tuple(units[d][o + context:o + L]) for d, o in zip(doc, offset)]  # N spans of K units
    rng = np.random.default_rng([seed, 0xC102E])
    answer = rng.integers(0, choices, size=n)
    options = []
    for i in range(n):
        picked: list[tuple] = [true[i]]
        if near:
            text = units[doc[i]]
            pool: Iterable[tuple] = (tuple(text[s:s + continuation])
                                     for s in nearby_starts(offset[i], context, continuation, len(text), len(text)))
        else:
            pool = (true[j] for j in rng.permutation(n) if doc_ids[doc[j]] != doc_ids[doc[i]])
        for cand in pool:
            if cand in picked:
                continue
            picked.append(cand)
            if len(picked) == choices:
                break
        if len(picked) < choices:
            where = "its own document" if near else "other documents"
            raise DataError(f"{name}: query {i} finds only {len(picked) - 1} distinct continuations in {where} "
                            f"for {choices - 1} distractors (raise n or lower choices)")
        others = iter(picked[1:])
        options.append([true[i] if c == answer[i] else next(others) for c in range(choices)])
    return Draw(doc, offset, options, answer.astype(np.int64))


def build_cloze(documents: Sequence[Document], tokenizer, *, name: str, context: int = 64,
                continuation: int = 8, choices: int = 4, n: int = 1000, seed: int = 0,
                distractors: Distractors = "other_documents") -> Cloze:
    """The embedded multiple-choice cloze over ``documents`` (one domain's held-out split), in
    the tokens of ``tokenizer`` (each document tokenized once): :func:`draw_cloze` over token
    ids. ``query_id`` is ``{name}/{doc_id}@{offset}`` (offset in tokens); ``task`` is ``name``."""
    encoded = encode_texts(tokenizer, [d.text for d in documents])
    draw = draw_cloze(encoded, [d.doc_id for d in documents], name=name, context=context, continuation=continuation,
                      choices=choices, n=n, seed=seed, distractors=distractors)
    ctx = np.asarray([encoded[d][o:o + context] for d, o in zip(draw.doc, draw.offset)], dtype=np.int64)  # [N, T]
    options = np.asarray(draw.options, dtype=np.int64).reshape(n, choices, continuation)  # [N, C, K]
    texts = tokenizer.batch_decode(ctx.tolist())
    ids = [f"{name}/{documents[d].doc_id}@{o}" for d, o in zip(draw.doc, draw.offset)]
    queries = pa.table({"query_id": ids, "text": texts, "correct": pa.nulls(n, pa.bool_()), "task": [name] * n,
                        "slice": pa.nulls(n, pa.string())}, schema=QUERY_SCHEMA)
    return Cloze(queries, ctx, options, draw.answer)


WORD = re.compile(r"\s*\S+")
"""A word with the whitespace before it: a document's words joined give the document back
(its trailing whitespace aside)."""


def text_cloze(documents: Sequence[Document], *, name: str, context: int = 16, continuation: int = 4,
               choices: int = 10, n: int = 1000, seed: int = 0,
               distractors: Distractors = "same_document") -> list[dict]:
    """The cloze in words instead of tokens, for any model and for lm-evaluation-harness
    (:mod:`dispersion.measure.lm_eval_tasks`): :func:`draw_cloze` over each document's :data:`WORD`
    units. One record per query: ``query_id`` (``{name}/{doc_id}@{offset}``, offset in words),
    ``context`` (T words, no trailing whitespace), ``choices`` (C spans of K words, each with
    its leading whitespace, so ``context + choice`` is the document's text), ``answer``."""
    words = [WORD.findall(d.text) for d in documents]
    draw = draw_cloze(words, [d.doc_id for d in documents], name=name, context=context, continuation=continuation,
                      choices=choices, n=n, seed=seed, distractors=distractors)
    return [{"query_id": f"{name}/{documents[d].doc_id}@{o}", "context": "".join(words[d][o:o + context]),
             "choices": ["".join(span) for span in opts], "answer": int(a)}
            for d, o, opts, a in zip(draw.doc, draw.offset, draw.options, draw.answer)]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast path, no length warnings
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
