"""Tests for dispersion.measure.binning (paper appendix A.1.2, Algorithm 1)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from dispersion.measure.binning import (
    spearman_exact_p,
    BinTable,
    Bins,
    bin_dispersion,
    bin_table,
    correlations,
    make_bins,
    uniform_perplexity_bins,
)
from dispersion.measure.metrics import cosine_dispersion, euclidean_dispersion


# ------------------------------------------------------------- Algorithm 1
def test_alg1_basic():
    # means [1, 2, 3, 10], K=3 -> targets 1, 5.5, 10
    #   t=1    -> m=1 (index 0)
    #   t=5.5  -> |3-5.5|=2.5 < |10-5.5|=4.5 -> index 2
    #   t=10   -> index 3
    # selected {0, 2, 3}
    np.testing.assert_array_equal(uniform_perplexity_bins([1, 2, 3, 10], 3), [0, 2, 3])


def test_alg1_collision_filled_from_sorted_list():
    # means [1, 2, 3, 4, 100], K=4 -> targets 1, 34, 67, 100
    #   t=1   -> index 0
    #   t=34  -> |4-34|=30 < |100-34|=66 -> index 3
    #   t=67  -> |100-67|=33 < |4-67|=63 -> index 4
    #   t=100 -> index 4 (collision)
    # set {0, 3, 4} has 3 < 4 bins -> add smallest unselected index 1 -> [0, 1, 3, 4]
    np.testing.assert_array_equal(uniform_perplexity_bins([1, 2, 3, 4, 100], 4), [0, 1, 3, 4])


def test_alg1_fill_skips_already_selected():
    # means [0, 10, 10.5, 11, 12, 100], K=4 -> targets 0, 33.33, 66.67, 100
    #   t=0     -> index 0
    #   t=33.33 -> |12-33.33|=21.33 < |100-33.33|=66.67 -> index 4
    #   t=66.67 -> |100-66.67|=33.33 < |12-66.67|=54.67 -> index 5
    #   t=100   -> index 5 (collision)
    # set {0, 4, 5}; fill from the sorted list: 0 already selected (skip), add 1 -> [0, 1, 4, 5]
    np.testing.assert_array_equal(uniform_perplexity_bins([0, 10, 10.5, 11, 12, 100], 4), [0, 1, 4, 5])


def test_alg1_tie_goes_to_smaller_index():
    # means [0, 1, 3, 4], K=3 -> targets 0, 2, 4
    #   t=2 -> |1-2| = |3-2| = 1 (exact tie) -> smaller index 1
    # selected {0, 1, 3}
    np.testing.assert_array_equal(uniform_perplexity_bins([0, 1, 3, 4], 3), [0, 1, 3])


def test_alg1_constant_means():
    # means all 5, K=3 -> every target is 5 -> all hit index 0 -> {0}; fill 1, 2 -> [0, 1, 2]
    np.testing.assert_array_equal(uniform_perplexity_bins([5, 5, 5, 5, 5], 3), [0, 1, 2])


def test_alg1_k1_and_k_ge_g():
    # K=1: single target m_min -> index 0 (first of the tied minimum)
    np.testing.assert_array_equal(uniform_perplexity_bins([1, 1, 3], 1), [0])
    np.testing.assert_array_equal(uniform_perplexity_bins([1, 2, 3], 3), [0, 1, 2])
    np.testing.assert_array_equal(uniform_perplexity_bins([1, 2, 3], 10), [0, 1, 2])
    out = uniform_perplexity_bins(np.linspace(0, 1, 11), 6)  # evenly spaced -> every other bin
    np.testing.assert_array_equal(out, [0, 2, 4, 6, 8, 10])
    assert out.dtype == np.int64


def test_alg1_errors():
    with pytest.raises(ValueError, match="K must be a positive integer"):
        uniform_perplexity_bins([1, 2, 3], 0)
    with pytest.raises(ValueError, match="K must be a positive integer"):
        uniform_perplexity_bins([1, 2, 3], 1.5)
    with pytest.raises(ValueError, match="sorted"):
        uniform_perplexity_bins([1, 3, 2], 2)
    with pytest.raises(ValueError, match="at least 1 values"):
        uniform_perplexity_bins([], 2)
    with pytest.raises(ValueError, match="non-finite"):
        uniform_perplexity_bins([1, np.nan, 3], 2)


# -------------------------------------------------------------- make_bins
def test_make_bins_sorting_ties_and_partial():
    ppl = np.array([5.0, 1.0, 3.0, 3.0, 2.0, 9.0, 0.0])
    # stable sort: 0.0(6) 1.0(1) 2.0(4) 3.0(2) 3.0(3) 5.0(0) | 9.0(5) partial -> dropped
    b = make_bins(ppl, bin_size=2)
    assert isinstance(b, Bins)
    assert b.n_bins == 3
    assert [m.tolist() for m in b.members] == [[6, 1], [4, 2], [3, 0]]
    np.testing.assert_allclose(b.mean_ppl, [0.5, 2.5, 4.0])
    np.testing.assert_array_equal(b.sizes, [2, 2, 2])
    bp = make_bins(ppl, bin_size=2, keep_partial=True)
    assert [m.tolist() for m in bp.members][-1] == [5]
    np.testing.assert_allclose(bp.mean_ppl, [0.5, 2.5, 4.0, 9.0])


def test_make_bins_means_match_naive():
    rng = np.random.default_rng(0)
    n, bs = 1037, 100
    ppl = rng.lognormal(2, 1, size=n)
    loss = rng.normal(size=n)
    b = make_bins(ppl, values={"loss": loss}, bin_size=bs)
    order = sorted(range(n), key=lambda i: (ppl[i], i))
    assert b.n_bins == n // bs
    for k in range(b.n_bins):
        idx = order[k * bs : (k + 1) * bs]
        assert b.members[k].tolist() == idx
        assert b.mean_ppl[k] == pytest.approx(np.mean(ppl[idx]), rel=1e-12)
        assert b.median_ppl[k] == pytest.approx(np.median(ppl[idx]), rel=1e-12)
        assert b.values["loss"][k] == pytest.approx(np.mean(loss[idx]), rel=1e-12)
    assert np.all(np.diff(b.mean_ppl) >= 0)
    np.testing.assert_allclose(b.mean_of(loss), b.values["loss"])
    used = np.concatenate(b.members)
    assert len(np.unique(used)) == b.n_bins * bs  # each segment at most once


def test_make_bins_errors():
    with pytest.raises(ValueError, match="fewer than bin_size"):
        make_bins(np.arange(5.0), bin_size=10)
    with pytest.raises(ValueError, match="bin_size must be a positive integer"):
        make_bins(np.arange(5.0), bin_size=0)
    with pytest.raises(ValueError, match="values\\['x'\\] must have length 5"):
        make_bins(np.arange(5.0), values={"x": np.ones(4)}, bin_size=2)
    with pytest.raises(ValueError, match="ppl must be 1-D"):
        make_bins(np.ones((2, 2)), bin_size=1)
    with pytest.raises(ValueError, match="ppl contains non-finite"):
        make_bins([1.0, np.inf], bin_size=1)


# ---------------------------------------------------------- per-bin tables
def test_bin_dispersion_and_table():
    rng = np.random.default_rng(1)
    n, d, bs = 230, 8, 20
    ppl = rng.uniform(1, 50, size=n)
    vecs = rng.normal(size=(n, d)) + ppl[:, None] / 50  # dispersion shrinks with ppl
    within = rng.uniform(size=n)
    b = make_bins(ppl, bin_size=bs)
    across = bin_dispersion(vecs, b)
    for k in range(b.n_bins):
        assert across[k] == pytest.approx(cosine_dispersion(vecs[b.members[k]]), rel=1e-12)
    eu = bin_dispersion(vecs, b, metric=euclidean_dispersion, indices=[0, 3])
    assert np.isnan(eu[1]) and eu[3] == pytest.approx(euclidean_dispersion(vecs[b.members[3]]))

    t = bin_table(ppl, bin_size=bs, vectors=vecs, within=within)
    assert isinstance(t, BinTable)
    np.testing.assert_array_equal(t.bin, np.arange(11))
    np.testing.assert_array_equal(t.n, np.full(11, bs))
    np.testing.assert_allclose(t.across, across)
    np.testing.assert_allclose(t.within, [within[m].mean() for m in b.members])
    assert t.selected.all()
    assert set(t.as_dict()) == {"bin", "n", "mean_ppl", "median_ppl", "across", "within", "selected"}

    ts = bin_table(ppl, bin_size=bs, vectors=vecs, select_k=4)
    sel = uniform_perplexity_bins(b.mean_ppl, 4)
    np.testing.assert_array_equal(np.flatnonzero(ts.selected), sel)
    assert np.isnan(ts.across[~ts.selected]).all()
    np.testing.assert_allclose(ts.across[sel], across[sel])
    sub = ts.only_selected()
    assert sub.bin.tolist() == sel.tolist() and sub.within is None


def test_bin_table_errors():
    ppl = np.arange(10.0)
    with pytest.raises(ValueError, match="vectors has 9 rows"):
        bin_table(ppl, bin_size=5, vectors=np.ones((9, 3)))
    with pytest.raises(ValueError, match="within has length 9"):
        bin_table(ppl, bin_size=5, within=np.ones(9))


# ------------------------------------------------------------ correlations
def test_correlations_monotone():
    x = np.arange(1.0, 9.0)
    up = correlations(x, x**3)
    assert up["spearman_r"] == pytest.approx(1.0)
    assert up["n"] == 8
    pr = stats.pearsonr(x, x**3)
    assert up["pearson_r"] == pytest.approx(pr[0], rel=1e-12)
    assert up["pearson_p"] == pytest.approx(pr[1], rel=1e-12)
    down = correlations(x, -np.exp(x))
    assert down["spearman_r"] == pytest.approx(-1.0)
    # 8 pairs: the exact p, 2 of the 8! orderings as extreme (scipy's t approximation says 0)
    assert down["spearman_p"] == pytest.approx(2 / math.factorial(8), rel=1e-12)
    x10 = np.arange(1.0, 11.0)  # beyond EXACT_MAX: scipy's p
    assert correlations(x10, -np.exp(x10))["spearman_p"] == pytest.approx(stats.spearmanr(x10, -np.exp(x10))[1])


@pytest.mark.parametrize("n", [3, 4, 6, 7])
def test_the_exact_spearman_p_counts_every_ordering(n):
    """Against a naive count with scipy's rho over every permutation, ties included."""
    rng = np.random.default_rng(n)
    x, y = rng.integers(0, 4, n).astype(float), rng.normal(size=n)
    x[0] = x[1] + 1 if x[0] == x[1] else x[0]  # at least two distinct values
    obs = abs(stats.spearmanr(x, y).statistic)
    naive = np.mean([abs(stats.spearmanr(x, y[list(p)]).statistic) >= obs - 1e-12
                     for p in itertools.permutations(range(n))])
    assert spearman_exact_p(x, y) == pytest.approx(naive, abs=1e-12)
    assert correlations(x, y)["spearman_p"] == pytest.approx(naive, abs=1e-12)
    assert spearman_exact_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(2 / 24)  # rho = 1 over 4 pairs
    with pytest.raises(ValueError, match="at most 9"):
        spearman_exact_p(np.arange(10), np.arange(10))


def test_correlations_errors():
    with pytest.raises(ValueError, match="at least 3"):
        correlations([1, 2], [2, 1])
    with pytest.raises(ValueError, match="y is constant"):
        correlations([1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="x is constant"):
        correlations([2, 2, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="same length"):
        correlations([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="non-finite"):
        correlations([1, 2, np.nan], [1, 2, 3])
