r"""kNN-LM (Khandelwal et al., ICLR 2020) with any hook site as the datastore key: window
samples, datastores and evaluation passes as shards in the store, FAISS indexes, the kNN
distribution, interpolation and perplexity (paper 001 Sec. 3.3 and B.3: which sub-layer's
states make the better key).

**Windows.** A corpus split is cut into non-overlapping windows of L tokens: the scan's
segments (offsets 0, L, 2L, ... of every document, a shorter tail dropped, drawn without
replacement with a seed, kept in corpus order; :func:`dispersion.measure.sampling.sample_segments`),
published once per (split, tokenizer, L, count, seed). With ``prepend_bos`` the model reads
``[BOS] x_1..x_L``. The state at window token t, t = 1..L-1, predicts :math:`x_{t+1}`: these
L-1 positions of a window are its datastore entries, its scored tokens and its queries; the
BOS position never is one.

**Datastore.** For a candidate key (layer l, site s; :mod:`dispersion.measure.sites`, e.g.
``resid_mid`` = paper 001's :math:`h_{att}`, ``block`` = its :math:`h_{ffn}`, ``mlp_in`` = the
knn-transformers key) and every window of the training split: key :math:`k_i = f_{l,s}(x_{\le t})`
(shape [d], stored as float16 as knn-transformers stores it) and value :math:`v_i = x_{t+1}`
(int32).

**kNN distribution.** For the query :math:`q = f_{l,s}(c)` of a validation context c, the k
nearest keys :math:`\mathcal N(q)` under the squared L2 distance
:math:`d_i = \lVert q - k_i\rVert^2` (what FAISS returns), and

.. math::
    p_{kNN}(y \mid c) = \sum_{i \in \mathcal N(q)} \mathbb 1[v_i = y]\,
        \frac{\exp(-d_i / T)}{\sum_{j \in \mathcal N(q)} \exp(-d_j / T)}, \qquad
    p(y \mid c) = \lambda\, p_{kNN}(y \mid c) + (1 - \lambda)\, p_{LM}(y \mid c),

and the perplexity :math:`\exp(-\frac1n \sum_t \log p(x_{t+1} \mid c_t))` over the scored
validation tokens. Defaults of the original and of knn-transformers' ``KNNWrapper``: k = 1024
(at most the datastore size), :math:`\lambda` = 0.25, T = 1, L2 distances. The interpolation
is computed as ``logaddexp(log(1 - λ) + log p_LM, log λ + log p_kNN)`` with log 0 = -inf, so
λ = 0 gives log p_LM exactly.

**Index** (:func:`build_index`). ``IndexFlatL2`` (exact) up to ``exact_max`` keys; beyond,
an inverted file of ``nlist`` coarse centroids (default 4 sqrt(S), at most 4096 as
knn-transformers) searched over ``nprobe`` lists, holding the keys as PQ codes of
``code_size`` bytes (IVF-PQ; ``code_size: 0`` keeps them whole, IVF-Flat), trained on a seeded
sample of ``train_size`` keys. A trained IVF index is published beside the shards and reused.

**Shards** (:class:`KnnUnit`). One unit = one model@revision x one shard of windows x one
part. ``store`` publishes ``values`` (window, pos, value) and one ``keys`` file per candidate;
``eval`` publishes ``windows`` (per window: the NLL of its scored tokens, and for every Table-1
target the last-token state and the within-window dispersion), ``tokens`` (per scored token of
an evaluated window: target, log p_LM, its tune/test half) and one ``queries`` file per
candidate. Data first, the done marker (key, rows, checksums) last: a rerun skips published
shards, an interrupted build resumes, and a shard whose files changed is computed again.
Paths: :func:`dispersion.core.layout.knn_partition`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from dispersion.core import layout
from dispersion.core.config import DatasetSpec, SamplingSpec, ScanConfig, Strict
from dispersion.core.errors import DataError, ModelError, NonFiniteError
from dispersion.core.ids import checksum, digest
from dispersion.core.integrity import CHECKSUMS, check_marker, recorded
from dispersion.core.storage import Store, vector_column
from dispersion.measure.scan import ModelRevision, SegmentSet, prepare_segments
from dispersion.measure.units import is_done

Target = tuple[str, str]  # (layer name, site)
Part = Literal["store", "eval"]
FORMAT = 1  # bump when the shard contents change meaning
FLOAT16_MAX = 65504.0


# --------------------------------------------------------------------------- #
# windows
# --------------------------------------------------------------------------- #
def count_windows(spec: DatasetSpec, tokenizer, length: int, batch: int = 256) -> int:
    """How many non-overlapping ``length``-token windows the documents of ``spec`` hold."""
    from dispersion.measure.corpus import document_source

    total = 0
    texts: list[str] = []
    for doc in document_source(spec)():
        texts.append(doc.text)
        if len(texts) == batch:
            total += sum(len(ids) // length for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
            texts = []
    if texts:
        total += sum(len(ids) // length for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return total


def prepare_windows(config: ScanConfig, store: Store, tokenizer, tok_fp: str, spec: DatasetSpec, *,
                    length: int, count: int | None, shard_size: int, seed: int,
                    log: Callable[[str], None] = print) -> SegmentSet:
    """The published sample of ``count`` windows of ``length`` tokens from ``spec`` (all of
    them when ``count`` is None or more than the split holds), in shards of ``shard_size``
    windows: reused when published, else drawn and published (the scan's segments, under
    ``segments/dataset={spec.name}``)."""
    def sample(n: int, draw: bool) -> SegmentSet:
        sampling = SamplingSpec(num_segments=n, segment_length=length, shard_size=shard_size, seed=seed)
        cfg = config.model_copy(update={"datasets": [spec], "sampling": sampling})
        return prepare_segments(cfg, store, tokenizer, tok_fp, log=log, sample=draw)[spec.name]

    if count is not None:
        try:
            return sample(count, False)
        except DataError:  # not published yet (or damaged): count, then draw
            pass
    total = count_windows(spec, tokenizer, length)
    if total < 1:
        raise DataError(f"{spec.name}: no window of {length} tokens in the data")
    n = total if count is None else min(count, total)
    if count is not None and count > total:
        log(f"knnlm: {spec.name} holds {total} windows of {length} tokens, fewer than the {count} asked for: "
            f"using all of them")
    return sample(n, True)


# --------------------------------------------------------------------------- #
# what a forward pass computes
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ForwardSpec:
    """What one model's passes over windows compute (:meth:`key` hashes what changes numbers).

    Attributes:
        candidates: datastore keys and queries, ``(layer, site)``.
        table1: targets whose last-token state and within-window dispersion every ``eval``
            window records (paper 001 Table 1, Fig. 34).
        prepend_bos: feed ``[BOS] + window``.
        dtype: the model's resolved dtype.
        eval_every, eval_count: window w of the ``eval`` sample is scored by the kNN-LM when
            ``w % eval_every == 0`` and ``w // eval_every < eval_count``; its half is ``tune``
            when ``(w // eval_every)`` is even, else ``test``.
        batch_size: windows per forward pass.
        device: ``auto``, ``cpu``, ``cuda``...
    """

    candidates: tuple[Target, ...]
    table1: tuple[Target, ...]
    prepend_bos: bool
    dtype: str
    eval_every: int = 1
    eval_count: int = 0
    batch_size: int = 8
    device: str = "auto"

    def key(self, part: Part) -> str:
        payload: dict[str, Any] = {"format": FORMAT, "part": part, "bos": self.prepend_bos, "dtype": self.dtype,
                                   "candidates": [list(t) for t in self.candidates]}
        if part == "eval":
            payload.update(table1=[list(t) for t in self.table1], every=self.eval_every, count=self.eval_count)
        return digest(payload)

    def evaluated(self, w: np.ndarray) -> np.ndarray:
        """bool [W]: which windows (global indices ``w``) the kNN-LM scores."""
        return (w % self.eval_every == 0) & (w // self.eval_every < self.eval_count)

    def half(self, w: np.ndarray) -> np.ndarray:
        """str [W]: ``tune`` or ``test`` (alternating over the evaluated windows)."""
        return np.where((w // self.eval_every) % 2 == 0, "tune", "test")


def _name(prefix: str, target: Target) -> str:
    return f"{prefix}/{layout.partition(layer=target[0], site=target[1])}"


def key_table(target: Target) -> str:
    return _name("keys", target)


def query_table(target: Target) -> str:
    return _name("queries", target)


def last_column(target: Target) -> str:
    """The ``windows`` column of a Table-1 target's last-token state."""
    return f"last/{target[0]}/{target[1]}"


def within_column(target: Target) -> str:
    """The ``windows`` column of a Table-1 target's within-window dispersion."""
    return f"within/{target[0]}/{target[1]}"


@dataclass
class Passes:
    """Numpy results of :func:`forward_windows` for W windows of L tokens (P = L - 1 scored
    positions each; R = rows kept: every window's P positions, or only the kept windows')."""

    window: np.ndarray                  # int64 [R]: window of each row (0..W-1)
    pos: np.ndarray                     # int32 [R]: window token t (1..L-1) whose state it is
    target: np.ndarray                  # int32 [R]: x_{t+1}
    states: dict[Target, np.ndarray]    # float32 [R, d] per candidate
    lm_logprob: np.ndarray | None       # float32 [R]: log p_LM(x_{t+1} | x_<=t)
    nll_sum: np.ndarray | None          # float64 [W]: -sum log p_LM over the window's P positions
    last: dict[Target, np.ndarray]      # float32 [W, d]: state at window token L
    within: dict[Target, np.ndarray]    # float32 [W]: mean pairwise cosine distance of the L token states


def forward_windows(model, ids: np.ndarray, *, candidates: Sequence[Target], table1: Sequence[Target] = (),
                    bos_token_id: int | None = None, lm: bool = False, keep: np.ndarray | None = None,
                    batch_size: int = 8) -> Passes:
    """One forward pass per batch of windows ``ids`` [W, L] (int), reading the candidates'
    states at window tokens 1..L-1 (rows of the windows in ``keep``, default all), the
    last-token state and within-window dispersion of the ``table1`` targets, and with ``lm`` the
    base model's log-probability of every next token (and each window's NLL sum).

    Without ``lm`` or ``table1`` targets at ``final`` the pass stops after the deepest block read.
    """
    import torch

    from dispersion.measure.capture import Capture, targets
    from dispersion.measure.extract import LOGIT_BUDGET
    from dispersion.measure.modeling import text_config

    ids = np.asarray(ids, dtype=np.int64)
    W, L = ids.shape
    if L < 2:
        raise ModelError("knnlm: windows need at least 2 tokens")
    keep = np.ones(W, bool) if keep is None else np.asarray(keep, bool)
    cand, t1 = list(dict.fromkeys(candidates)), list(dict.fromkeys(table1))
    hooked = list(dict.fromkeys([*cand, *t1]))
    known = set(targets(sorted({t[0] for t in hooked}, key=_layer_order), sorted({t[1] for t in hooked})))
    bad = [t for t in hooked if t not in known]
    if bad:
        raise ModelError(f"knnlm: site {bad[0][1]!r} does not exist at layer {bad[0][0]!r}")
    bos = -1 if bos_token_id is None else int(bos_token_id)
    off = int(bos_token_id is not None)
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings() if lm else None
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    rows_w, rows_p, rows_y, rows_lp = [], [], [], []
    states: dict[Target, list[np.ndarray]] = {t: [] for t in cand}
    last: dict[Target, np.ndarray] = {}
    within: dict[Target, np.ndarray] = {}
    nll_sum = np.zeros(W, np.float64) if lm else None
    batch: dict[str, Any] = {}

    def reduce(t: Target, hidden) -> None:  # hidden [B, off + L, d]
        h = hidden.float()
        if t in states:
            sel = batch["keep"]
            if sel.any():
                states[t].append(h[sel, off:off + L - 1].reshape(-1, h.shape[-1]).cpu().numpy())
        if t in t1:
            lo, hi = batch["lo"], batch["hi"]
            last.setdefault(t, np.empty((W, h.shape[-1]), np.float32))[lo:hi] = h[:, off + L - 1].cpu().numpy()
            u = h[:, off:off + L]
            u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            s = u.sum(1).double()
            within.setdefault(t, np.empty(W, np.float32))[lo:hi] = \
                (1.0 - ((s ** 2).sum(-1) - L) / (L * (L - 1))).cpu().numpy()

    stop = not lm and not any(t[0] == "final" for t in hooked)
    with torch.inference_mode(), Capture(model, hooked, reduce, stop_early=stop) as cap:
        for lo in range(0, W, batch_size):
            hi = min(lo + batch_size, W)
            x = torch.as_tensor(ids[lo:hi], device=device)
            if off:
                x = torch.cat([torch.full((hi - lo, 1), bos, dtype=torch.long, device=device), x], 1)
            batch.update(lo=lo, hi=hi, keep=torch.as_tensor(keep[lo:hi], device=device))
            hidden = cap.forward(input_ids=x, attention_mask=torch.ones_like(x))
            kept = np.flatnonzero(keep[lo:hi]) + lo
            rows_w.append(np.repeat(kept, L - 1))
            rows_p.append(np.tile(np.arange(1, L, dtype=np.int32), len(kept)))
            rows_y.append(ids[kept, 1:].reshape(-1).astype(np.int32))
            if lm:
                assert hidden is not None and lm_head is not None and nll_sum is not None
                h = hidden[:, off:off + L - 1]                      # [B, L-1, d] predicts x_2..x_L
                y = x[:, off + 1:off + L]                           # [B, L-1]
                flat_h, flat_y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
                lp = torch.empty(flat_y.numel(), dtype=torch.float32, device=device)
                chunk = max(1, LOGIT_BUDGET // lm_head.weight.shape[0])
                for s in range(0, flat_y.numel(), chunk):
                    logits = lm_head(flat_h[s:s + chunk]).float()
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    lp[s:s + chunk] = logits.gather(1, flat_y[s:s + chunk, None]).squeeze(1) - \
                        torch.logsumexp(logits, -1)
                lp_w = lp.reshape(hi - lo, L - 1)
                nll_sum[lo:hi] = (-lp_w.double().sum(1)).cpu().numpy()
                rows_lp.append(lp_w[torch.as_tensor(keep[lo:hi], device=device)].reshape(-1).cpu().numpy())
    d_of = {t: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for t, v in states.items()}
    out = Passes(window=np.concatenate(rows_w), pos=np.concatenate(rows_p), target=np.concatenate(rows_y),
                 states=d_of, lm_logprob=np.concatenate(rows_lp) if lm else None, nll_sum=nll_sum,
                 last=last, within=within)
    _check_passes(out)
    return out


def _layer_order(name: str) -> tuple[int, int]:
    return (1, 0) if name == "final" else (0, int(name))


def _check_passes(p: Passes) -> None:
    for what, arrays in (("state", p.states), ("last-token state", p.last)):
        for t, v in arrays.items():
            if v.size and not np.isfinite(v).all():
                raise NonFiniteError(f"knnlm: {what} {t[0]}/{t[1]} is not finite")
            if v.size and np.abs(v).max() > FLOAT16_MAX:
                raise NonFiniteError(f"knnlm: {what} {t[0]}/{t[1]} overflows float16 storage")
    if p.lm_logprob is not None and not np.isfinite(p.lm_logprob).all():
        raise NonFiniteError("knnlm: a base-model log-probability is not finite")


# --------------------------------------------------------------------------- #
# shards
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class KnnUnit:
    """One shard of one part (``store`` or ``eval``) of one model@revision's passes."""

    mr: ModelRevision
    corpus: str
    part: Part
    windows: SegmentSet
    shard: int
    spec: ForwardSpec
    bos: int | None = None  # the BOS id fed first when ``spec.prepend_bos``

    @property
    def partition(self) -> str:
        return layout.knn_partition(self.mr.model, self.mr.revision, self.corpus, self.part, self.windows.sample,
                                    self.spec.key(self.part))

    @property
    def start(self) -> int:
        """Global index of the shard's first window."""
        return int(sum(self.windows.shard_rows[:self.shard]))

    @property
    def n_windows(self) -> int:
        return self.windows.shard_rows[self.shard]

    @property
    def key(self) -> str:
        return digest([self.mr.model, self.mr.revision, self.mr.source.location, self.mr.source.revision,
                       self.mr.fingerprint, self.corpus, self.part, self.windows.sample, self.shard, self.n_windows,
                       self.spec.key(self.part)], chars=20)

    def rel(self, table: str) -> str:
        return layout.knn_shard(self.partition, table, self.shard)

    @property
    def marker_rel(self) -> str:
        return layout.knn_marker(self.partition, self.shard)

    def tables(self) -> list[str]:
        if self.part == "store":
            return ["values", *(key_table(t) for t in self.spec.candidates)]
        return ["windows", "tokens", *(query_table(t) for t in self.spec.candidates)]

    def describe(self) -> str:
        return f"{self.mr.model}@{self.mr.revision} {self.corpus} {self.part} shard {self.shard}"

    # -- the unit protocol (dispersion.measure.units) --
    @property
    def size(self) -> int:
        return self.n_windows

    @property
    def model_key(self) -> tuple[str, str, str, str, str]:
        return ("model", self.mr.model, self.mr.revision, self.spec.dtype, self.spec.device)

    def expect(self) -> dict:
        return {"key": self.key, "windows": self.n_windows}

    def load(self):
        from dispersion.measure.modeling import load_model, resolve_device

        return load_model(self.mr.source, dtype=self.spec.dtype, device=resolve_device(self.spec.device),
                          field=self.mr.field)

    def run(self, store: Store, loaded, progress: Callable[[int], None] | None = None) -> dict:
        marker = run_unit(store, self, loaded, self.bos)
        if progress is not None:
            progress(self.n_windows)
        return marker


def plan_units(mr: ModelRevision, corpus: str, part: Part, windows: SegmentSet, spec: ForwardSpec,
               bos: int | None = None) -> list[KnnUnit]:
    return [KnnUnit(mr, corpus, part, windows, k, spec, bos) for k in range(len(windows.shard_rows))]


def unit_done(store: Store, unit: KnnUnit, log: Callable[[str], None] = print) -> bool:
    """Done: its marker names this unit's key and window count and its files check out
    (:func:`dispersion.measure.units.is_done`)."""
    return is_done(store, unit, log)


def _vectors(v: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    if dtype == pa.float16():
        return vector_column(v)
    v = np.ascontiguousarray(v, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), type=pa.float32()), v.shape[1])


def unit_tables(unit: KnnUnit, ids: np.ndarray, p: Passes) -> dict[str, pa.Table]:
    """The files of one unit from its passes (``ids`` [W, L] the shard's windows)."""
    w = p.window + unit.start
    spec = unit.spec
    if unit.part == "store":
        out = {"values": pa.table({"window": pa.array(w.astype(np.int32)), "pos": pa.array(p.pos),
                                   "value": pa.array(p.target)})}
        for t in spec.candidates:
            out[key_table(t)] = pa.table({"key": _vectors(p.states[t], pa.float16())})
        return out
    assert p.nll_sum is not None and p.lm_logprob is not None
    W, L = ids.shape
    gw = np.arange(W) + unit.start
    ev = spec.evaluated(gw)
    cols: dict[str, Any] = {
        "window": pa.array(gw.astype(np.int32)),
        "evaluated": pa.array(ev),
        "half": pa.array([h if e else None for h, e in zip(spec.half(gw), ev)], pa.string()),
        "n_scored": pa.array(np.full(W, L - 1, np.int32)),
        "nll_sum": pa.array(p.nll_sum),
        "ppl": pa.array(np.exp(p.nll_sum / (L - 1))),
    }
    for t in spec.table1:
        cols[last_column(t)] = vector_column(p.last[t])
        cols[within_column(t)] = pa.array(p.within[t])
    out = {"windows": pa.table(cols),
           "tokens": pa.table({"window": pa.array(w.astype(np.int32)), "pos": pa.array(p.pos),
                               "target": pa.array(p.target), "lm_logprob": pa.array(p.lm_logprob),
                               "half": pa.array(spec.half(w).astype(str), pa.string())})}
    for t in spec.candidates:
        out[query_table(t)] = pa.table({"query": _vectors(p.states[t], pa.float32())})
    return out


def run_unit(store: Store, unit: KnnUnit, model, bos_token_id: int | None) -> dict:
    """Compute one unit and publish its files, then its marker; returns the marker."""
    t0 = time.perf_counter()
    seg = unit.windows.read_shard(store, unit.shard)
    ids = np.asarray(seg.column("token_ids").to_pylist(), dtype=np.int64)
    spec = unit.spec
    if unit.part == "store":
        p = forward_windows(model, ids, candidates=spec.candidates, bos_token_id=bos_token_id,
                            batch_size=spec.batch_size)
    else:
        keep = spec.evaluated(np.arange(len(ids)) + unit.start)
        p = forward_windows(model, ids, candidates=spec.candidates, table1=spec.table1, bos_token_id=bos_token_id,
                            lm=True, keep=keep, batch_size=spec.batch_size)
    sums = {}
    for table, data in unit_tables(unit, ids, p).items():
        rel = unit.rel(table)
        sums[rel] = store.write_table(rel, data)
    marker = {"key": unit.key, "windows": unit.n_windows, "rows": len(p.target), "files": list(sums),
              CHECKSUMS: sums, "unit": unit.describe(), "seconds": round(time.perf_counter() - t0, 3)}
    store.write_json(unit.marker_rel, marker)
    return marker


def read_table(store: Store, units: Sequence[KnnUnit], table: str, columns: list[str] | None = None) -> pa.Table:
    """One table of every unit (published), concatenated in shard order, each file checked
    against the checksum its marker recorded."""
    parts = []
    for u in units:
        marker = store.read_json(u.marker_rel)
        if marker is None or marker.get("key") != u.key:
            raise DataError(f"knnlm: {u.describe()} is not built")
        rel = u.rel(table)
        parts.append(store.read_shard(rel, recorded([marker]).get(rel), columns=columns))
    return pa.concat_tables(parts)


def vectors_of(table: pa.Table, column: str) -> np.ndarray:
    """float32 [N, d] from a fixed-size-list column."""
    col = table.column(column).combine_chunks()
    size = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, size).astype(np.float32)


