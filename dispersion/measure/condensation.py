"""Embedding condensation (papers 002 and 003, Sec. 2.1): per-layer histograms of the
within-sequence token cosine similarities, stacked into a layers x bins heatmap, and the
correlation of the layer mean similarity with depth.

What is counted. For every sequence ``x_1..x_T`` and every layer, the kept token states
``z_i`` give the ``k (k-1) / 2`` similarities ``cos(z_i, z_j)`` with ``i < j`` (the diagonal
and the mirrored half are left out). Kept positions are the segment's tokens, without the
BOS position (with ``prepend_bos`` the model sees ``[BOS] x_1..x_T`` but BOS is never
counted), without the first ``skip_first`` segment tokens and without padding; with
``max_tokens`` a seeded subset of at most that many kept positions is taken (the same
positions at every layer). The pairs of the ``n`` sequences are pooled: histogram counts
are summed, and ``mean``, ``median`` and ``std`` are those of all pooled pairs (a sequence
of ``k`` kept tokens weighs ``k (k-1) / 2`` pairs). Papers 002/003 average ``n = 100``
sequences per heatmap.

* histogram: ``bins`` equal bins over [-1, 1], numpy's convention (bin ``b`` is
  ``[e_b, e_{b+1})``, the last one also holds 1.0); similarities are clipped to [-1, 1]
  first (rounding can give 1 + 1e-16). ``density = counts / (n_pairs * bin_width)``
  integrates to 1 (``np.histogram(density=True)``).
* ``mean``, ``std`` (population, ddof 0): exact, in float64 (pairwise-combined sums).
* ``median``: read from a 65,536-bin histogram of the same values, interpolated inside the
  bin holding the middle rank: within ``2 / 65536 = 3.1e-5`` of the exact median, in O(1)
  memory whatever the number of pairs.

Layers are those of :mod:`dispersion.measure.capture` (site ``block``), read by a
:class:`~dispersion.measure.capture.Capture` reducer in one forward pass per batch: ``0`` =
input of block 1 (embeddings), ``l`` (1..n) = output of block ``l`` (residual stream, before
the final norm), ``final`` = final-norm output.
In HF's ``output_hidden_states``, ``hidden_states[l]`` is layer ``l`` for ``l < n`` and
``hidden_states[n]`` is ``final`` (HF applies the final norm to the last entry); block ``n``'s
raw output is not in that tuple. ``depth`` is ``l`` for layer ``l`` and ``n + 1`` for
``final`` (its place in the forward pass). Inside a hook each sequence is reduced on its
own with a ``k x k`` float64 Gram matrix, so memory is O(T^2) per sequence, never
batch x layers x T x T.

The depth correlation (paper 002 Fig. 2b) is Spearman's rho and Kendall's tau (scipy) of
the layer mean similarity against depth, over the layers of the map: positive = similarity
rises with depth (condensation). The heatmap is
:func:`dispersion.report.condensation.plot_condensation`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from dispersion.core.config import LayerRef, Strict
from dispersion.core.errors import ConfigError, DataError, ModelError, NonFiniteError

FIELD = "analysis.condensation"  # the run-config field of CondensationSpec (prefixes error messages)
MEDIAN_BINS = 65536  # resolution of the histogram the median is read from (2 / 65536 = 3.1e-5)


class CondensationSpec(Strict):
    """Options of the embedding-condensation maps (papers 002/003 Sec. 2.1).

    Attributes:
        num_sequences: n, sequences pooled per map (papers: 100). With more sequences given, a
            seeded subset of n is used; with fewer, an error.
        bins: equal histogram bins over [-1, 1].
        layers: ``all`` (0..n and final), or layer refs as ``extraction.layers``.
        skip_first: segment tokens left out at the start of every sequence (after BOS).
        prepend_bos: feed ``[BOS] + sequence``; the BOS position is never counted.
        max_tokens: at most this many kept tokens per sequence (a seeded subset); None = all.
        seed: seeds the choice of sequences and of token subsets.
        batch_size: sequences per forward pass.
    """

    num_sequences: Annotated[int, Field(gt=0)] = 100
    bins: Annotated[int, Field(ge=2, le=4096)] = 128
    layers: LayerRef | list[LayerRef] = "all"
    skip_first: Annotated[int, Field(ge=0)] = 0
    prepend_bos: bool = True
    max_tokens: Annotated[int, Field(ge=2)] | None = None
    seed: int = 0
    batch_size: Annotated[int, Field(gt=0)] = 16


def parse_condensation_spec(data: object, source: str = FIELD) -> CondensationSpec:
    """A CondensationSpec from a mapping (or a spec); errors are one line naming the field."""
    from dispersion.core.config import validate

    if isinstance(data, CondensationSpec):
        return data
    if data is None:
        return CondensationSpec()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping, got {type(data).__name__}")
    return validate(CondensationSpec, data, source)


# --------------------------------------------------------------------------- #
# result
# --------------------------------------------------------------------------- #
@dataclass
class CondensationMap:
    """Pooled per-layer similarity histograms of one model@revision (one heatmap).

    Row ``r`` of every array is layer ``layers[r]`` (depth order).
    """

    layers: list[str]
    depths: np.ndarray        # int [L]: l for layer 'l', n + 1 for 'final'
    edges: np.ndarray         # float64 [bins + 1] over [-1, 1]
    counts: np.ndarray        # int64 [L, bins]: pairs per bin, summed over sequences
    n_pairs: np.ndarray       # int64 [L] (the same at every layer)
    mean: np.ndarray          # float64 [L]
    median: np.ndarray        # float64 [L]
    std: np.ndarray           # float64 [L]
    n_sequences: int
    model: str = ""
    revision: str = "main"
    label: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    @property
    def density(self) -> np.ndarray:
        """float64 [L, bins]: counts / (n_pairs * bin width); each row integrates to 1."""
        width = np.diff(self.edges)
        return self.counts / np.maximum(self.n_pairs, 1)[:, None] / width[None, :]

    def title(self) -> str:
        name = f"{self.model}@{self.revision}" if self.model else self.revision
        return f"{name} {self.label}".strip()

    def to_table(self) -> pa.Table:
        """Rows of :data:`CONDENSATION_SCHEMA`, one per layer."""
        dens = self.density
        return pa.Table.from_pylist([{
            "model": self.model, "revision": self.revision, "label": self.label, "layer": layer,
            "depth": int(self.depths[r]), "n_sequences": int(self.n_sequences), "n_pairs": int(self.n_pairs[r]),
            "mean": float(self.mean[r]), "median": float(self.median[r]), "std": float(self.std[r]),
            "hist": dens[r].astype(np.float32).tolist(), "counts": self.counts[r].tolist(),
        } for r, layer in enumerate(self.layers)], schema=CONDENSATION_SCHEMA)


CONDENSATION_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("label", pa.string()),
    ("layer", pa.string()), ("depth", pa.int32()), ("n_sequences", pa.int64()), ("n_pairs", pa.int64()),
    ("mean", pa.float64()), ("median", pa.float64()), ("std", pa.float64()),
    ("hist", pa.list_(pa.float32())), ("counts", pa.list_(pa.int64())),
])
"""One row per (model, revision, label, layer). ``label``: free text (``baseline``,
``dispersion λ=0.1``). ``depth``: l for layer ``l``, n + 1 for ``final``. ``n_pairs``: pooled
token pairs i < j. ``mean``/``median``/``std``: of the pooled cosine similarities. ``hist``:
densities over ``len(hist)`` equal bins of [-1, 1] (integrate to 1); ``counts``: the pair
counts behind them."""

CONDENSATION_DEPTH_SCHEMA = pa.schema([
    ("model", pa.string()), ("revision", pa.string()), ("label", pa.string()), ("n_layers", pa.int64()),
    ("spearman_r", pa.float64()), ("spearman_p", pa.float64()),
    ("kendall_tau", pa.float64()), ("kendall_p", pa.float64()),
])
"""One row per (model, revision, label): rank correlations of the layer mean similarity with
depth (paper 002 Fig. 2b); positive = condensation (similarity rises with depth)."""


def maps_from_table(table: pa.Table) -> list[CondensationMap]:
    """CondensationMaps back from :data:`CONDENSATION_SCHEMA` rows, one per (model, revision,
    label) in order of first appearance; layers sorted by depth."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in table.to_pylist():
        groups.setdefault((row["model"], row["revision"], row["label"]), []).append(row)
    maps = []
    for (model, revision, label), rows in groups.items():
        rows.sort(key=lambda r: r["depth"])
        bins = len(rows[0]["hist"])
        if any(len(r["hist"]) != bins for r in rows):
            raise DataError(f"{FIELD}: {model}@{revision} {label}: layers have different bin counts")
        if all(r.get("counts") is not None for r in rows):
            counts = np.asarray([r["counts"] for r in rows], dtype=np.int64)
        else:  # densities only: counts recovered up to rounding
            width = 2.0 / bins
            counts = np.rint(np.asarray([r["hist"] for r in rows], np.float64) * width
                             * np.asarray([r["n_pairs"] for r in rows], np.float64)[:, None]).astype(np.int64)
        maps.append(CondensationMap(
            layers=[r["layer"] for r in rows], depths=np.asarray([r["depth"] for r in rows], np.int64),
            edges=np.linspace(-1.0, 1.0, bins + 1), counts=counts,
            n_pairs=np.asarray([r["n_pairs"] for r in rows], np.int64),
            mean=np.asarray([r["mean"] for r in rows], np.float64),
            median=np.asarray([r["median"] for r in rows], np.float64),
            std=np.asarray([r["std"] for r in rows], np.float64),
            n_sequences=int(rows[0]["n_sequences"]), model=model, revision=revision, label=label))
    return maps


