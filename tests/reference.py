"""Naive references for the tests and the benchmarks: obviously correct, O(N^2), float64.

Each function computes one quantity straight from its definition: every pair is formed
explicitly (a full matrix of pair distances, or a loop over the pairs), nothing is cancelled
algebraically, nothing is chunked, and the arithmetic is float64 numpy. The library computes the
same quantities in O(N d) or in chunks (``dispersion.measure.metrics``,
``dispersion.measure.gap``, ``dispersion.training.losses``); the tests compare the two.

Tests import it as ``from reference import ...`` (pytest puts ``tests/`` on ``sys.path``);
the bench scripts add ``tests/`` to ``sys.path`` first.

Notation: X is an (N, d) matrix of row vectors x_i; u_i = x_i / ||x_i|| are the unit rows.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("cosine", "euclidean")


def _f64(X) -> np.ndarray:
    return np.asarray(X, dtype=np.float64)


# ----------------------------------------------------------------------------- one pair


def cosine_similarity(a, b) -> float:
    """cos(a, b) = a . b / (||a|| ||b||)."""
    a, b = _f64(a), _f64(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_distance(a, b) -> float:
    """d_cos(a, b) = 1 - a . b / (||a|| ||b||)."""
    return 1.0 - cosine_similarity(a, b)


def euclidean_distance(a, b) -> float:
    """d_euc(a, b) = ||a - b||_2 = sqrt(sum_k (a_k - b_k)^2)."""
    a, b = _f64(a), _f64(b)
    return float(np.sqrt(((a - b) ** 2).sum()))


# ----------------------------------------------------------------------------- all pairs


def distance_matrix(A, B, metric: str = "cosine") -> np.ndarray:
    """The full |A| x |B| matrix D[i, j] = d(a_i, b_j), float64.

    cosine: D = 1 - U_A U_B^T with unit rows (a GEMM on an explicit copy of U_B^T: numpy would
    route ``U @ U.T`` to OpenBLAS SYRK, which segfaults for large N in some builds, numpy#19685);
    euclidean: the exact differences ||a_i - b_j||, one row of D at a time (no Gram trick, so
    no cancellation far from the origin).
    """
    A, B = _f64(A), _f64(B)
    if metric == "cosine":
        Ua = A / np.linalg.norm(A, axis=1, keepdims=True)
        Ub = B / np.linalg.norm(B, axis=1, keepdims=True)
        D = Ua @ np.ascontiguousarray(Ub.T)
        np.subtract(1.0, D, out=D)  # in place: at N = 20k the bench holds one 3.2 GB matrix, not two
        return D
    if metric == "euclidean":
        return np.stack([np.sqrt(((B - a) ** 2).sum(axis=1)) for a in A])
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def dispersion(X, metric: str = "cosine", block: int = 2048) -> float:
    """Mean pairwise distance over the N(N-1)/2 unordered pairs (paper 001 Eq. 1 for cosine):

        D(X) = C(N, 2)^-1 sum_{i<j} d(x_i, x_j).

    The mean of the strict upper triangle of :func:`distance_matrix` (X, X), summed a row block
    at a time so that only the matrix itself is held. Also the per-segment "within" dispersion
    (over one segment's token states) and the "across" dispersion of a perplexity bin.
    """
    D = distance_matrix(X, X, metric)
    n = len(D)
    total = 0.0
    for a in range(0, n, block):  # rows a..a+block, columns j > i only
        total += float(np.triu(D[a:a + block], k=a + 1).sum())
    return total / (n * (n - 1) / 2)


def mean_distance_between(A, B, metric: str = "cosine") -> float:
    """Mean distance over all |A| |B| pairs, one from each set: (|A| |B|)^-1 sum_{a, b} d(a, b).
    A pair of the same vector counts too (distance 0) when the sets overlap."""
    return float(distance_matrix(A, B, metric).mean())


def vendi_score(X) -> float:
    """Vendi score with the cosine kernel (paper 001 A.5; Friedman & Dieng 2023):

        K_ij = u_i . u_j (the full N x N kernel),  VS = exp(-sum_k lambda_k log lambda_k),

    lambda_k the eigenvalues of K / N (they sum to 1); 0 log 0 = 0, and eigenvalues at
    round-off level (<= 1e-15: K has N - rank of them) count as zeros.
    """
    X = _f64(X)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    lam = np.linalg.eigvalsh(U @ U.T / len(U))
    lam = lam[lam > 1e-15]
    return float(np.exp(-np.sum(lam * np.log(lam))))


def cluster_dispersion(X, labels, metric: str = "cosine") -> tuple[float, float]:
    """(within, between) of the clusters C_1..C_K given by ``labels``, centroids c_k = mean(C_k):

        within  = K^-1 sum_k |C_k|^-1 sum_{x in C_k} d(x, c_k)   (unweighted over clusters)
        between = D({c_1..c_K})                                   (:func:`dispersion` of the centroids)
    """
    X, labels = _f64(X), np.asarray(labels)
    keys = sorted(set(labels.tolist()))
    cents = np.stack([X[labels == k].mean(axis=0) for k in keys])
    within = [distance_matrix(X[labels == k], c[None], metric).mean() for k, c in zip(keys, cents)]
    return float(np.mean(within)), dispersion(cents, metric)


def gap_stats(E, domain, reference, metric: str = "cosine") -> tuple[tuple[float, float], ...]:
    """Dispersion-gap statistics (paper 001 3.2) over rows of E: ((mean, SE) of the domain's
    within pairs, of the reference's within pairs, of the domain x reference pairs), where

        within(T) = pairs (t_i, t_j), i < j, of T;  between = all pairs (t, r), t in T, r in R;
        SE = sample sd (ddof 1) / sqrt(#pairs);  gap = within(T) + between.
    """
    E, t, r = _f64(E), np.asarray(domain), np.asarray(reference)

    def stats(x: np.ndarray) -> tuple[float, float]:
        return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))

    within = distance_matrix(E[t], E[t], metric)[np.triu_indices(len(t), 1)]
    within_ref = distance_matrix(E[r], E[r], metric)[np.triu_indices(len(r), 1)]
    between = distance_matrix(E[t], E[r], metric).ravel()
    return stats(within), stats(within_ref), stats(between)


# ----------------------------------------------------------------------------- auxiliary losses
# Hidden states H [B, T, d] (torch), mask [B, T] (True = a state that counts) or None.
# scope "flatten": one group of all unmasked states of the batch; "sequence": one group per
# sequence with >= 2 unmasked states, the loss averaged over the groups. Loops over the ordered
# pairs i != j of each group, float64.


def loss_groups(H, mask, scope: str) -> list[list[np.ndarray]]:
    """Lists of float64 vectors: all unmasked states (flatten) or one list per sequence with
    >= 2 unmasked states (sequence)."""
    H = H.detach().double().numpy()
    m = np.ones(H.shape[:2], bool) if mask is None else mask.numpy().astype(bool)
    if scope == "flatten":
        return [[H[b, t] for b in range(H.shape[0]) for t in range(H.shape[1]) if m[b, t]]]
    out = [[H[b, t] for t in range(H.shape[1]) if m[b, t]] for b in range(H.shape[0])]
    return [g for g in out if len(g) >= 2]


def _arccos_eps() -> float:
    from dispersion.training.losses import ARCCOS_EPS  # part of the loss's definition

    return ARCCOS_EPS


def angle(a, b, eps: float | None = None) -> float:
    """theta(a, b) / pi = arccos(clamp(cos(a, b), -1 + eps, 1 - eps)) / pi, in [0, 1]."""
    eps = _arccos_eps() if eps is None else eps
    return math.acos(min(max(cosine_similarity(a, b), -1 + eps), 1 - eps)) / math.pi


def ordered_pairs(g) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(g)) for j in range(len(g)) if i != j]


def loss_mean_cosine_distance(H, mask, scope: str) -> float:
    """d_avg = (n(n-1))^-1 sum_{i != j} (1 - cos(h_i, h_j)) per group (001 Eq. 1); push_away = -d_avg,
    squeeze = +d_avg."""
    vals = []
    for g in loss_groups(H, mask, scope):
        pairs = ordered_pairs(g)
        vals.append(sum(cosine_distance(g[i], g[j]) for i, j in pairs) / len(pairs))
    return float(np.mean(vals))


def loss_dispersion(H, mask, scope: str, tau: float, reduction: str = "sum") -> float:
    """InfoNCE-style dispersion: log sum_{i != j} exp(-theta_ij / tau) per group ("sum"), or
    log of the mean over the n(n-1) pairs ("mean", the sum's value minus log n(n-1))."""
    vals = []
    for g in loss_groups(H, mask, scope):
        pairs = ordered_pairs(g)
        s = sum(math.exp(-angle(g[i], g[j]) / tau) for i, j in pairs)
        vals.append(math.log(s if reduction == "sum" else s / len(pairs)))
    return float(np.mean(vals))


def loss_orthogonalization(H, mask, scope: str) -> float:
    """(n(n-1))^-1 sum_{i != j} max(0, 1/2 - theta_ij)^2 per group (theta in units of pi)."""
    vals = []
    for g in loss_groups(H, mask, scope):
        pairs = ordered_pairs(g)
        vals.append(sum(max(0.0, 0.5 - angle(g[i], g[j])) ** 2 for i, j in pairs) / len(pairs))
    return float(np.mean(vals))


def loss_l2_repel(H, mask, scope: str, tau: float, lam_norm: float, reduction: str = "sum") -> float:
    """log sum_{i != j} exp(-||h_i - h_j||^2 / tau) (or log of the mean over the pairs) plus
    lam_norm times the mean over the group's states of mean_k h_k^2, per group."""
    vals = []
    for g in loss_groups(H, mask, scope):
        pairs = ordered_pairs(g)
        s = sum(math.exp(-float(np.sum((g[i] - g[j]) ** 2)) / tau) for i, j in pairs)
        lse = math.log(s if reduction == "sum" else s / len(pairs))
        vals.append(lse + lam_norm * float(np.mean([np.mean(v ** 2) for v in g])))
    return float(np.mean(vals))


def loss_decorrelation(H, mask, scope: str, axis: str, reduction: str = "sum") -> float:
    """sum over ordered pairs a != b of Pearson r(z_a, z_b)^2 ("sum"; "mean": divided by the
    number of pairs), per group Z [n, d]: z the d feature columns over the n states
    (axis "feature") or the n states over their d features (axis "token")."""
    vals = []
    for g in loss_groups(H, mask, scope):
        Z = np.stack(g)
        if axis == "feature":  # correlation between the d dimensions over the n states
            cols = [Z[:, k] for k in range(Z.shape[1])]
        else:                  # correlation between the n states over their d features
            cols = [Z[k] for k in range(Z.shape[0])]
        total, cnt = 0.0, 0
        for a in range(len(cols)):
            for b in range(len(cols)):
                if a == b:
                    continue
                x, y = cols[a], cols[b]
                r = np.sum((x - x.mean()) * (y - y.mean())) / ((len(x) - 1) * x.std(ddof=1) * y.std(ddof=1))
                total += r * r
                cnt += 1
        vals.append(total if reduction == "sum" else total / cnt)
    return float(np.mean(vals))


def loss_cross_domain_push_away(H, mask, domain) -> float:
    """-(mean of 1 - cos(h_i, h_j) over the ordered pairs of unmasked states of the batch whose
    sequences belong to different domains); ``domain`` gives one domain id per sequence."""
    Hn = H.detach().double().numpy()
    m = np.ones(Hn.shape[:2], bool) if mask is None else mask.numpy().astype(bool)
    states = [(Hn[b, t], int(domain[b])) for b in range(Hn.shape[0]) for t in range(Hn.shape[1]) if m[b, t]]
    tot, cnt = 0.0, 0
    for i, (a, da) in enumerate(states):
        for j, (b, db) in enumerate(states):
            if i != j and da != db:
                tot += cosine_distance(a, b)
                cnt += 1
    return -tot / cnt


def push_away_full_matrix(H):
    """Push-away -(n(n-1))^-1 sum_{i != j} (1 - u_i . u_j) of H [N, d] through the full N x N
    cosine matrix C = U U^T (sum_{i != j} (1 - C_ij) = N^2 - sum C, the diagonal being 1), in
    torch, in H's dtype and differentiable: the naive way ``bench/bench_losses.py`` times and
    measures the memory of; its float64 value is -:func:`dispersion` (H) up to rounding."""
    import torch

    U = torch.nn.functional.normalize(H, dim=-1)
    C = U @ U.T
    n = H.shape[0]
    return -(n * n - C.sum()) / (n * (n - 1))