# --------------------------------------------------------------------------- #
# the index
# --------------------------------------------------------------------------- #
class IndexSpec(Strict):
    """The FAISS index of a datastore (see the module doc).

    Attributes:
        exact_max: up to this many keys, the exact ``IndexFlatL2``.
        nlist: IVF coarse centroids (None: 4 sqrt(S), at most 4096, at least 39 keys each).
        code_size: bytes per PQ code (IVF-PQ, 8 bits per sub-quantizer; the largest divisor of
            d not above it); 0: IVF-Flat.
        nprobe: inverted lists searched per query.
        train_size: keys the IVF (and PQ) quantizers are trained on, a seeded sample.
        seed: seeds the training sample.
    """

    exact_max: Annotated[int, Field(ge=1)] = 200_000
    nlist: Annotated[int, Field(ge=1)] | None = None
    code_size: Annotated[int, Field(ge=0)] = 64
    nprobe: Annotated[int, Field(ge=1)] = 32
    train_size: Annotated[int, Field(ge=1)] = 1_000_000
    seed: int = 0

    def kind(self, n: int) -> str:
        """``flat``, ``ivfpq`` or ``ivfflat`` for a store of ``n`` keys."""
        if n <= self.exact_max:
            return "flat"
        return "ivfpq" if self.code_size else "ivfflat"

    def lists(self, n: int) -> int:
        want = self.nlist or min(4096, max(1, int(4 * math.sqrt(n))))
        return max(1, min(want, n // 39))


def _faiss():
    import faiss
    import torch  # the same thread count as the forward passes

    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    return faiss


def pq_bytes(d: int, code_size: int) -> int:
    """The largest divisor of ``d`` not above ``code_size`` (PQ needs d % M == 0)."""
    return max(m for m in range(1, min(code_size, d) + 1) if d % m == 0)


def build_index(read: Callable[[int], np.ndarray], rows: Sequence[int], d: int, spec: IndexSpec) -> Any:
    """A FAISS index over the keys of ``len(rows)`` chunks (``read(k)``: float32 [rows[k], d]),
    added in chunk order so key i is datastore entry i; exact or IVF as :class:`IndexSpec` says."""
    faiss = _faiss()
    n = int(sum(rows))
    kind = spec.kind(n)
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    else:
        quantizer = faiss.IndexFlatL2(d)
        nlist = spec.lists(n)
        if kind == "ivfpq":
            index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_bytes(d, spec.code_size), 8)
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist)
        rng = np.random.default_rng(spec.seed)
        picked, have = [], 0
        for k in rng.permutation(len(rows)):  # whole chunks in a seeded order until enough keys
            picked.append(read(int(k)))
            have += len(picked[-1])
            if have >= spec.train_size:
                break
        sample = np.concatenate(picked)
        if len(sample) > spec.train_size:
            sample = sample[np.sort(rng.choice(len(sample), spec.train_size, replace=False))]
        index.train(np.ascontiguousarray(sample, np.float32))
        index.nprobe = spec.nprobe
    for k in range(len(rows)):
        index.add(np.ascontiguousarray(read(k), np.float32))
    return index