def as_maps(maps: CondensationMap | Sequence[CondensationMap] | pa.Table) -> list[CondensationMap]:
    """A list of maps from one map, a sequence of maps or a :data:`CONDENSATION_SCHEMA` table."""
    if isinstance(maps, pa.Table):
        return maps_from_table(maps)
    if isinstance(maps, CondensationMap):
        return [maps]
    return list(maps)


# --------------------------------------------------------------------------- #
# computation
# --------------------------------------------------------------------------- #
def _layer_list(spec: CondensationSpec, n_layers: int) -> list[str]:
    from dispersion.measure.capture import layer_names

    refs = spec.layers if isinstance(spec.layers, list) else [spec.layers]
    try:
        return layer_names(refs, n_layers)
    except ModelError as err:
        raise ConfigError(f"{FIELD}.layers: {str(err).split(': ', 1)[-1]}") from None


def _depth(layer: str, n_layers: int) -> int:
    return n_layers + 1 if layer == "final" else int(layer)


def _choose_sequences(sequences: Sequence[Any], spec: CondensationSpec) -> tuple[list[np.ndarray], np.ndarray]:
    n = len(sequences)
    if n < spec.num_sequences:
        raise DataError(f"{FIELD}.num_sequences: asked for {spec.num_sequences} sequences but {n} were given")
    idx = np.arange(n)
    if n > spec.num_sequences:
        idx = np.sort(np.random.default_rng(spec.seed).choice(n, size=spec.num_sequences, replace=False))
    seqs = []
    for i in idx:
        s = np.asarray(sequences[int(i)])
        if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
            raise DataError(f"{FIELD}: sequence {int(i)} must be a 1-D integer array, got {s.dtype} {s.shape}")
        seqs.append(s)
    return seqs, idx


