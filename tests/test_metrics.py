"""Tests for dispersion.measure.metrics against naive O(N^2) numpy references (float64)."""

from __future__ import annotations

import os

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
    mean_cosine_distance_to_rest,
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


# ------------------------------------------------- streaming: hard cases, dtypes, no copies
def _near_parallel(n: int, d: int, offset: float, seed: int = 30) -> np.ndarray:
    """Rows = one large shared vector + unit noise: mean cosine 1 - O(1 / offset^2)."""
    rng = _rng(seed)
    return (offset * rng.normal(size=d) + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("offset", [3.0, 30.0, 300.0])
def test_cosine_metrics_near_parallel_rows_float32(offset):
    # D from ~0.1 down to ~1e-5: float32 rounding is refined away where it is no longer small
    X = _near_parallel(700, 48, offset)  # 700 rows: three row blocks, the last one partial
    want = naive.dispersion(X)
    assert cosine_dispersion(X) == pytest.approx(want, rel=RTOL)
    rest = naive.distance_matrix(X, X).sum(axis=1) / (len(X) - 1)
    np.testing.assert_allclose(mean_cosine_distance_to_rest(X), rest, rtol=RTOL)
    A, B = X[:300], X[300:]
    assert mean_cosine_distance_between(A, B) == pytest.approx(naive.mean_distance_between(A, B), rel=RTOL)


def test_cosine_dispersion_float16_and_bfloat16_read_blockwise():
    torch = pytest.importorskip("torch")
    X = (_rng(31).normal(size=(600, 40)) + 0.5).astype(np.float16)
    want = naive.dispersion(X.astype(np.float64))  # the float16 values, exactly
    assert cosine_dispersion(X) == pytest.approx(want, rel=RTOL)
    assert cosine_dispersion(torch.from_numpy(X)) == pytest.approx(want, rel=RTOL)
    Tb = torch.from_numpy(X.astype(np.float32)).bfloat16()
    assert cosine_dispersion(Tb) == pytest.approx(naive.dispersion(Tb.double().numpy()), rel=RTOL)


def test_cosine_dispersion_two_rows_and_extreme_magnitudes():
    assert cosine_dispersion(np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)) == pytest.approx(1.0, rel=1e-12)
    assert cosine_dispersion(np.array([[1.0, 1.0], [2.0, 2.0]], np.float16)) == pytest.approx(0.0, abs=1e-12)
    # float32 rows whose squared norm over- or underflows float32: still exact
    X = _rng(32).normal(size=(300, 16)).astype(np.float32)
    X[3] *= np.float32(1e30)
    X[7] *= np.float32(1e-30)
    want = naive.dispersion(X.astype(np.float64))
    assert cosine_dispersion(X) == pytest.approx(want, rel=RTOL)


def test_streaming_errors_name_the_row_across_blocks():
    X = _rng(33).normal(size=(600, 8)).astype(np.float32)
    X[517, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite values .first in row 517"):
        cosine_dispersion(X)
    X[517, 3] = 1.0
    X[[300, 599]] = 0.0
    with pytest.raises(ValueError, match=r"row 300 of X is a zero vector.*\(2 zero rows in total\)"):
        cosine_dispersion(X)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux /proc")
def test_cosine_metrics_make_no_full_size_copy():
    X = _rng(34).normal(size=(20_000, 1024)).astype(np.float32) + 0.2  # 82 MB
    X16 = X.astype(np.float16)
    labels = np.arange(len(X)) % 7
    fns = {"cosine": lambda: cosine_dispersion(X), "float16": lambda: cosine_dispersion(X16),
           "rest": lambda: mean_cosine_distance_to_rest(X), "cluster": lambda: cluster_dispersion(X, labels)}
    for name, fn in fns.items():
        fn()  # warm: first calls load kernels
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark
        before = _status_kb("VmRSS")
        fn()
        grew = (_status_kb("VmHWM") - before) * 1024
        assert grew < 0.75 * X.nbytes, (name, grew)  # a few blocks; any copy of X is >= X.nbytes


def test_cluster_dispersion_float32_many_blocks_matches_naive():
    X = (_rng(35).normal(size=(900, 12)) + 1.0).astype(np.float32)
    labels = _rng(36).integers(0, 9, size=900)
    for metric in ("cosine", "euclidean"):
        got = cluster_dispersion(X, labels, metric)
        want = naive.cluster_dispersion(X, labels, metric)
        assert got == pytest.approx(want, rel=RTOL)


@pytest.mark.parametrize("offset", [3.0, 30.0, 300.0])
def test_cluster_dispersion_of_tight_clusters_far_from_the_origin(offset):
    """Within-cluster distances down to 1e-10 (rows near their centroid on a large offset)."""
    rng = _rng(37)
    X = (rng.normal(size=(600, 64)) * 0.01 + offset).astype(np.float32)
    labels = rng.integers(0, 5, size=600)
    X[labels == 1] += rng.normal(size=64).astype(np.float32)
    got = cluster_dispersion(X, labels)
    want = naive.cluster_dispersion(X.astype(np.float64), list(labels), "cosine")
    assert got == pytest.approx(want, rel=RTOL)