def serialize_index(index) -> bytes:
    return _faiss().serialize_index(index).tobytes()


def deserialize_index(data: bytes, nprobe: int | None = None):
    index = _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return index


def search(index, queries: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(k, ntotal)`` nearest keys of every query: squared L2 distances float32 [Q, k]
    (ascending) and entry ids int64 [Q, k] (-1 where an IVF search found fewer)."""
    k = min(k, index.ntotal)
    q = np.ascontiguousarray(queries, np.float32)
    D = np.empty((len(q), k), np.float32)
    Ix = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), batch):
        D[s:s + batch], Ix[s:s + batch] = index.search(q[s:s + batch], k)
    return D, Ix


# --------------------------------------------------------------------------- #
# the kNN distribution and interpolation
# --------------------------------------------------------------------------- #
def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(m), safe + np.log(np.exp(x - safe[:, None]).sum(axis=1)), -np.inf)


def _neighbour_logits(dist: np.ndarray, idx: np.ndarray, temperature: float) -> np.ndarray:
    return np.where(idx >= 0, -dist.astype(np.float64) / temperature, -np.inf)


def knn_logprob(dist: np.ndarray, idx: np.ndarray, values: np.ndarray, targets: np.ndarray,
                temperature: float = 1.0) -> np.ndarray:
    """log p_kNN(target | c) float64 [Q] from the neighbours of each query (``dist``, ``idx``
    [Q, k] from :func:`search`, ``values`` [S] the datastore's next tokens): -inf where no
    neighbour holds the target."""
    return knn_logprobs(dist, idx, values, targets, [temperature])[temperature]


def knn_logprobs(dist: np.ndarray, idx: np.ndarray, values: np.ndarray, targets: np.ndarray,
                 temperatures: Sequence[float]) -> dict[float, np.ndarray]:
    """:func:`knn_logprob` at several temperatures, the neighbours' values matched once:
    log p_kNN = log sum_{i: v_i = y} exp(-(d_i - d_min)/T) - log sum_i exp(-(d_i - d_min)/T)."""
    valid = idx >= 0
    vals = np.where(valid, values[np.clip(idx, 0, None)], -1)
    hit = (vals == np.asarray(targets)[:, None]) & valid
    d = dist.astype(np.float64)
    dmin = np.where(valid, d, np.inf).min(axis=1, keepdims=True)
    gap = np.where(valid, d - np.where(np.isfinite(dmin), dmin, 0.0), np.inf)  # >= 0; inf: no neighbour
    out = {}
    with np.errstate(divide="ignore"):
        for T in temperatures:
            e = np.exp(-gap / T)
            with np.errstate(invalid="ignore"):
                lp = np.log((e * hit).sum(axis=1)) - np.log(e.sum(axis=1))
            out[T] = np.where(valid.any(axis=1), lp, -np.inf)
    return out


def knn_distribution(dist: np.ndarray, idx: np.ndarray, values: np.ndarray, vocab: int,
                     temperature: float = 1.0) -> np.ndarray:
    """p_kNN(. | c) float64 [Q, vocab]: the softmax of -d/T over each query's neighbours,
    summed per next token."""
    logits = _neighbour_logits(dist, idx, temperature)
    w = np.exp(logits - _logsumexp_rows(logits)[:, None])
    out = np.zeros((len(dist), vocab), np.float64)
    rows = np.repeat(np.arange(len(dist)), dist.shape[1])
    valid = (idx >= 0).reshape(-1)
    np.add.at(out, (rows[valid], values[idx.reshape(-1)[valid]]), w.reshape(-1)[valid])
    return out


def interpolate(lm_logprob: np.ndarray, knn_lp: np.ndarray, lam: float) -> np.ndarray:
    """log(λ p_kNN + (1 - λ) p_LM) float64, elementwise (λ = 0: log p_LM exactly)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + np.asarray(lm_logprob, np.float64),
                            np.log(lam) + np.asarray(knn_lp, np.float64))


def perplexity(logprob: np.ndarray) -> float:
    """exp of the mean negative log-probability."""
    return float(np.exp(-np.mean(np.asarray(logprob, np.float64))))


@dataclass
class Scores:
    """One candidate key's kNN-LM on the tune and test halves of the evaluated tokens."""

    n_store: int
    k: int
    index: str
    n_tune: int
    n_test: int
    base_ppl: float               # test half, the base model
    knn_ppl: float                # test half, λ and T as given
    tuned_lambda: float           # chosen on the tune half
    tuned_temperature: float
    tuned_ppl: float              # test half at the tuned (λ, T)
    tune_base_ppl: float
    tune_best_ppl: float
    nn_distance: float            # median squared L2 distance to the nearest key (tune half)
    seconds: float


def score(index, values: np.ndarray, queries: np.ndarray, targets: np.ndarray, lm_logprob: np.ndarray,
          tune: np.ndarray, *, k: int, lam: float, temperature: float, lambdas: Sequence[float],
          temperature_scales: Sequence[float], index_kind: str = "flat") -> Scores:
    """Search the neighbours of every query once, then: perplexity of the base model and of the
    kNN-LM at (``lam``, ``temperature``) on the test half (``~tune``); (λ, T) tuned on the tune
    half over ``lambdas`` x T in {``temperature``} and ``c x`` the median nearest-neighbour
    distance for c in ``temperature_scales``, and its test perplexity."""
    t0 = time.perf_counter()
    tune = np.asarray(tune, bool)
    if not tune.any() or tune.all():
        raise DataError("knnlm: the evaluated tokens need both a tune and a test half (eval_windows >= 2)")
    dist, idx = search(index, queries, k)
    scale = float(np.median(dist[tune, 0])) if dist.shape[1] else 1.0
    temps = list(dict.fromkeys([temperature, *(c * scale for c in temperature_scales if c * scale > 0)]))
    best = (math.inf, lam, temperature)
    lp_by_t = knn_logprobs(dist, idx, values, targets, temps)
    for T, lp in lp_by_t.items():
        for lmb in lambdas:
            ppl = perplexity(interpolate(lm_logprob[tune], lp[tune], lmb))
            if ppl < best[0]:
                best = (ppl, lmb, T)
    test = ~tune
    fixed = perplexity(interpolate(lm_logprob[test], lp_by_t[temperature][test], lam))
    tuned = perplexity(interpolate(lm_logprob[test], lp_by_t[best[2]][test], best[1]))
    return Scores(n_store=int(index.ntotal), k=int(dist.shape[1]), index=index_kind, n_tune=int(tune.sum()),
                  n_test=int(test.sum()), base_ppl=perplexity(lm_logprob[test]), knn_ppl=fixed,
                  tuned_lambda=float(best[1]), tuned_temperature=float(best[2]), tuned_ppl=tuned,
                  tune_base_ppl=perplexity(lm_logprob[tune]), tune_best_ppl=float(best[0]), nn_distance=scale,
                  seconds=time.perf_counter() - t0)


def candidate_index(store: Store, units: Sequence[KnnUnit], target: Target, spec: IndexSpec,
                    log: Callable[[str], None] = print) -> tuple[Any, str]:
    """The index over one candidate's keys in the ``store`` units: exact ones are built in
    memory; a trained IVF index is read from the store when its marker names the same keys and
    settings, else built and published. Returns ``(index, kind)``."""
    rows = [int(store.read_json(u.marker_rel)["rows"]) for u in units]  # type: ignore[index]
    n = sum(rows)
    table = key_table(target)

    def read(k: int) -> np.ndarray:
        return vectors_of(read_table(store, [units[k]], table), "key")

    d = read(0).shape[1]
    kind = spec.kind(n)
    if kind == "flat":
        return build_index(read, rows, d, spec), kind
    part = units[0].partition
    rel, mrel = layout.knn_index(part, *target), layout.knn_index_marker(part, *target)
    key = digest([[u.key for u in units], spec.model_dump(exclude={"exact_max"})], chars=20)
    marker = store.read_json(mrel)
    if marker and marker.get("key") == key and not check_marker(store, mrel, marker, first_only=True):
        return deserialize_index(_read_bytes(store, rel), spec.nprobe), kind
    t0 = time.perf_counter()
    index = build_index(read, rows, d, spec)
    data = serialize_index(index)
    store.write_bytes(rel, data)
    store.write_json(mrel, {"key": key, "files": [rel], CHECKSUMS: {rel: checksum(data)}, "keys": n, "kind": kind})
    log(f"knnlm: trained a {kind} index over {n} keys of {target[0]}/{target[1]} in {time.perf_counter() - t0:.1f}s")
    return index, kind


def _read_bytes(store: Store, rel: str) -> bytes:
    with store.fs.open(store.path(rel), "rb") as fh:
        return fh.read()