def _kept_positions(length: int, original_index: int, spec: CondensationSpec) -> np.ndarray:
    """Segment-token indices (0-based, BOS excluded) counted for one sequence."""
    pos = np.arange(spec.skip_first, length)
    if spec.max_tokens is not None and len(pos) > spec.max_tokens:
        rng = np.random.default_rng([spec.seed, original_index])
        pos = np.sort(rng.choice(pos, size=spec.max_tokens, replace=False))
    return pos


class _Accumulator:
    """Per-layer pooled histogram and moments, on the model's device."""

    def __init__(self, n_targets: int, bins: int, device, dtype):
        import torch

        self.torch = torch
        self.dtype = dtype
        self.bins = bins
        # numpy's edges; torch.bucketize(right=True) puts e_b in bin b, like np.histogram
        self.inner = torch.as_tensor(np.linspace(-1.0, 1.0, bins + 1)[1:-1], dtype=dtype, device=device)
        self.counts = torch.zeros((n_targets, bins), dtype=torch.long, device=device)
        self.fine = torch.zeros((n_targets, MEDIAN_BINS), dtype=torch.long, device=device)
        self.n = [0] * n_targets
        self.mean = torch.zeros(n_targets, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_targets, dtype=torch.float64, device=device)
        self.bad = torch.zeros(n_targets, dtype=torch.long, device=device)
        self._triu: dict[int, tuple] = {}

    def add(self, t: int, states) -> None:
        """Pairs i < j of one sequence's kept states [k, d] into target ``t``."""
        torch = self.torch
        k = states.shape[0]
        if k not in self._triu:
            self._triu[k] = tuple(torch.triu_indices(k, k, 1, device=states.device))
        x = states.to(self.dtype)
        u = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        vals = (u @ u.T)[self._triu[k]]
        self.bad[t] += (~torch.isfinite(vals)).sum()
        vals = vals.nan_to_num(0.0).clamp_(-1.0, 1.0)
        self.counts[t] += torch.bincount(torch.bucketize(vals, self.inner, right=True), minlength=self.bins)
        fine = ((vals.double() + 1.0) * (MEDIAN_BINS / 2)).floor_().long().clamp_(0, MEDIAN_BINS - 1)
        self.fine[t] += torch.bincount(fine, minlength=MEDIAN_BINS)
        v = vals.double()
        n_b = v.numel()
        m_b = v.mean()
        m2_b = ((v - m_b) ** 2).sum()
        n_a = self.n[t]
        tot = n_a + n_b
        delta = m_b - self.mean[t]
        self.mean[t] += delta * (n_b / tot)
        self.m2[t] += m2_b + delta * delta * (n_a * n_b / tot)
        self.n[t] = tot


