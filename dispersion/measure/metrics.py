"""Representation-dispersion metrics.

Pure functions over 2-D arrays of embeddings (one row per sample / token).
Inputs may be numpy arrays, nested sequences, or torch tensors; numpy is the primary interface.

The O(N d) cosine metrics (:func:`cosine_dispersion`, :func:`mean_cosine_distance_to_rest`,
:func:`mean_cosine_distance_between`, :func:`cluster_dispersion`, the cosine terms of
:func:`dispersion_gap`) stream over row blocks (:mod:`dispersion.measure.blocks`): products in the
input's precision, sums over rows in float64, no full-size copy; a float32 result too small for
float32 rounding to be negligible is recomputed from float64 blocks. They agree with the float64
all-pairs definition to 1e-6 relative. The O(N^2 d) Euclidean metrics and the Vendi score work in
float64 throughout.

References are to "On the Predictive Power of Representation Dispersion in
Language Models":

* Eq. 1 (section 2.1)  -> :func:`cosine_dispersion`
* section 3.2          -> :func:`euclidean_dispersion`, :func:`dispersion_gap`
* section 2.3          -> :func:`cluster_dispersion`
* appendix A.5         -> :func:`vendi_score` (Friedman & Dieng, 2023)

Errors are reported as ``ValueError`` with a one-line message (zero vectors
name the offending row, N < 2, wrong ndim, mismatched shapes, non-finite
values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from dispersion.measure.blocks import REFINE_BELOW, Rows, as_numpy

__all__ = [
    "GapResult",
    "cluster_dispersion",
    "cosine_dispersion",
    "dispersion_gap",
    "euclidean_dispersion",
    "mean_cosine_distance_between",
    "mean_cosine_distance_to_rest",
    "mean_euclidean_distance_between",
    "vendi_score",
]

Metric = Literal["cosine", "euclidean"]

_DEFAULT_CHUNK = 4096


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _as_matrix(X: Any, name: str = "X", min_rows: int = 2) -> np.ndarray:
    """Validate and return ``X`` as a C-contiguous float64 (N, d) array."""
    A = as_numpy(X)
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got ndim={A.ndim} with shape {A.shape}")
    if A.shape[0] < min_rows:
        raise ValueError(f"{name} needs N >= {min_rows} rows, got N={A.shape[0]}")
    if A.shape[1] < 1:
        raise ValueError(f"{name} needs at least one column, got shape {A.shape}")
    if not (np.issubdtype(A.dtype, np.number) or A.dtype == np.bool_) or np.iscomplexobj(A):
        raise ValueError(f"{name} must be a real numeric array, got dtype {A.dtype}")
    A = np.ascontiguousarray(A, dtype=np.float64)
    if not np.isfinite(A).all():
        bad = int(np.argwhere(~np.isfinite(A))[0, 0])
        raise ValueError(f"{name} contains non-finite values (first in row {bad})")
    return A


def _unit_rows(A: np.ndarray, name: str = "X") -> np.ndarray:
    """Rows of ``A`` scaled to unit L2 norm; raises on zero rows (cosine undefined)."""
    norms = np.linalg.norm(A, axis=1)
    zero = np.flatnonzero(norms == 0.0)
    if zero.size:
        raise ValueError(
            f"row {int(zero[0])} of {name} is a zero vector; cosine distance is undefined"
            + (f" ({zero.size} zero rows in total)" if zero.size > 1 else "")
        )
    return A / norms[:, None]


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _check_metric(metric: str) -> Metric:
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    return cast(Metric, metric)


# --------------------------------------------------------------------------- #
# global dispersion
# --------------------------------------------------------------------------- #
def cosine_dispersion(X: Any) -> float:
    r"""Average pairwise cosine distance (paper Eq. 1, section 2.1).

    .. math::
        \bar D = \binom{N}{2}^{-1} \sum_{i<j} \Big[1 - \frac{E_i \cdot E_j}{\|E_i\|\|E_j\|}\Big]

    Computed in O(N d) time and memory without an N x N matrix: with unit rows
    :math:`u_i = E_i/\|E_i\|` and :math:`s = \sum_i u_i`,
    :math:`\sum_{i \ne j} u_i \cdot u_j = \|s\|^2 - N`, hence

    .. math::  \bar D = 1 - \frac{\|s\|^2 - N}{N (N - 1)}.

    One pass over row blocks reads the input once (:class:`~dispersion.measure.blocks.Rows`).
    The result lies in [0, 1 + 1/(N-1)]; tiny negative round-off is clamped to 0.

    Args:
        X: (N, d) embeddings, N >= 2, no zero rows, finite; any float dtype (float16 and
            bfloat16 are widened to float32 a block at a time).

    Returns:
        The mean of ``1 - cos`` over the N(N-1)/2 unordered pairs.
    """
    R = Rows(X, "X")
    (D,), _ = _refined([R], lambda s: [_eq1(s, R.n)])
    return D


def _eq1(s: np.ndarray, n: int) -> float:
    r"""Eq. 1 from the sum of the n unit rows: :math:`1 - (\|s\|^2 - n) / (n (n-1))`."""
    return max(0.0, 1.0 - (float(s @ s) - n) / (n * (n - 1)))


def _refined(sets: list[Rows], terms: Callable[..., list[float]]) -> tuple[list[float], list[np.ndarray]]:
    """``(terms(*sums), sums)`` for the unit-row sums of ``sets``, taken from float32 blocks and
    taken again from float64 blocks when a term is below :data:`REFINE_BELOW` (where float32
    rounding is no longer small next to it)."""
    sums = [R.unit_sum() for R in sets]
    values = terms(*sums)
    if any(R.lossy for R in sets) and min(values) < REFINE_BELOW:
        sums = [R.unit_sum("float64") for R in sets]
        values = terms(*sums)
    return values, sums


def _pairwise_dists(A: np.ndarray, B: np.ndarray, sqA: np.ndarray, sqB: np.ndarray) -> np.ndarray:
    """Euclidean distances ``||a||^2 + ||b||^2 - 2 a.b`` clamped at 0 then sqrt (float64)."""
    D2 = A @ np.ascontiguousarray(B.T)  # GEMM, never numpy's SYRK shortcut (numpy/numpy#19685)
    D2 *= -2.0
    D2 += sqA[:, None]
    D2 += sqB[None, :]
    np.maximum(D2, 0.0, out=D2)
    return np.sqrt(D2, out=D2)


def euclidean_dispersion(X: Any, chunk_size: int = _DEFAULT_CHUNK) -> float:
    r"""Average pairwise Euclidean distance over the pairs i < j (section 3.2).

    .. math::  \binom{N}{2}^{-1} \sum_{i<j} \|E_i - E_j\|_2

    Exact; computed block-wise as :math:`\|a\|^2 + \|b\|^2 - 2 a \cdot b`
    (clamped at 0 before the square root) on blocks of chunk_size x chunk_size
    rows, so peak extra memory is O(chunk_size^2). To limit cancellation, the
    data are centred first (distances are translation invariant) and everything
    is float64.

    Args:
        X: (N, d) embeddings, N >= 2, finite.
        chunk_size: block edge (rows per block).
    """
    A = _as_matrix(X, "X")
    chunk = _check_chunk(chunk_size)
    A = A - A.mean(axis=0)
    sq = np.einsum("ij,ij->i", A, A)
    n = A.shape[0]
    total = 0.0
    for a in range(0, n, chunk):
        a_end = min(a + chunk, n)
        for c in range(a, n, chunk):
            c_end = min(c + chunk, n)
            D = _pairwise_dists(A[a:a_end], A[c:c_end], sq[a:a_end], sq[c:c_end])
            # diagonal blocks contribute only their strict upper triangle (pairs i < j)
            total += float(np.triu(D, k=1).sum() if c == a else D.sum())
    return total / (n * (n - 1) / 2.0)


def vendi_score(X: Any) -> float:
    r"""Vendi score with the cosine kernel (paper appendix A.5; Friedman & Dieng, 2023).

    .. math::
        K_{ij} = u_i \cdot u_j, \quad
        \mathrm{VS} = \exp\Big(-\sum_i \lambda_i \log \lambda_i\Big),

    where :math:`\lambda_i` are the eigenvalues of :math:`K / N` (they sum to 1;
    zero eigenvalues contribute 0, tiny negative round-off is clipped to 0).
    The smaller Gram matrix is used: when d < N the eigenvalues of the (d x d)
    matrix :math:`U^\top U / N`, which has the same non-zero spectrum as
    :math:`U U^\top / N`. VS ranges from 1 (all rows parallel) to rank(U)
    (e.g. N for N orthonormal rows).

    Args:
        X: (N, d) embeddings, N >= 2, no zero rows, finite.
    """
    A = _as_matrix(X, "X")
    U = _unit_rows(A, "X")
    n, d = U.shape
    # explicit transposed copy -> GEMM rather than numpy's SYRK shortcut for X @ X.T,
    # which segfaults for large outputs with some multithreaded OpenBLAS builds
    # (numpy/numpy#19685); the copy is cheap next to the eigendecomposition.
    G = (np.ascontiguousarray(U.T) @ U) if d < n else (U @ np.ascontiguousarray(U.T))
    G /= n
    lam = np.linalg.eigvalsh(G)
    lam = np.clip(lam, 0.0, None)
    lam = lam[lam > 0.0]
    entropy = -float(np.sum(lam * np.log(lam)))
    return float(np.exp(entropy))


# --------------------------------------------------------------------------- #
# distances between two sets
# --------------------------------------------------------------------------- #
def mean_cosine_distance_between(A: Any, B: Any) -> float:
    r"""Mean cosine distance over all pairs (i in A, j in B), in O((|A|+|B|) d).

    .. math::
        \frac{1}{|A||B|}\sum_{i,j} (1 - u_i \cdot v_j)
        = 1 - \frac{(\sum_i u_i)\cdot(\sum_j v_j)}{|A||B|}

    Args:
        A: (n_a, d) embeddings, n_a >= 1, no zero rows.
        B: (n_b, d) embeddings, n_b >= 1, no zero rows, same d.
    """
    Ra, Rb = Rows(A, "A", min_rows=1), Rows(B, "B", min_rows=1)
    if Ra.d != Rb.d:
        raise ValueError(f"A and B must have the same dimension, got {Ra.d} and {Rb.d}")
    (value,), _ = _refined([Ra, Rb], lambda sa, sb: [1.0 - float(sa @ sb) / (Ra.n * Rb.n)])
    return value


def mean_cosine_distance_to_rest(X: Any) -> np.ndarray:
    r"""Each row's mean cosine distance to the other rows, in O(N d) (paper 001 Sec. 3.1, per
    example: the per-row terms whose mean is :func:`cosine_dispersion`).

    .. math::
        m_i = \frac{1}{N-1}\sum_{j \ne i} (1 - u_i \cdot u_j) = 1 - \frac{u_i \cdot s - 1}{N - 1},
        \quad s = \sum_j u_j

    so :math:`\frac{1}{N}\sum_i m_i` equals Eq. 1. A low :math:`m_i` marks a row in the dense,
    low-dispersion part of the set.

    Args:
        X: (N, d) embeddings, N >= 2, no zero rows, finite.

    Two passes over row blocks (the sum s, then every :math:`u_i \cdot s` in float64).

    Returns:
        (N,) float64.
    """
    R = Rows(X, "X")
    _, (s,) = _refined([R], lambda s: [_eq1(s, R.n)])
    return 1.0 - (R.unit_dots(s) - 1.0) / (R.n - 1)


def mean_euclidean_distance_between(A: Any, B: Any, chunk_size: int = _DEFAULT_CHUNK) -> float:
    r"""Mean Euclidean distance over all pairs (i in A, j in B), exact and chunked.

    .. math::  \frac{1}{|A||B|}\sum_{i \in A}\sum_{j \in B} \|a_i - b_j\|_2

    Both sets are centred on their pooled mean first (reduces cancellation);
    blocks of chunk_size x chunk_size pairs, so peak extra memory is O(chunk_size^2).
    """
    Am = _as_matrix(A, "A", min_rows=1)
    Bm = _as_matrix(B, "B", min_rows=1)
    if Am.shape[1] != Bm.shape[1]:
        raise ValueError(f"A and B must have the same dimension, got {Am.shape[1]} and {Bm.shape[1]}")
    chunk = _check_chunk(chunk_size)
    na, nb = Am.shape[0], Bm.shape[0]
    mu = (Am.sum(axis=0) + Bm.sum(axis=0)) / (na + nb)
    Am = Am - mu
    Bm = Bm - mu
    sqa = np.einsum("ij,ij->i", Am, Am)
    sqb = np.einsum("ij,ij->i", Bm, Bm)
    total = 0.0
    for a in range(0, na, chunk):
        a_end = min(a + chunk, na)
        for c in range(0, nb, chunk):
            c_end = min(c + chunk, nb)
            total += float(_pairwise_dists(Am[a:a_end], Bm[c:c_end], sqa[a:a_end], sqb[c:c_end]).sum())
    return total / (na * nb)


# --------------------------------------------------------------------------- #
# clusters (section 2.3)
# --------------------------------------------------------------------------- #
def cluster_dispersion(X: Any, labels: Any, metric: Metric = "cosine") -> tuple[float, float]:
    r"""Within- and between-cluster dispersion (paper section 2.3).

    For clusters :math:`C_1..C_K` (given by ``labels``) with centroids
    :math:`c_k = \frac{1}{|C_k|}\sum_{i \in C_k} x_i` (the raw mean of the
    member vectors as given, *not* of their unit-normalised versions):

    .. math::
        \text{within} = \frac{1}{K}\sum_k \frac{1}{|C_k|}\sum_{i\in C_k} \delta(x_i, c_k),
        \qquad
        \text{between} = \binom{K}{2}^{-1}\sum_{k<l} \delta(c_k, c_l)

    with :math:`\delta(a, b) = 1 - \cos(a, b)` for ``metric="cosine"`` (between =
    :func:`cosine_dispersion` of the centroids) or :math:`\|a-b\|_2` for
    ``metric="euclidean"`` (between = :func:`euclidean_dispersion` of the
    centroids). "within" is an unweighted average over clusters. A cluster with a
    single member has within-distance 0.

    Args:
        X: (N, d) embeddings (finite; no zero rows for cosine).
        labels: length-N cluster labels (any sortable values); >= 2 distinct labels.
        metric: "cosine" (paper default) or "euclidean".

    Returns:
        ``(within, between)``.

    Raises:
        ValueError: also when a cluster centroid is the zero vector under the cosine metric.
    """
    metric = _check_metric(metric)
    R = Rows(X, "X")
    lab = as_numpy(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got ndim={lab.ndim}")
    if lab.shape[0] != R.n:
        raise ValueError(f"labels has length {lab.shape[0]} but X has {R.n} rows")
    uniq, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(-1)                                   # [N] cluster index per row
    k = uniq.shape[0]
    if k < 2:
        raise ValueError(f"need at least 2 clusters, got {k}")
    counts = np.bincount(inv, minlength=k).astype(np.float64)

    # one pass over float64 row blocks: centroid sums; for cosine also the sums of unit rows,
    # since (1/|C_k|) sum_i (1 - u_i . c_k/|c_k|) = 1 - (sum_i u_i) . c_k/(|c_k| |C_k|)
    import torch

    lab_t = torch.from_numpy(inv.astype(np.int64)).to(R.device)
    centroids_t = torch.zeros((k, R.d), dtype=torch.float64, device=R.device)   # [K, d]
    cosine = metric == "cosine"
    units_t = torch.zeros_like(centroids_t) if cosine else None                 # [K, d] sums of u_i
    ubuf: torch.Tensor | None = None
    zeros: list[int] | None = [] if cosine else None
    for a, B in R.blocks("float64"):
        rows = lab_t[a:a + len(B)]                                              # [b] cluster of each row
        centroids_t.index_add_(0, rows, B)
        r = R.norms(a, B, zeros)                                                # [b]; inf for zero rows
        if units_t is not None:
            if ubuf is None:
                ubuf = torch.empty_like(B)
            units_t.index_add_(0, rows, torch.div(B, r[:, None], out=ubuf[: len(B)]))
    if zeros is not None:
        R.raise_zeros(zeros)
    centroids = centroids_t.cpu().numpy() / counts[:, None]

    if units_t is not None:
        cnorm = np.linalg.norm(centroids, axis=1)
        zero = np.flatnonzero(cnorm == 0.0)
        if zero.size:
            lab0 = uniq[zero[0]].item()
            raise ValueError(f"centroid of cluster {lab0!r} is a zero vector; cosine distance is undefined")
        between = cosine_dispersion(centroids)
        dots = np.einsum("kd,kd->k", units_t.cpu().numpy(), centroids / cnorm[:, None])  # [K] sum_i u_i . c_k
        within_per_cluster = np.maximum(1.0 - dots / counts, 0.0)
        return float(within_per_cluster.mean()), float(between)
    between = euclidean_dispersion(centroids)
    ref = torch.from_numpy(centroids).to(R.device)
    # second pass (Euclidean): each row's distance to its own centroid, through one reused buffer
    dist_t = torch.empty(R.n, dtype=torch.float64, device=R.device)  # [N]
    cbuf: torch.Tensor | None = None
    for a, B in R.blocks("float64"):
        if cbuf is None:
            cbuf = torch.empty_like(B)
        c = torch.index_select(ref, 0, lab_t[a:a + len(B)], out=cbuf[: len(B)])  # [b, d] own centroids
        torch.linalg.vector_norm(c.sub_(B), dim=1, out=dist_t[a:a + len(B)])
    dist = dist_t.cpu().numpy()                                      # [N]
    within_per_cluster = np.bincount(inv, weights=dist, minlength=k) / counts
    return float(within_per_cluster.mean()), float(between)


# --------------------------------------------------------------------------- #
# dispersion gap (section 3.2)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class GapResult:
    """Result of :func:`dispersion_gap` (paper section 3.2).

    Attributes:
        within_domain: mean pairwise distance among the domain token embeddings, within(T).
        within_reference: mean pairwise distance among the reference embeddings, within(T̄).
        between: mean distance over all pairs (i in T, j in T̄), between(T, T̄).
        gap: G = within(T) + between(T, T̄).
        metric: "cosine" or "euclidean".
        n_domain: |T|.
        n_reference: |T̄|.
    """

    within_domain: float
    within_reference: float
    between: float
    gap: float
    metric: str
    n_domain: int
    n_reference: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "within_domain": self.within_domain,
            "within_reference": self.within_reference,
            "between": self.between,
            "gap": self.gap,
            "metric": self.metric,
            "n_domain": self.n_domain,
            "n_reference": self.n_reference,
        }


def _check_ids(ids: Any, name: str, vocab: int) -> np.ndarray:
    a = as_numpy(ids)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got ndim={a.ndim}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must contain integer ids, got dtype {a.dtype}")
    a = a.astype(np.int64)
    bad = np.flatnonzero((a < 0) | (a >= vocab))
    if bad.size:
        raise ValueError(f"{name} has out-of-range id {int(a[bad[0]])} (valid range 0..{vocab - 1})")
    if np.unique(a).size != a.size:
        raise ValueError(f"{name} contains duplicate ids")
    if len(a) < 2:
        raise ValueError(f"{name} needs at least 2 ids for a within-set distance, got {len(a)}")
    return a


def _gather_rows(M: Any, ids: np.ndarray, name: str) -> np.ndarray:
    """E[ids] for the Euclidean terms, in E's float dtype (float32 for half precision), with
    errors that name the token id (row of E), not the subset position."""
    if isinstance(M, np.ndarray):
        A = M[ids]
    else:  # torch tensor: index on its device, then convert only the selected rows
        import torch

        T = M.detach()[torch.as_tensor(ids, device=M.device)]
        if T.is_floating_point() and T.dtype not in (torch.float32, torch.float64):
            T = T.float()  # bfloat16 / float16: numpy has no bfloat16
        A = T.cpu().numpy()
    if not np.issubdtype(A.dtype, np.number) or np.iscomplexobj(A):
        raise ValueError(f"E must be a real numeric array, got dtype {A.dtype}")
    if not np.issubdtype(A.dtype, np.floating):
        A = A.astype(np.float64)
    finite = np.isfinite(A).all(axis=1)
    if not finite.all():
        row = int(ids[np.flatnonzero(~finite)[0]])
        raise ValueError(f"E row {row} (in {name}) contains non-finite values")
    return A


def _cosine_gap_terms(M: Any, t: np.ndarray, r: np.ndarray) -> tuple[float, float, float]:
    """(within(T), within(T̄), between(T, T̄)) for the cosine distance from one sum of unit rows
    per set, the rows gathered from E a block at a time (no subset copy)."""
    def rows(ids: np.ndarray, name: str) -> Rows:
        def label(i: int) -> str:
            return f"E row {int(ids[i])} (in {name})"
        return Rows(M, "E", index=ids, row_label=label)

    Ra, Rb = rows(t, "domain_ids"), rows(r, "reference_ids")
    (w_t, w_r, between), _ = _refined(
        [Ra, Rb], lambda sa, sb: [_eq1(sa, Ra.n), _eq1(sb, Rb.n), 1.0 - float(sa @ sb) / (Ra.n * Rb.n)])
    return w_t, w_r, between


def dispersion_gap(
    E: Any,
    domain_ids: Any,
    reference_ids: Any,
    metric: Metric = "cosine",
    chunk_size: int = _DEFAULT_CHUNK,
) -> GapResult:
    r"""Dispersion gap of a token set against a reference set (paper section 3.2).

    On rows of an embedding matrix ``E`` (vocab x d, e.g. the output projection
    rows), with domain set T = ``domain_ids`` and reference set T̄ = ``reference_ids``:

    .. math::
        \text{within}(T) = \binom{|T|}{2}^{-1}\sum_{i<j \in T}\delta(E_i, E_j), \quad
        \text{between}(T,\bar T) = \frac{1}{|T||\bar T|}\sum_{i\in T}\sum_{j\in\bar T}\delta(E_i,E_j),

    .. math::  \mathcal G = \text{within}(T) + \text{between}(T, \bar T),

    with :math:`\delta` the cosine distance (O((|T|+|T̄|) d) via sums of unit
    vectors) or the Euclidean distance (exact, chunked). within(T̄) is reported too.

    The id sets may overlap; the between term then simply includes the pairs
    (i, i) of shared ids (distance 0). Each set must be non-empty, free of
    duplicates, in range [0, vocab) (negative ids are rejected), and have at
    least 2 ids (a within term needs a pair).
    """
    metric = _check_metric(metric)
    M = E if hasattr(E, "detach") else np.asarray(E)  # torch: gather rows before converting
    shape = tuple(M.shape)
    if len(shape) != 2:
        raise ValueError(f"E must be 2-D (vocab, d), got ndim={len(shape)} with shape {shape}")
    t = _check_ids(domain_ids, "domain_ids", shape[0])
    r = _check_ids(reference_ids, "reference_ids", shape[0])
    if metric == "cosine":
        w_t, w_r, between = _cosine_gap_terms(M, t, r)
    else:
        A = _gather_rows(M, t, "domain_ids")
        B = _gather_rows(M, r, "reference_ids")
        w_t = euclidean_dispersion(A, chunk_size=chunk_size)
        w_r = euclidean_dispersion(B, chunk_size=chunk_size)
        between = mean_euclidean_distance_between(A, B, chunk_size=chunk_size)
    return GapResult(
        within_domain=w_t,
        within_reference=w_r,
        between=between,
        gap=w_t + between,
        metric=metric,
        n_domain=int(t.size),
        n_reference=int(r.size),
    )
