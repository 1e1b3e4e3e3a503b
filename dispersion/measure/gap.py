r"""Dispersion gap for model selection, read off the output embedding matrix (paper 001 §3.2,
B.2.1, B.2.2). No forward pass and no data: only the rows of the output projection (lm_head,
or the input embedding when the two are tied) of a few token sets.

With T a set of domain tokens (digits for math, Python keywords for code) and T̄ a
reference set of everyday words, and δ the cosine or Euclidean distance between rows of E:

.. math::
    \text{within}(T) = \binom{|T|}{2}^{-1}\sum_{i<j\in T}\delta(E_i,E_j),\quad
    \text{between}(T,\bar T) = \frac{1}{|T||\bar T|}\sum_{i\in T,\,j\in\bar T}\delta(E_i,E_j),

.. math::  \mathcal G = \text{within}(T) + \text{between}(T,\bar T)

and, as in Tables 9-12, within(T̄) too (D–D / NM–NM / D–NM; C–C / NC–NC / C–NC), each with
its standard error: the sample standard deviation of the pairwise distances over
sqrt(number of pairs). Larger G: the model separates the domain tokens from each other and
from everyday words; ranking a family of checkpoints by G tracks task accuracy (Spearman
> 0.9 in §3.2 and B.2.2).

Token sets (:func:`map_token_set`): each word is tried bare (``"5"``) and with a leading
space (``" 5"``) (``variants``); a form is kept when the tokenizer encodes it, without
special tokens, to exactly one token that decodes back to the word. A leading token that
decodes to whitespace only (SentencePiece's bare ``▁``) is dropped first, so ``" 5"`` ->
``[▁, 5]`` counts as ``5``. Forms of several tokens are dropped; the ids are de-duplicated.
Built-in sets: ``digits`` (0-9, the paper's "digits"), ``python`` (``keyword.kwlist``, the
paper's "Python keywords"), ``everyday`` (the reference: common English words that are
neither numbers, math words, Python keywords nor builtins); a config may give any word list.
"""

from __future__ import annotations

import keyword
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from dispersion.core.config import Strict
from dispersion.core.errors import DataError
from dispersion.core.ids import step_of
from dispersion.measure.metrics import GapResult, dispersion_gap
from dispersion.measure.modeling import ModelSource, load_tokenizer, read_output_embeddings, resolve_source

__all__ = [
    "BUILTIN_SETS",
    "DIGITS",
    "EVERYDAY",
    "GAP_SCHEMA",
    "PYTHON_KEYWORDS",
    "GapSpec",
    "GapStats",
    "TokenSet",
    "TokenSetSpec",
    "gap_of_source",
    "gap_rows",
    "gap_stats",
    "map_token_set",
    "measure_gap",
    "measure_table",
]

log = logging.getLogger(__name__)

Metric = Literal["cosine", "euclidean"]
Variants = Literal["both", "bare", "space"]

# --------------------------------------------------------------------------- token sets
DIGITS: tuple[str, ...] = tuple("0123456789")
PYTHON_KEYWORDS: tuple[str, ...] = tuple(keyword.kwlist)
# Common everyday English words: no numbers or math words, no Python keywords or builtins.
EVERYDAY: tuple[str, ...] = tuple("""
family mother father sister brother friend child baby husband wife uncle aunt cousin
grandmother grandfather neighbor people man woman boy girl king queen teacher doctor nurse
farmer driver cook police student house home room kitchen garden door window table chair bed
floor wall roof stairs street road city town village country school church shop market office
hospital bank park farm beach island bridge station airport hotel restaurant library museum
bread butter cheese milk coffee tea water juice apple orange banana lemon grape cherry sugar
salt pepper rice soup meat chicken fish egg cake cookie chocolate honey dinner lunch breakfast
supper potato tomato onion carrot dog cat horse cow bird sheep pig mouse rabbit duck chicken
lion tiger bear monkey elephant frog snake bee butterfly tree flower grass leaf river lake sea
ocean mountain hill forest desert sky sun moon cloud rain snow wind storm weather summer winter
autumn morning evening night today tomorrow yesterday weekend holiday birthday wedding party
music song movie book story picture poem newspaper magazine phone radio television camera car
bus bicycle boat ship airplane truck ticket money job shirt shoes dress coat hat jacket sweater
socks gloves scarf bag umbrella glass cup plate spoon fork knife bowl bottle basket blanket pillow
towel soap toothbrush mirror lamp candle clock garden game ball toy doll gift heart hand head
face eye ear nose mouth hair foot leg arm finger shoulder knee tooth smile laugh kiss hug dream
walk run eat drink sleep sing dance swim play talk cry love like want buy sell wash wear visit
travel wait think know feel see hear watch listen remember forget bring carry drive ride sit
stand wake meet laugh shout jump climb smell taste touch paint draw cook bake clean shop marry
happy sad angry afraid brave proud lonely big small little old young good bad beautiful pretty
ugly hot cold warm cool wet dry dirty rich poor tall short quiet loud kind nice friendly gentle
hungry thirsty tired busy late early sweet sour bitter soft hard fast slow heavy light green
blue red yellow brown black white pink purple dark bright fresh delicious funny lucky polite
""".split())
EVERYDAY = tuple(dict.fromkeys(EVERYDAY))  # drop repeats, keep order

