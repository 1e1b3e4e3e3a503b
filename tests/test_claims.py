"""The claims ledger: Holm's adjustment and the Fisher interval against naive formulas, the
verdict rules, and on a zoo scan: every correlation row carries its bootstrap interval (through
``dispersion query``), the claims table tests what the run can test (the depth and training
differences from paired resamples), says why it cannot test the rest, and opens the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import scan_config_dict
from scipy import stats

from dispersion.analyses.claims import CLAIMS, fisher_interval, holm, verdict
from dispersion.config import parse_config
from dispersion.core.storage import Store
from dispersion.run import run_scan

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_holm_matches_the_step_down_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 9)))
        m = len(p)
        ranked = sorted(p)
        # naive: the adjusted p of the k-th smallest is max over j <= k of min(1, (m - j) p_(j)) (0-based j)
        naive = {}
        for k, pk in enumerate(ranked):
            naive.setdefault(pk, max(min(1.0, (m - j) * ranked[j]) for j in range(k + 1)))
        assert holm(p) == pytest.approx([naive[x] for x in p])
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_verdicts():
    assert verdict(-0.5, 0.01, -1, 0.05) == "supported"
    assert verdict(0.5, 0.01, -1, 0.05) == "contradicted"
    assert verdict(-0.5, 0.2, -1, 0.05) == "inconclusive"
    assert verdict(-0.5, None, -1, 0.05) == "inconclusive"  # no interval: no verdict either way


def test_fisher_interval_of_spearman_rho():
    lo, hi = fisher_interval(0.6, 30, 0.95)
    half = stats.norm.ppf(0.975) * math.sqrt((1 + 0.18) / 27)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.6) - half), math.tanh(math.atanh(0.6) + half)))
    assert fisher_interval(0.6, 3, 0.95) == (None, None)
    assert fisher_interval(1.0, 4, 0.95) == (None, None) == fisher_interval(-1.0, 12, 0.95)  # z infinite


@pytest.fixture(scope="module")
def scanned(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("claims") / "out"
    cfg = parse_config(scan_config_dict(micro_zoo, root, analysis={"bin_size": 10, "select_bins": 5,
                                                                   "bootstrap": {"n": 300, "seed": 2}}))
    result = run_scan(cfg, progress=False, log=lambda *_: None)
    return cfg, root, result


def _query(root: Path, sql: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "dispersion.cli", "query", sql, "--root", str(root), "--format",
                          "json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_correlation_carries_its_interval(scanned):
    _, root, _ = scanned
    rows = _query(root, "SELECT spearman_r, ci_low, ci_high, pearson_r, pearson_ci_low, pearson_ci_high, n_boot, "
                        "boot_p FROM correlations")
    assert rows
    for r in rows:
        assert r["n_boot"] is not None and 0 < r["n_boot"] <= 300
        assert r["ci_low"] <= r["ci_high"] and r["pearson_ci_low"] <= r["pearson_ci_high"]
        assert 0 < r["boot_p"] <= 1


def test_the_ledger_tests_what_the_run_can_and_says_why_not(scanned):
    cfg, root, result = scanned
    claims = result.tables["claims"].to_pylist()
    by = {}
    for r in claims:
        by.setdefault(r["claim"], []).append(r)
    assert set(by) == {c.name for c in CLAIMS}
    corr = result.tables["correlations"].to_pylist()

    def rho(model, rev, ds, layer, scope="across"):
        pool = "last" if scope == "across" else "tokens"
        return next(c for c in corr if (c["model"], c["revision"], c["dataset"], c["layer"], c["site"], c["pool"],
                                        c["scope"], c["bins"]) == (model, rev, ds, layer, "block", pool, scope, "all"))

    falls = by["perplexity_falls_with_dispersion"]
    assert len(falls) == 2 * 2 * 2  # (gpt2-tiny@step20, llama-small@step20) x datasets x scopes
    for r in falls:
        c = rho(r["model"], r["revision"], r["dataset"], "final",
                "across" if r["detail"].startswith("across") else "within")
        assert (r["value"], r["ci_low"], r["ci_high"], r["p"]) == (c["spearman_r"], c["ci_low"], c["ci_high"],
                                                                   c["boot_p"])
    depth = by["stronger_with_depth"]
    assert len(depth) == 4
    for r in depth:
        assert r["value"] == pytest.approx(rho(r["model"], r["revision"], r["dataset"], "final")["spearman_r"]
                                           - rho(r["model"], r["revision"], r["dataset"], "1")["spearman_r"])
        assert r["ci_low"] <= r["ci_high"] and r["p"] is not None
    training = by["emerges_with_training"]
    assert [(r["model"], r["revision"]) for r in training] == [("gpt2-tiny", "step20")] * 2
    tested = [r for r in claims if r["verdict"] != "not tested"]
    ps = [r["p"] for r in tested]
    assert [r["p_holm"] for r in tested] == pytest.approx(holm(ps))
    for r in tested:
        assert r["verdict"] == verdict(r["value"], r["p_holm"], -1 if r["expected"] == "< 0" else 1, 0.05)
    for name in ("gap_ranks_models", "dispersed_key_is_better", "push_away_lowers_perplexity"):
        (row,) = by[name]
        assert row["verdict"] == "not tested" and row["note"]
    ledger = _query(root, "SELECT claim, verdict FROM claims")  # a catalog view like every result table
    assert sorted((r["claim"], r["verdict"]) for r in ledger) == sorted((r["claim"], r["verdict"]) for r in claims)
    report = Store(str(root)).read_bytes("results/report/t.md").decode()
    assert report.index("## Claims of paper 001 in this run") < report.index("## Findings")
    assert f"{len(tested)} tests of" in report


def test_the_docs_list_the_registered_claims():
    from dispersion.analyses.claims import claims_doc

    doc = (REPO / "docs/ANALYSES.md").read_text()
    block = doc.split("<!-- claims:begin", 1)[1].split("-->", 1)[1].split("<!-- claims:end -->", 1)[0]
    assert block.strip() == claims_doc().strip()


def test_repeated_samples_keep_each_seed_and_their_spread(micro_zoo, tmp_path):
    root = tmp_path / "seeds"
    cfg = parse_config(scan_config_dict(
        micro_zoo, root, models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
        sampling={"num_segments": 60, "segment_length": 32, "shard_size": 30, "seeds": [5, 6, 7]},
        extraction={"layers": ["final"], "pools": ["last"]}, analysis={"bin_size": 10, "bootstrap": {"n": 50}}))
    result = run_scan(cfg, progress=False, log=lambda *_: None)
    corr = result.tables["correlations"].to_pylist()
    cell = [r for r in corr if (r["dataset"], r["scope"], r["bins"]) == ("prose", "across", "all")]
    assert sorted(r["seed"] for r in cell) == [5, 6, 7] and len({r["sample"] for r in cell}) == 3
    assert len({round(r["spearman_r"], 12) for r in cell}) > 1  # independent samples, not one sample thrice
    (agg,) = [r for r in result.tables["correlations_seeds"].to_pylist()
              if (r["dataset"], r["scope"], r["bins"]) == ("prose", "across", "all")]
    rho = np.array([r["spearman_r"] for r in cell])
    assert agg["n_seeds"] == 3 and agg["seeds"] == "5,6,7"
    assert agg["spearman_mean"] == pytest.approx(rho.mean())
    assert agg["spearman_se"] == pytest.approx(rho.std(ddof=1) / np.sqrt(3))
    assert (agg["spearman_min"], agg["spearman_max"]) == (rho.min(), rho.max())
    falls = [r for r in result.tables["claims"].to_pylist() if r["claim"] == "perplexity_falls_with_dispersion"]
    first = next(r for r in cell if r["seed"] == 5)
    prose = next(r for r in falls if r["dataset"] == "prose" and r["detail"].startswith("across"))
    assert prose["value"] == first["spearman_r"] and "seed 5 of 3" in prose["note"]
    assert len(_query(root, "SELECT * FROM correlations_seeds")) == result.tables["correlations_seeds"].num_rows
