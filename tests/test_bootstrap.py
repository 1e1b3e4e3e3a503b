"""Bootstrap intervals and permutation p-values against naive loops: the resampled
correlations equal, resample by resample, re-binning ``ppl[idx]`` / ``vectors[idx]`` with
``bin_table`` and correlating with scipy; the permutation p-value equals an exhaustive count
over every permutation of a small case."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from dispersion.measure.binning import bin_table, uniform_perplexity_bins
from dispersion.measure.bootstrap import bootstrap_binned, interval, permutation_p, rowwise_spearman


def _data(n: int = 230, d: int = 12, seed: int = 5):
    rng = np.random.default_rng(seed)
    ppl = np.exp(rng.normal(2.5, 0.6, n))
    # dispersion falls with perplexity, plus noise: a correlation the resamples spread around
    direction = rng.normal(size=d)
    vectors = direction + rng.normal(size=(n, d)) * (1.5 - 0.3 * np.log(ppl))[:, None]
    within = 0.4 - 0.02 * np.log(ppl) + rng.normal(0, 0.01, n)
    return ppl, vectors.astype(np.float16), within


def _distinct_pairs_dispersion(V: np.ndarray, idx: np.ndarray) -> float:
    """Mean 1 - cos over the position pairs of a bin whose drawn segments differ (a double loop)."""
    total, count = 0.0, 0
    for p in range(len(idx)):
        for q in range(p + 1, len(idx)):
            if idx[p] != idx[q]:
                a, b = V[idx[p]].astype(np.float64), V[idx[q]].astype(np.float64)
                total += 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                count += 1
    return total / count


def _naive(ppl, *, bin_size, n_boot, seed, vectors=None, within=None, select_k=None):
    """The resamples drawn as bootstrap_binned draws them, each re-binned by bin_table (within
    scope) or by hand, Eq. 1 over the pairs of different segments of each bin (across scope)."""
    rng = np.random.default_rng(seed)
    n = len(ppl)
    out = {"pearson": [], "spearman": [], "sel_spearman": []}
    idx_all = rng.integers(0, n, size=(n_boot, n))
    for idx in idx_all:
        t = bin_table(ppl[idx], bin_size=bin_size, within=None if within is None else within[idx])
        if vectors is not None:
            order = idx[np.argsort(ppl[idx], kind="stable")]
            y = np.array([_distinct_pairs_dispersion(vectors, order[b * bin_size:(b + 1) * bin_size])
                          for b in range(len(t.mean_ppl))])
        else:
            y = t.within
        out["pearson"].append(stats.pearsonr(t.mean_ppl, y)[0])
        out["spearman"].append(stats.spearmanr(t.mean_ppl, y)[0])
        if select_k:
            sel = uniform_perplexity_bins(t.mean_ppl, select_k)
            out["sel_spearman"].append(stats.spearmanr(t.mean_ppl[sel], y[sel])[0])
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("scope", ["across", "within"])
def test_each_resample_matches_rebinning_it_naively(scope):
    ppl, vectors, within = _data()
    kw = {"vectors": vectors} if scope == "across" else {"within": within}
    fast = bootstrap_binned(ppl, bin_size=20, n_boot=25, seed=11, select_k=6, **kw)
    naive = _naive(ppl, bin_size=20, n_boot=25, seed=11, select_k=6, **kw)
    np.testing.assert_allclose(fast["all"]["pearson_r"], naive["pearson"], atol=1e-9)
    np.testing.assert_allclose(fast["all"]["spearman_r"], naive["spearman"], atol=1e-12)
    np.testing.assert_allclose(fast["selected"]["spearman_r"], naive["sel_spearman"], atol=1e-12)


def test_without_copies_a_resampled_bin_is_eq1():
    from dispersion.measure.bootstrap import same_pairs

    assert same_pairs(np.array([[3, 1, 2, 0], [2, 2, 5, 2]])).tolist() == [4, 1 + 9]  # counts (3, 1): 9 + 1
    ppl, vectors, _ = _data(n=40)
    t = bin_table(ppl, bin_size=10, vectors=vectors)
    order = np.argsort(ppl, kind="stable")
    for b in range(4):
        assert _distinct_pairs_dispersion(vectors, order[b * 10:(b + 1) * 10]) == pytest.approx(t.across[b], rel=1e-9)


def test_the_interval_is_the_percentiles_of_the_resamples_and_covers_the_estimate():
    ppl, vectors, _ = _data(n=400)
    boot = bootstrap_binned(ppl, bin_size=20, vectors=vectors, n_boot=300, seed=1)["all"]["spearman_r"]
    ci = interval(boot, 0.95)
    assert ci.n_boot == 300
    assert ci.low == pytest.approx(float(np.quantile(boot, 0.025))) and ci.high == pytest.approx(
        float(np.quantile(boot, 0.975)))
    t = bin_table(ppl, bin_size=20, vectors=vectors)
    rho = stats.spearmanr(t.mean_ppl, t.across)[0]
    assert ci.low <= rho <= ci.high and ci.low < ci.high


def test_the_same_seed_draws_the_same_resamples_for_every_scope():
    ppl, vectors, within = _data()
    a = bootstrap_binned(ppl, bin_size=20, vectors=vectors, n_boot=30, seed=3)
    b = bootstrap_binned(ppl, bin_size=20, vectors=vectors, n_boot=30, seed=3)
    np.testing.assert_array_equal(a["all"]["spearman_r"], b["all"]["spearman_r"])
    c = bootstrap_binned(ppl, bin_size=20, vectors=vectors, n_boot=30, seed=4)
    assert not np.array_equal(a["all"]["spearman_r"], c["all"]["spearman_r"])


def test_undefined_resamples_are_left_out_of_the_count():
    ppl = np.arange(1.0, 61.0)
    within = np.ones(60)  # constant dispersion: every resample's correlation is undefined
    boot = bootstrap_binned(ppl, bin_size=10, within=within, n_boot=20, seed=0)["all"]["pearson_r"]
    assert np.isnan(boot).all()
    assert interval(boot) == interval(np.array([])) and interval(boot).n_boot == 0


def test_rowwise_spearman_averages_ties_as_scipy_does():
    x = np.array([[1.0, 2.0, 2.0, 3.0, 5.0], [4.0, 1.0, 1.0, 1.0, 0.0]])
    y = np.array([[2.0, 1.0, 3.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    for row, rho in enumerate(rowwise_spearman(x, y)):
        assert rho == pytest.approx(stats.spearmanr(x[row], y[row])[0], abs=1e-12)


def test_permutation_p_value_against_an_exhaustive_count():
    values = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.95, 0.3])
    labels = np.array([1, 0, 1, 1, 0, 0, 1])

    def stat(lab: np.ndarray) -> float:  # difference of the group means
        return float(values[lab == 1].mean() - values[lab == 0].mean())

    observed = abs(stat(labels))
    perms = {p for p in itertools.permutations(labels)}
    exact = np.mean([abs(stat(np.array(p))) >= observed - 1e-12 for p in perms])  # every distinct relabelling
    p, n = permutation_p(stat, labels, n_perm=20000, seed=0)
    assert n == 20000
    assert p[0] == pytest.approx(exact, abs=0.01)  # 3 s.e. of a Monte Carlo p near 0.2 at 20,000 draws
    both, _ = permutation_p(lambda lab: np.array([stat(lab), -2 * stat(lab)]), labels, n_perm=20000, seed=0)
    np.testing.assert_array_equal(both, [p[0], p[0]])  # a vector statistic: one p per component  # 3 s.e. of a Monte Carlo p near 0.2 at 20,000 draws


def test_the_bootstrap_p_value_counts_the_resamples_on_the_far_side_of_zero():
    from dispersion.measure.bootstrap import bootstrap_p

    values = np.array([-0.9] * 97 + [0.1, 0.2, 0.0])  # 3 resamples at or above zero, 98 at or below
    assert bootstrap_p(values) == pytest.approx(2 * (1 + 3) / 101)
    assert bootstrap_p(np.array([np.nan])) is None
    assert bootstrap_p(np.array([0.5, -0.5])) == 1.0


def test_the_jackknife_error_bar_of_a_bin_against_leaving_each_row_out():
    from dispersion.measure.bootstrap import eq1_jackknife_se, standard_error
    from dispersion.measure.metrics import cosine_dispersion

    _, vectors, within = _data(n=25)
    X = vectors.astype(np.float64)
    loo = np.array([cosine_dispersion(np.delete(X, i, axis=0)) for i in range(len(X))])
    naive = np.sqrt((len(X) - 1) / len(X) * ((loo - loo.mean()) ** 2).sum())
    assert eq1_jackknife_se(X) == pytest.approx(naive, rel=1e-9)
    assert standard_error(within) == pytest.approx(stats.sem(within))
    assert np.isnan(eq1_jackknife_se(X[:2]))


def test_the_rho_box_shows_the_interval():
    from dispersion.report.figures import Rho

    assert Rho(-0.42, 0.0004, 10, -0.71, -0.05).text() == "ρ = −0.42 [−0.71, −0.05], p < 0.001, n = 10"
    assert Rho(0.3, 0.2, 10).text() == "ρ = +0.30, p = 0.2, n = 10"


def test_the_bootstrap_bias_is_the_mean_resample_minus_the_estimate():
    from dispersion.measure.bootstrap import bootstrap_bias

    assert bootstrap_bias(np.array([0.5, 0.7, np.nan]), 0.9) == pytest.approx(-0.3)
    assert bootstrap_bias(np.array([np.nan]), 0.9) is None and bootstrap_bias(np.array([0.1]), None) is None


def test_the_perplexity_difference_resamples_whole_groups():
    from dispersion.measure.bootstrap import bootstrap_ppl_difference

    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(12), rng.integers(3, 9, 12))  # windows of uneven token counts
    lp_a = -rng.gamma(2.0, 1.0, groups.size)
    lp_b = lp_a - rng.normal(0.05, 0.1, groups.size)
    diff, boot = bootstrap_ppl_difference(lp_a, lp_b, groups, n_boot=40, seed=9)
    assert diff == pytest.approx(np.exp(-lp_b.mean()) - np.exp(-lp_a.mean()))
    naive_rng = np.random.default_rng(9)
    for r in range(40):  # the resample written out: draw 12 windows, concatenate their tokens
        drawn = naive_rng.integers(0, 12, 12)
        tokens = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
        assert boot[r] == pytest.approx(np.exp(-lp_b[tokens].mean()) - np.exp(-lp_a[tokens].mean()), rel=1e-12)