BUILTIN_SETS: dict[str, tuple[str, ...]] = {
    "digits": DIGITS,
    "python": PYTHON_KEYWORDS,
    "everyday": EVERYDAY,
}


class TokenSetSpec(Strict):
    """An explicit token set in a config: a name and its words."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    words: list[str]

    @field_validator("words")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or not any(w.strip() for w in v):
            raise ValueError("must not be empty")
        return v


SetRef = str | TokenSetSpec


class GapSpec(Strict):
    """What to measure: domain sets against one reference set, with which metrics (§3.2)."""

    domains: list[SetRef] = ["digits", "python"]
    reference: SetRef = "everyday"
    metrics: list[Metric] = ["cosine", "euclidean"]
    variants: Variants = "both"

    @field_validator("domains", "metrics")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("domains", "reference")
    @classmethod
    def _known(cls, v):
        for ref in v if isinstance(v, list) else [v]:
            if isinstance(ref, str) and ref not in BUILTIN_SETS:
                raise ValueError(f"unknown token set {ref!r} (built-in: {', '.join(BUILTIN_SETS)})")
        return v


def set_words(ref: SetRef | tuple[str, Sequence[str]]) -> tuple[str, tuple[str, ...]]:
    """``(name, words)`` of a built-in set name, a :class:`TokenSetSpec` or a ``(name, words)`` pair."""
    if isinstance(ref, TokenSetSpec):
        return ref.name, tuple(ref.words)
    if isinstance(ref, str):
        if ref not in BUILTIN_SETS:
            raise DataError(f"token set {ref!r}: unknown (built-in: {', '.join(BUILTIN_SETS)})")
        return ref, BUILTIN_SETS[ref]
    name, words = ref
    return str(name), tuple(words)


@dataclass(frozen=True)
class TokenSet:
    """A word list mapped to token ids of one tokenizer (see the module doc for the rule).

    ``ids`` are unique, in word order; ``tokens`` their decoded strings; ``kept`` the words
    that gave at least one id, ``dropped`` the others.
    """

    name: str
    words: tuple[str, ...]
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    kept: tuple[str, ...]
    dropped: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.name}: {len(self.kept)} of {len(self.words)} words -> {len(self.ids)} token ids"


def _single_id(tokenizer: Any, text: str, word: str) -> int | None:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) > 1 and tokenizer.decode([ids[0]]).strip() == "":
        ids = ids[1:]  # SentencePiece: a bare "▁" before the word
    if len(ids) != 1:
        return None
    tid = int(ids[0])
    if getattr(tokenizer, "unk_token_id", None) is not None and tid == tokenizer.unk_token_id:
        return None
    if tokenizer.decode([tid]).strip() != word:
        return None
    return tid


def map_token_set(tokenizer: Any, words: Iterable[str], name: str, *, variants: Variants = "both") -> TokenSet:
    """Map words to single-token ids: ``bare`` (``"word"``), ``space`` (``" word"``) or ``both``.

    Raises:
        DataError: naming the set, when fewer than 2 ids remain (a within-set distance
            needs a pair).
    """
    if variants not in ("both", "bare", "space"):
        raise DataError(f"token set {name!r}: variants must be both, bare or space, got {variants!r}")
    words = tuple(dict.fromkeys(w.strip() for w in words if w.strip()))
    forms = {"bare": ("",), "space": (" ",), "both": ("", " ")}[variants]
    seen: dict[int, None] = {}
    kept: list[str] = []
    dropped: list[str] = []
    for w in words:
        got = [tid for p in forms if (tid := _single_id(tokenizer, p + w, w)) is not None]
        (kept if got else dropped).append(w)
        for tid in got:
            seen.setdefault(tid, None)
    ids = tuple(seen)
    if len(ids) < 2:
        raise DataError(f"token set {name!r}: {len(ids)} of its {len(words)} words map to a single token "
                        f"of this tokenizer (need at least 2 ids)")
    tokens = tuple(tokenizer.decode([i]) for i in ids)
    return TokenSet(name, words, ids, tokens, tuple(kept), tuple(dropped))


# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class GapStats:
    """:class:`dispersion.measure.metrics.GapResult` plus the standard errors of its three means."""

    result: GapResult
    within_se: float
    reference_within_se: float
    between_se: float


def _rows(E: Any, ids: np.ndarray) -> np.ndarray:
    """E[ids] as float64 numpy (torch tensors indexed on their device first, bf16 included)."""
    if hasattr(E, "detach"):
        import torch

        sub = E.detach()[torch.as_tensor(ids, dtype=torch.long, device=E.device)]
        return sub.double().cpu().numpy()
    return np.asarray(E)[ids].astype(np.float64)


def _pair_se(A: np.ndarray, B: np.ndarray | None, metric: str, mean: float, chunk: int = 2048) -> float:
    """Standard error of the mean pairwise distance: sd(d_ij) / sqrt(#pairs), two-pass.

    ``B is None``: the pairs i < j of A; otherwise all pairs (i in A, j in B).
    """
    if metric == "cosine":
        A = A / np.linalg.norm(A, axis=1, keepdims=True)
        B = None if B is None else B / np.linalg.norm(B, axis=1, keepdims=True)
    else:
        mu = A.mean(axis=0) if B is None else np.vstack([A, B]).mean(axis=0)
        A = A - mu
        B = None if B is None else B - mu
    within = B is None
    C = A if B is None else B
    sqa, sqc = np.einsum("ij,ij->i", A, A), np.einsum("ij,ij->i", C, C)
    ss, m = 0.0, 0
    for a in range(0, A.shape[0], chunk):
        for c in range(a if within else 0, C.shape[0], chunk):
            G = A[a:a + chunk] @ np.ascontiguousarray(C[c:c + chunk].T)
            if metric == "cosine":
                D = 1.0 - G
            else:
                D = np.sqrt(np.maximum(sqa[a:a + chunk, None] + sqc[None, c:c + chunk] - 2.0 * G, 0.0))
            if within and c == a:
                D = D[np.triu_indices(D.shape[0], k=1, m=D.shape[1])]
            ss += float(((D - mean) ** 2).sum())
            m += D.size
    return math.sqrt(ss / (m - 1) / m) if m > 1 else float("nan")


def gap_stats(E: Any, domain_ids: Sequence[int], reference_ids: Sequence[int], metric: Metric = "cosine") -> GapStats:
    """Within(T), within(T̄), between(T, T̄), G (via :func:`dispersion.measure.metrics.dispersion_gap`)
    and the standard errors of the three means (Tables 9-12 report mean ± SE)."""
    t = np.asarray(domain_ids, dtype=np.int64)
    r = np.asarray(reference_ids, dtype=np.int64)
    shape = tuple(E.shape)
    if len(shape) != 2:
        raise ValueError(f"E must be 2-D (vocab, d), got shape {shape}")
    union = np.unique(np.concatenate([t, r]))
    if union.size and (union[0] < 0 or union[-1] >= shape[0]):
        bad = union[0] if union[0] < 0 else union[-1]
        raise ValueError(f"token id {int(bad)} is out of range (valid range 0..{shape[0] - 1})")
    sub = _rows(E, union)  # only the rows of the two sets, float64
    local = {int(v): i for i, v in enumerate(union)}
    lt = np.array([local[int(v)] for v in t], dtype=np.int64)
    lr = np.array([local[int(v)] for v in r], dtype=np.int64)
    res = dispersion_gap(sub, lt, lr, metric=metric)
    A, B = sub[lt], sub[lr]
    return GapStats(res,
                    within_se=_pair_se(A, None, metric, res.within_domain),
                    reference_within_se=_pair_se(B, None, metric, res.within_reference),
                    between_se=_pair_se(A, B, metric, res.between))


GAP_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("step", pa.int64()),
    ("domain", pa.string()), ("reference", pa.string()), ("metric", pa.string()),
    ("n_domain", pa.int64()), ("n_reference", pa.int64()),
    ("within", pa.float64()), ("reference_within", pa.float64()), ("between", pa.float64()),
    ("gap", pa.float64()),
    ("within_se", pa.float64()), ("reference_within_se", pa.float64()), ("between_se", pa.float64()),
    ("tied", pa.bool_()),
])


def gap_rows(E: Any, domains: Sequence[TokenSet], reference: TokenSet, metrics: Sequence[Metric], *,
             model: str, revision: str, tied: bool) -> list[dict]:
    """One :data:`GAP_SCHEMA` row per (domain set, metric) for one matrix."""
    rows = []
    for dom in domains:
        for metric in metrics:
            s = gap_stats(E, dom.ids, reference.ids, metric)
            rows.append({"model": model, "revision": revision, "step": step_of(revision),
                         "domain": dom.name, "reference": reference.name, "metric": metric,
                         "n_domain": s.result.n_domain, "n_reference": s.result.n_reference,
                         "within": s.result.within_domain, "reference_within": s.result.within_reference,
                         "between": s.result.between, "gap": s.result.gap,
                         "within_se": s.within_se, "reference_within_se": s.reference_within_se,
                         "between_se": s.between_se, "tied": tied})
    return rows


def gap_of_source(model: str, revision: str, source: ModelSource, spec: GapSpec | None = None, *,
                  field: str = "id", log_fn: Callable[[str], None] | None = None) -> list[dict]:
    """Gap rows of one resolved model@revision: the tokenizer maps the token sets (their sizes
    are logged), the output embedding is read from the safetensors files (no forward pass),
    and :func:`gap_rows` gives one row per (domain set, metric)."""
    spec = spec or GapSpec()
    say = log_fn or log.info
    tok = load_tokenizer(source, field)
    ref_name, ref_words = set_words(spec.reference)
    reference = map_token_set(tok, ref_words, ref_name, variants=spec.variants)
    domains = [map_token_set(tok, w, n, variants=spec.variants) for n, w in map(set_words, spec.domains)]
    emb = read_output_embeddings(source)
    say(f"gap: {model}@{revision}: {emb.via} {emb.tensor or 'get_output_embeddings()'} "
        f"{tuple(emb.weight.shape)} tied={emb.tied}; " + "; ".join(s.describe() for s in [*domains, reference]))
    return gap_rows(emb.weight, domains, reference, spec.metrics, model=model, revision=revision, tied=emb.tied)


def measure_gap(model: str, model_id: str, revisions: Sequence[str] = ("main",), spec: GapSpec | None = None, *,
                trust_remote_code: bool = False, field: str = "id",
                log_fn: Callable[[str], None] | None = None) -> pa.Table:
    """The gap table of one model over its revisions (local folder or hub id, see modeling)."""
    rows: list[dict] = []
    for rev in revisions:
        source = resolve_source(model_id, rev, field=field, trust_remote_code=trust_remote_code)
        rows += gap_of_source(model, rev, source, spec, field=field, log_fn=log_fn)
    return pa.Table.from_pylist(rows, schema=GAP_SCHEMA)


def measure_table(source: ModelSource, inputs: tuple) -> pa.Table:
    """The :data:`GAP_SCHEMA` rows of one model@revision: the measurement of a
    :class:`dispersion.measure.units.TableUnit` of the ``gap`` step (no model is loaded: one
    tensor is read from its files), ``inputs`` = ``(model, revision, spec, field)``."""
    model, revision, spec, field = inputs
    return pa.Table.from_pylist(gap_of_source(model, revision, source, spec, field=field), schema=GAP_SCHEMA)