def _median_from_fine(fine: np.ndarray) -> float:
    """Median (numpy's: mean of the two middle ranks when even) from a fine histogram over [-1, 1]."""
    n = int(fine.sum())
    cum = np.cumsum(fine)
    width = 2.0 / len(fine)

    def at_rank(q: int) -> float:  # value of the q-th smallest (0-based), interpolated in its bin
        b = int(np.searchsorted(cum, q, side="right"))
        before = cum[b - 1] if b > 0 else 0
        return -1.0 + width * (b + (q - before + 0.5) / fine[b])

    if n % 2:
        return at_rank(n // 2)
    return 0.5 * (at_rank(n // 2 - 1) + at_rank(n // 2))


def condensation_histograms(model, sequences: Sequence[np.ndarray], spec: CondensationSpec | None = None, *,
                            bos_token_id: int | None = None, name: str = "", revision: str | None = None,
                            label: str = "", device=None) -> CondensationMap:
    """Pooled per-layer histograms of within-sequence token cosine similarities (module doc).

    Args:
        model: a causal LM (``transformers``) in eval mode; any dtype (states are reduced in
            float64, float32 on MPS).
        sequences: token-id arrays (any lengths; padded per batch, padding never counted).
            With more than ``spec.num_sequences``, a seeded subset is used.
        bos_token_id: for ``prepend_bos``; default the model's BOS, else its EOS
            (:func:`~dispersion.measure.capture.resolve_bos`).
        name, revision, label: carried into the map and its table rows.
        device: where to run; None = where the model is (otherwise the model is moved there).
    """
    import torch

    from dispersion.measure.capture import Capture, resolve_bos
    from dispersion.measure.modeling import max_positions, num_layers

    spec = spec or CondensationSpec()
    t0 = time.perf_counter()
    seqs, orig = _choose_sequences(sequences, spec)
    n_layers = num_layers(model.config)
    layers = _layer_list(spec, n_layers)
    layers.sort(key=lambda lay: _depth(lay, n_layers))
    off = int(spec.prepend_bos)
    if spec.prepend_bos:
        bos_token_id = resolve_bos(model if bos_token_id is None else bos_token_id, f"{FIELD}.prepend_bos")
    vocab = model.get_input_embeddings().weight.shape[0]
    limit = max_positions(model.config)
    kept = []
    for s, i in zip(seqs, orig):
        if len(s) and (int(s.min()) < 0 or int(s.max()) >= vocab):
            raise DataError(f"{FIELD}: sequence {int(i)} has a token id out of range 0..{vocab - 1} "
                            "(tokenized with another tokenizer?)")
        if limit is not None and len(s) + off > limit:
            raise DataError(f"{FIELD}: sequence {int(i)} of {len(s)} tokens{' + BOS' if off else ''} exceeds "
                            f"the model's context ({limit})")
        pos = _kept_positions(len(s), int(i), spec)
        if len(pos) < 2:
            raise DataError(f"{FIELD}.skip_first: sequence {int(i)} has {len(s)} tokens, {len(pos)} left after "
                            f"skip_first={spec.skip_first} (a pair needs 2)")
        kept.append(pos)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    acc = _Accumulator(len(layers), spec.bins, dev, dtype)
    row_of = {lay: r for r, lay in enumerate(layers)}
    state: dict = {}

    def reduce(target: tuple[str, str], hidden) -> None:  # reducer: hidden [B, T, d]
        r = row_of[target[0]]
        for b, idx in enumerate(state["idx"]):  # idx: the kept positions of sequence b
            acc.add(r, hidden[b].index_select(0, idx))

    targets = [(lay, "block") for lay in layers]
    try:
        with Capture(model, targets, reduce, stop_early=True) as capture, torch.inference_mode():
            for s0 in range(0, len(seqs), spec.batch_size):
                batch = seqs[s0:s0 + spec.batch_size]
                T = max(len(s) for s in batch) + off
                ids = torch.full((len(batch), T), 0, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for b, s in enumerate(batch):
                    if off:
                        assert bos_token_id is not None  # resolved above when prepend_bos
                        ids[b, 0] = bos_token_id
                    ids[b, off:off + len(s)] = torch.as_tensor(s.astype(np.int64))
                    mask[b, :off + len(s)] = 1
                state["idx"] = [torch.as_tensor(p + off, dtype=torch.long, device=dev)
                                for p in kept[s0:s0 + spec.batch_size]]
                capture.forward(input_ids=ids.to(dev), attention_mask=mask.to(dev))
    finally:
        state.clear()
    bad = acc.bad.cpu().numpy()
    if bad.any():
        r = int(np.argmax(bad > 0))
        raise NonFiniteError(f"{FIELD}: cosine similarity at layer {layers[r]} is not finite for "
                             f"{int(bad[r])} token pair(s) of {name or 'the model'}")
    fine = acc.fine.cpu().numpy()
    n_pairs = np.asarray(acc.n, dtype=np.int64)
    return CondensationMap(
        layers=layers, depths=np.asarray([_depth(lay, n_layers) for lay in layers], np.int64),
        edges=np.linspace(-1.0, 1.0, spec.bins + 1), counts=acc.counts.cpu().numpy().astype(np.int64),
        n_pairs=n_pairs, mean=acc.mean.cpu().numpy().astype(np.float64),
        median=np.asarray([_median_from_fine(f) for f in fine], np.float64),
        std=np.sqrt(np.maximum(acc.m2.cpu().numpy(), 0.0) / n_pairs),
        n_sequences=len(seqs), model=name, revision=revision or "main", label=label,
        timings={"total_s": time.perf_counter() - t0})


# --------------------------------------------------------------------------- #
# depth correlation
# --------------------------------------------------------------------------- #
def measure_map(model, inputs: tuple) -> pa.Table:
    """The rows of one map (:data:`CONDENSATION_SCHEMA`): the measurement of a
    :class:`dispersion.measure.units.TableUnit` of the ``condensation`` step, ``inputs`` =
    ``(sequences, spec, name, revision, label)``."""
    sequences, spec, name, revision, label = inputs
    return condensation_histograms(model, sequences, spec, name=name, revision=revision, label=label).to_table()


def depth_correlation(cmap: CondensationMap) -> dict[str, float]:
    """Spearman's rho and Kendall's tau (scipy, with p-values; Spearman's exact up to
    ``EXACT_MAX`` layers) of the layer mean similarity against depth, over the map's layers.
    NaN when the means are constant; needs 3 layers."""
    from scipy import stats

    from dispersion.measure.binning import EXACT_MAX, spearman_exact_p

    if len(cmap.layers) < 3:
        raise DataError(f"{FIELD}.layers: the depth correlation needs at least 3 layers, "
                        f"{cmap.title() or 'the map'} has {len(cmap.layers)}")
    depth = np.asarray(cmap.depths, np.float64)
    mean = np.asarray(cmap.mean, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        rho, rho_p = stats.spearmanr(depth, mean)
        tau, tau_p = stats.kendalltau(depth, mean)
    if np.isfinite(rho) and depth.size <= EXACT_MAX:  # the t approximation fails over a few layers
        rho_p = spearman_exact_p(depth, mean)
    return {"n_layers": len(cmap.layers), "spearman_r": float(rho), "spearman_p": float(rho_p),
            "kendall_tau": float(tau), "kendall_p": float(tau_p)}


def depth_table(maps: CondensationMap | Sequence[CondensationMap] | pa.Table) -> pa.Table:
    """:data:`CONDENSATION_DEPTH_SCHEMA` rows, one per map (from maps or a condensation table)."""
    rows = [{"model": m.model, "revision": m.revision, "label": m.label, **depth_correlation(m)}
            for m in as_maps(maps)]
    return pa.Table.from_pylist(rows, schema=CONDENSATION_DEPTH_SCHEMA)


# --------------------------------------------------------------------------- #
# over models
# --------------------------------------------------------------------------- #
def sample_sequences(tokenizer, spec: CondensationSpec | None = None, *, domain: str = "prose",
                     split: str = "validation", length: int = 128,
                     num_sequences: int | None = None) -> list[np.ndarray]:
    """``num_sequences`` (default ``spec.num_sequences``) seeded segments of ``length`` tokens from
    the embedded corpus (:func:`dispersion.measure.sampling.sample_segments`)."""
    import sys

    from dispersion.measure.corpus import embedded_documents
    from dispersion.measure.sampling import sample_segments

    spec = spec or CondensationSpec()
    n = num_sequences or spec.num_sequences
    docs = embedded_documents(domain, split)
    key = f"embedded:{domain}:{split}:py{sys.version_info[0]}.{sys.version_info[1]}"
    table = sample_segments(docs, tokenizer, length=length, num_segments=n, seed=spec.seed,
                            dataset_key=key, dataset_name=domain)
    return [np.asarray(t, dtype=np.int32) for t in table["token_ids"].to_pylist()]


def condensation_maps(models: Sequence[tuple[str, Any, str | None, str]],
                      sequences: Sequence[np.ndarray] | Callable[[Any], Sequence[np.ndarray]],
                      spec: CondensationSpec | None = None, *, device: str = "auto", dtype: str = "float32",
                      log: Callable[[str], None] | None = None) -> list[CondensationMap]:
    """One map per ``(name, source, revision, label)``, loading the models one at a time.

    ``source`` is a :class:`dispersion.measure.modeling.ModelSource` or a local folder / hub id,
    resolved with ``revision`` (``stepN`` = sub-folder of a local folder). ``sequences`` is a
    list of token-id arrays fed to every model (they must share its tokenizer), or a
    function of the ModelSource that returns them (e.g. via :func:`sample_sequences`).
    ``dtype``: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
    """
    from dispersion.measure.modeling import (
        ModelSource,
        load_model,
        resolve_device,
        resolve_dtype,
        resolve_source,
    )

    spec = spec or CondensationSpec()
    dev = resolve_device(device)
    maps = []
    for name, source, revision, label in models:
        src = source if isinstance(source, ModelSource) else resolve_source(str(source), revision, field="models")
        seqs = sequences(src) if callable(sequences) else sequences
        model = load_model(src, dtype=resolve_dtype(dtype, dev), device=dev, field="models")
        try:
            cmap = condensation_histograms(model, seqs, spec, name=name, revision=revision, label=label)
        finally:
            del model
        maps.append(cmap)
        if log:
            log(f"condensation: {cmap.title()} done in {cmap.timings['total_s']:.1f}s")
    return maps


def condensation_table(models: Sequence[tuple[str, Any, str | None, str]],
                       sequences: Sequence[np.ndarray] | Callable[[Any], Sequence[np.ndarray]],
                       spec: CondensationSpec | None = None, device: str = "auto", dtype: str = "float32",
                       log: Callable[[str], None] | None = None) -> pa.Table:
    """:data:`CONDENSATION_SCHEMA` rows of every model (see :func:`condensation_maps`);
    :func:`depth_table` and :func:`dispersion.report.condensation.plot_condensation` take the result."""
    maps = condensation_maps(models, sequences, spec, device=device, dtype=dtype, log=log)
    if not maps:
        return CONDENSATION_SCHEMA.empty_table()
    return pa.concat_tables([m.to_table() for m in maps])
