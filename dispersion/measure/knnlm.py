r"""kNN-LM (Khandelwal et al., ICLR 2020) with any hook site as the datastore key: window
samples, datastores and evaluation passes as shards in the store, FAISS indexes, the kNN
distribution, interpolation and perplexity (paper 001 Sec. 3.3 and B.3: which sub-layer's
states make the better key). This module holds the windows, the forward pass and the shards;
the index and the scoring are :mod:`dispersion.measure.knn_index`.

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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from dispersion.core import layout
from dispersion.core.config import DatasetSpec, SamplingSpec, ScanConfig
from dispersion.core.errors import DataError, ModelError, NonFiniteError
from dispersion.core.ids import digest
from dispersion.core.integrity import CHECKSUMS, recorded
from dispersion.core.storage import Store, vector_column
from dispersion.measure.scan import SegmentSet, prepare_segments
from dispersion.measure.sources import ModelRevision

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
    from dispersion.measure.head import Head
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
    head = Head(model.get_output_embeddings(), softcap=getattr(text_config(model.config), "final_logit_softcapping",
                                                                None)) if lm else None
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
                # [kept windows, L-1, d] -> [kept windows * (L-1), d]: one row per scored position
                states[t].append(h[sel, off:off + L - 1].reshape(-1, h.shape[-1]).cpu().numpy())
        if t in t1:
            lo, hi = batch["lo"], batch["hi"]
            last.setdefault(t, np.empty((W, h.shape[-1]), np.float32))[lo:hi] = h[:, off + L - 1].cpu().numpy()
            u = h[:, off:off + L]                                   # [B, L, d] the window's tokens
            u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            s = u.sum(1).double()                                   # [B, d] sum of unit states
            within.setdefault(t, np.empty(W, np.float32))[lo:hi] = \
                (1.0 - ((s ** 2).sum(-1) - L) / (L * (L - 1))).cpu().numpy()

    stop = not lm and not any(t[0] == "final" for t in hooked)
    with torch.inference_mode(), Capture(model, hooked, reduce, stop_early=stop) as cap:
        for lo in range(0, W, batch_size):
            hi = min(lo + batch_size, W)
            x = torch.as_tensor(ids[lo:hi], device=device)         # [B, L]
            if off:                                                 # [B, 1 + L]: BOS first
                x = torch.cat([torch.full((hi - lo, 1), bos, dtype=torch.long, device=device), x], 1)
            batch.update(lo=lo, hi=hi, keep=torch.as_tensor(keep[lo:hi], device=device))
            hidden = cap.forward(input_ids=x, attention_mask=torch.ones_like(x))
            kept = np.flatnonzero(keep[lo:hi]) + lo
            rows_w.append(np.repeat(kept, L - 1))                              # [kept * (L-1)]
            rows_p.append(np.tile(np.arange(1, L, dtype=np.int32), len(kept)))  # [kept * (L-1)]: t = 1..L-1
            rows_y.append(ids[kept, 1:].reshape(-1).astype(np.int32))          # [kept, L-1] -> [kept * (L-1)]
            if lm:
                assert hidden is not None and head is not None and nll_sum is not None
                h = hidden[:, off:off + L - 1]                      # [B, L-1, d] predicts x_2..x_L
                y = x[:, off + 1:off + L]                           # [B, L-1]
                flat_h, flat_y = h.reshape(-1, h.shape[-1]), y.reshape(-1)  # [B*(L-1), d], [B*(L-1)]
                lp = -head.nll(flat_h, flat_y)                      # [B*(L-1)]
                lp_w = lp.reshape(hi - lo, L - 1)                   # [B*(L-1)] -> [B, L-1]
                nll_sum[lo:hi] = (-lp_w.double().sum(1)).cpu().numpy()
                # [kept, L-1] -> [kept * (L-1)], in the order of rows_w / rows_p
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
