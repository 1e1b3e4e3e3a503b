"""Tests for dispersion.measure.metrics against naive O(N^2) numpy references (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as naive
from scipy.spatial.distance import cdist, pdist

from dispersion.measure.metrics import (
    GapResult,
    cluster_dispersion,
    cosine_dispersion,
    dispersion_gap,
    euclidean_dispersion,
    mean_cosine_distance_between,
    mean_euclidean_distance_between,
    vendi_score,
)

RTOL = 1e-6


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ----------------------------------------------------------- cosine (Eq. 1)
@pytest.mark.parametrize("n,d", [(2, 3), (7, 5), (40, 16), (60, 200)])
def test_cosine_dispersion_matches_all_pairs(n, d):
    X = _rng(n).normal(size=(n, d)) + 0.3  # offset: non-trivial mean cosine
    assert cosine_dispersion(X) == pytest.approx(naive.dispersion(X), rel=RTOL)


def test_cosine_dispersion_matches_full_matrix_and_float32_input():
    X = _rng(1).normal(size=(300, 32)).astype(np.float32)
    assert cosine_dispersion(X) == pytest.approx(naive.dispersion(X), rel=RTOL)  # N x N, float64


def test_cosine_dispersion_is_scale_invariant_per_row():
    X = _rng(2).normal(size=(20, 6))
    scales = _rng(3).uniform(0.01, 100, size=(20, 1))
    assert cosine_dispersion(X * scales) == pytest.approx(cosine_dispersion(X), rel=1e-12)


def test_cosine_dispersion_accepts_torch_and_lists():
    torch = pytest.importorskip("torch")
    X = _rng(4).normal(size=(10, 4))
    want = cosine_dispersion(X)
    assert cosine_dispersion(torch.tensor(X, dtype=torch.float64)) == pytest.approx(want, rel=1e-12)
    assert cosine_dispersion(torch.tensor(X, dtype=torch.bfloat16)) == pytest.approx(want, rel=0.05)
    assert cosine_dispersion(X.tolist()) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------ euclidean
@pytest.mark.parametrize("n,d,chunk", [(2, 3, 4096), (50, 8, 7), (123, 20, 16), (64, 5, 64), (200, 30, 4096)])
def test_euclidean_dispersion_matches_pdist(n, d, chunk):
    X = _rng(n).normal(size=(n, d))
    assert euclidean_dispersion(X, chunk_size=chunk) == pytest.approx(pdist(X).mean(), rel=RTOL)


def test_euclidean_dispersion_far_from_origin_no_cancellation():
    # small spread, large offset: naive ||a||^2+||b||^2-2ab would cancel badly without centring
    X = 1e4 + _rng(5).normal(scale=1e-2, size=(100, 10))
    assert euclidean_dispersion(X, chunk_size=33) == pytest.approx(pdist(X).mean(), rel=RTOL)


def test_euclidean_dispersion_identical_rows_is_zero():
    X = np.tile(_rng(6).normal(size=(1, 9)), (12, 1))
    assert euclidean_dispersion(X) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------- vendi
@pytest.mark.parametrize("n,d", [(50, 8), (30, 100), (40, 40)])  # d < N, d > N, d == N
def test_vendi_matches_full_kernel_eigendecomposition(n, d):
    X = _rng(n + d).normal(size=(n, d)) + 0.5
    assert vendi_score(X) == pytest.approx(naive.vendi_score(X), rel=RTOL)


def test_identical_vectors_sanity():
    X = np.tile(_rng(7).normal(size=(1, 5)), (10, 1)) * _rng(8).uniform(0.5, 2, size=(10, 1))
    assert cosine_dispersion(X) == pytest.approx(0.0, abs=1e-12)
    assert vendi_score(X) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_orthonormal_basis_sanity(n):
    Q, _ = np.linalg.qr(_rng(n).normal(size=(n, n)))
    X = Q.T  # rows orthonormal
    assert cosine_dispersion(X) == pytest.approx(1.0, rel=1e-12)
    assert vendi_score(X) == pytest.approx(float(n), rel=1e-9)
    # embedded in a larger ambient space (d > N)
    Xp = np.hstack([X, np.zeros((n, 3))])
    assert vendi_score(Xp) == pytest.approx(float(n), rel=1e-9)


# ------------------------------------------------------------- between sets
def test_mean_between_matches_naive():
    rng = _rng(9)
    A, B = rng.normal(size=(13, 6)) + 0.2, rng.normal(size=(21, 6))
    assert mean_cosine_distance_between(A, B) == pytest.approx(naive.mean_distance_between(A, B), rel=RTOL)
    assert mean_euclidean_distance_between(A, B, chunk_size=5) == pytest.approx(cdist(A, B).mean(), rel=RTOL)


# ------------------------------------------------------------------- clusters
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cluster_dispersion_matches_naive(metric):
    rng = _rng(10)
    n, d = 90, 7
    labels = rng.choice(["a", "b", "c", "d", "e"], size=n)
    centres = {k: rng.normal(size=d) * 3 for k in "abcde"}
    X = np.array([centres[l] for l in labels]) + rng.normal(size=(n, d))
    w, b = cluster_dispersion(X, labels, metric=metric)
    w_ref, b_ref = naive.cluster_dispersion(X, list(labels), metric)
    assert w == pytest.approx(w_ref, rel=RTOL)
    assert b == pytest.approx(b_ref, rel=RTOL)


def test_cluster_of_one_has_zero_within():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = np.array([0, 1, 1])
    w, b = cluster_dispersion(X, labels)
    # both clusters are internally perfectly aligned -> within 0; centroids orthogonal -> between 1
    assert w == pytest.approx(0.0, abs=1e-12)
    assert b == pytest.approx(1.0, rel=1e-12)


def test_cluster_dispersion_errors():
    X = _rng(11).normal(size=(6, 3))
    with pytest.raises(ValueError, match="at least 2 clusters"):
        cluster_dispersion(X, np.zeros(6))
    with pytest.raises(ValueError, match="labels has length 5"):
        cluster_dispersion(X, np.arange(5))
    with pytest.raises(ValueError, match="metric must be"):
        cluster_dispersion(X, np.arange(6) % 2, metric="manhattan")
    Y = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="centroid of cluster 0 is a zero vector"):
        cluster_dispersion(Y, [0, 0, 1])


# ----------------------------------------------------------- dispersion gap
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_dispersion_gap_matches_naive(metric):
    rng = _rng(12)
    E = rng.normal(size=(200, 12)) + 0.1
    dom = rng.choice(200, size=15, replace=False)
    refs = np.setdiff1d(np.arange(200), dom)[rng.choice(185, size=40, replace=False)]
    res = dispersion_gap(E, dom, refs, metric=metric, chunk_size=7)
    assert isinstance(res, GapResult)
    w_t = naive.dispersion(E[dom], metric)
    w_r = naive.dispersion(E[refs], metric)
    btw = naive.mean_distance_between(E[dom], E[refs], metric)
    assert res.within_domain == pytest.approx(w_t, rel=RTOL)
    assert res.within_reference == pytest.approx(w_r, rel=RTOL)
    assert res.between == pytest.approx(btw, rel=RTOL)
    assert res.gap == pytest.approx(w_t + btw, rel=RTOL)
    assert (res.n_domain, res.n_reference, res.metric) == (15, 40, metric)


def test_dispersion_gap_overlap_allowed_and_torch_input():
    torch = pytest.importorskip("torch")
    E = _rng(13).normal(size=(30, 4))
    dom, refs = [0, 1, 2, 3], [2, 3, 4, 5, 6]
    res = dispersion_gap(torch.tensor(E, dtype=torch.float32), dom, refs)
    btw = naive.mean_distance_between(E[dom], E[refs])  # includes the (2,2), (3,3) pairs
    assert res.between == pytest.approx(btw, rel=1e-5)


def test_dispersion_gap_errors():
    E = _rng(14).normal(size=(10, 3))
    with pytest.raises(ValueError, match="domain_ids is empty"):
        dispersion_gap(E, [], [1, 2])
    with pytest.raises(ValueError, match="reference_ids has out-of-range id 10"):
        dispersion_gap(E, [0, 1], [2, 10])
    with pytest.raises(ValueError, match="out-of-range id -1"):
        dispersion_gap(E, [-1, 1], [2, 3])
    with pytest.raises(ValueError, match="duplicate"):
        dispersion_gap(E, [1, 1], [2, 3])
    with pytest.raises(ValueError, match="at least 2 ids"):
        dispersion_gap(E, [1], [2, 3])
    with pytest.raises(ValueError, match="integer ids"):
        dispersion_gap(E, [0.0, 1.0], [2, 3])
    with pytest.raises(ValueError, match="metric must be"):
        dispersion_gap(E, [0, 1], [2, 3], metric="dot")
    E2 = E.copy()
    E2[7] = 0.0
    with pytest.raises(ValueError, match="E row 7 .in reference_ids. is a zero vector"):
        dispersion_gap(E2, [0, 1], [2, 7])
    dispersion_gap(E2, [0, 1], [2, 7], metric="euclidean")  # zero rows are fine for euclidean
    E2[4, 1] = np.nan
    with pytest.raises(ValueError, match="E row 4 .in domain_ids. contains non-finite"):
        dispersion_gap(E2, [4, 1], [2, 3])
    with pytest.raises(ValueError, match="E must be 2-D"):
        dispersion_gap(E[0], [0, 1], [2, 3])


# ------------------------------------------------------------- input errors
@pytest.mark.parametrize("fn", [cosine_dispersion, euclidean_dispersion, vendi_score])
def test_common_input_errors(fn):
    with pytest.raises(ValueError, match="N >= 2"):
        fn(np.ones((1, 3)))
    with pytest.raises(ValueError, match="must be 2-D"):
        fn(np.ones(3))
    with pytest.raises(ValueError, match="must be 2-D"):
        fn(np.ones((2, 3, 4)))
    X = _rng(15).normal(size=(5, 3))
    X[3, 2] = np.inf
    with pytest.raises(ValueError, match="non-finite values .first in row 3"):
        fn(X)


@pytest.mark.parametrize("fn", [cosine_dispersion, vendi_score])
def test_zero_vector_names_row(fn):
    X = _rng(16).normal(size=(5, 3))
    X[2] = 0.0
    with pytest.raises(ValueError, match="row 2 of X is a zero vector"):
        fn(X)


def test_mismatched_dimensions_and_bad_chunk():
    A, B = np.ones((3, 2)), np.ones((3, 4))
    with pytest.raises(ValueError, match="same dimension"):
        mean_cosine_distance_between(A, B)
    with pytest.raises(ValueError, match="same dimension"):
        mean_euclidean_distance_between(A, B)
    with pytest.raises(ValueError, match="chunk_size"):
        euclidean_dispersion(np.ones((3, 2)), chunk_size=0)
