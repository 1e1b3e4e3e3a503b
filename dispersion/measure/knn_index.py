r"""kNN-LM search and scoring over the published shards of :mod:`dispersion.measure.knnlm`:
FAISS indexes, the kNN distribution, interpolation with the base model and perplexity
(Khandelwal et al., ICLR 2020; paper 001 Sec. 3.3, B.3).

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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from dispersion.core import layout
from dispersion.core.config import Strict
from dispersion.core.errors import DataError
from dispersion.core.ids import checksum, digest
from dispersion.core.integrity import CHECKSUMS, check_marker
from dispersion.core.storage import Store
from dispersion.measure.knnlm import KnnUnit, Target, key_table, read_table, vectors_of


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
    test_logprob: np.ndarray | None = None  # (test tokens,) log-probability at the tuned (λ, T)


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
                  seconds=time.perf_counter() - t0,
                  test_logprob=interpolate(lm_logprob[test], lp_by_t[best[2]][test], best[1]))


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
        return deserialize_index(store.read_bytes(rel), spec.nprobe), kind
    t0 = time.perf_counter()
    index = build_index(read, rows, d, spec)
    data = serialize_index(index)
    store.write_bytes(rel, data)
    store.write_json(mrel, {"key": key, "files": [rel], CHECKSUMS: {rel: checksum(data)}, "keys": n, "kind": kind})
    log(f"knnlm: trained a {kind} index over {n} keys of {target[0]}/{target[1]} in {time.perf_counter() - t0:.1f}s")
    return index, kind
