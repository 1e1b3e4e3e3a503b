"""kNN-LM (paper 001 Sec. 3.3, B.3): the kNN distribution against brute force, interpolation,
datastores built twice and resumed, the paper-scale config, and the step end to end."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import scan_config_dict, tiny_gpt2

from dispersion.core.integrity import CHECKSUMS
from dispersion.core.storage import Store
from dispersion.measure import knn_index as ki
from dispersion.measure import knnlm as kn
from dispersion.measure.modeling import ModelSource
from dispersion.measure.scan import SegmentSet
from dispersion.measure.sources import ModelRevision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 97
BOS = 1


# --------------------------------------------------------------------------- #
# the kNN distribution
# --------------------------------------------------------------------------- #
def _brute_force(queries, keys, values, vocab, k, temperature):
    """p_kNN by hand in float64: every squared distance, the k smallest, softmax(-d / T) summed
    per value."""
    d = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    out = np.zeros((len(queries), vocab))
    for q in range(len(queries)):
        nn = np.argsort(d[q], kind="stable")[:k]
        w = np.exp(-(d[q, nn] - d[q, nn].min()) / temperature)
        np.add.at(out[q], values[nn], w / w.sum())
    return out


def _store_index(keys, spec, chunk=64):
    rows = [len(keys[s:s + chunk]) for s in range(0, len(keys), chunk)]
    return ki.build_index(lambda i: keys[i * chunk:(i + 1) * chunk], rows, keys.shape[1], spec)


@pytest.mark.parametrize("temperature", [1.0, 7.5])
def test_knn_distribution_equals_brute_force_on_an_exact_index(temperature):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    values = rng.integers(0, 11, size=300)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    index = _store_index(keys, ki.IndexSpec())
    assert ki.IndexSpec().kind(300) == "flat" and index.ntotal == 300
    dist, idx = ki.search(index, queries, k=20)
    got = ki.knn_distribution(dist, idx, values, 11, temperature)
    want = _brute_force(queries, keys, values, 11, 20, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(1), 1.0)
    targets = rng.integers(0, 11, size=6)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(ki.knn_logprob(dist, idx, values, targets, temperature),
                                   np.log(want[np.arange(6), targets]), rtol=1e-5)
    # k is capped by the store size: every key is a neighbour
    dist, idx = ki.search(index, queries, k=5000)
    assert idx.shape == (6, 300)
    np.testing.assert_allclose(ki.knn_distribution(dist, idx, values, 11, temperature),
                               _brute_force(queries, keys, values, 11, 300, temperature), rtol=1e-5, atol=1e-7)


def test_ivf_indexes_beyond_the_exact_threshold():
    """Beyond ``exact_max`` an IVF index: searching every list (nprobe = nlist) of an IVF-Flat
    index is exact; IVF-PQ returns k approximate neighbours, and a target no neighbour holds
    has p_kNN = 0."""
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(2000, 16)).astype(np.float32)
    values = rng.integers(0, 13, size=2000)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    flat = ki.IndexSpec(exact_max=100, code_size=0, nlist=8, nprobe=8)
    assert flat.kind(2000) == "ivfflat"
    dist, idx = ki.search(_store_index(keys, flat), queries, k=30)
    np.testing.assert_allclose(ki.knn_distribution(dist, idx, values, 13),
                               _brute_force(queries, keys, values, 13, 30, 1.0), rtol=1e-4, atol=1e-6)
    pq = ki.IndexSpec(exact_max=100, code_size=8, nlist=8, nprobe=8, train_size=1500)
    assert pq.kind(2000) == "ivfpq" and ki.pq_bytes(16, 64) == 16 and ki.pq_bytes(576, 64) == 64
    index = _store_index(keys, pq)
    dist, idx = ki.search(index, queries, k=30)
    assert idx.shape == (5, 30) and (idx >= 0).all()
    again = ki.deserialize_index(ki.serialize_index(index), nprobe=8)
    np.testing.assert_array_equal(ki.search(again, queries, k=30)[1], idx)
    absent = np.full(5, 12)
    lp = ki.knn_logprob(dist, idx, np.where(values == 12, 0, values), absent)
    assert np.isneginf(lp).all()


def test_interpolation_with_lambda_zero_is_the_base_perplexity_exactly():
    """Base-model log-probabilities from the capture equal HF's loss; interpolating with
    lambda = 0 returns them bit for bit (even where p_kNN = 0), and so does a tuned lambda of 0."""
    model = tiny_gpt2(VOCAB, BOS)
    ids = np.random.default_rng(2).integers(2, VOCAB, size=(4, 20))
    p = kn.forward_windows(model, ids, candidates=[("3", "mlp_in")], table1=[("final", "block")], lm=True)
    with torch.no_grad():
        loss = model(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids)).loss
    assert ki.perplexity(p.lm_logprob) == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    knn_lp = np.random.default_rng(3).normal(size=p.lm_logprob.shape) - 3.0
    knn_lp[::3] = -np.inf  # no neighbour holds the target
    mixed = ki.interpolate(p.lm_logprob, knn_lp, 0.0)
    np.testing.assert_array_equal(mixed, p.lm_logprob.astype(np.float64))
    assert ki.perplexity(mixed) == ki.perplexity(p.lm_logprob)
    assert np.all(ki.interpolate(p.lm_logprob, knn_lp, 0.5) > np.log(0.5) + p.lm_logprob - 1e-12)
    # the whole scoring path: a datastore of the same windows, lambda = 0 and a grid of {0}
    index = _store_index(p.states[("3", "mlp_in")], ki.IndexSpec())
    tune = np.arange(len(p.target)) % 2 == 0
    s = ki.score(index, p.target, p.states[("3", "mlp_in")], p.target, p.lm_logprob, tune, k=8, lam=0.0,
                 temperature=1.0, lambdas=[0.0], temperature_scales=[])
    assert s.knn_ppl == s.base_ppl == s.tuned_ppl == ki.perplexity(p.lm_logprob[~tune])


# --------------------------------------------------------------------------- #
# shards: built twice, resumed
# --------------------------------------------------------------------------- #
def _windows(store, name, ids, shard_size):
    """Publish ``ids`` [W, L] as a window sample (the scan's segments layout)."""
    rows = [len(ids[s:s + shard_size]) for s in range(0, len(ids), shard_size)]
    seg = SegmentSet(name, "s0", tuple(rows))
    sums = {}
    for k in range(len(rows)):
        part = ids[k * shard_size:(k + 1) * shard_size]
        sums[seg.shard_rel(k)] = store.write_table(seg.shard_rel(k), pa.table(
            {"token_ids": pa.array([r.tolist() for r in part], pa.list_(pa.int32()))}))
    store.write_json(seg.marker_rel, {"rows": rows, CHECKSUMS: sums})
    return seg


def _plan(store):
    from dispersion.analyses.knnlm import ModelPlan

    rng = np.random.default_rng(4)
    train = _windows(store, "train", rng.integers(2, VOCAB, size=(10, 16)), 3)
    val = _windows(store, "val", rng.integers(2, VOCAB, size=(8, 16)), 3)
    mr = ModelRevision("tiny", "main", ModelSource("/tiny", None, True), "float32", "models.0", "fp0")
    spec = kn.ForwardSpec(candidates=(("2", "resid_mid"), ("3", "block")),
                          table1=(("0", "block"), ("3", "resid_mid"), ("3", "block"), ("final", "block")),
                          prepend_bos=True, dtype="float32", eval_every=2, eval_count=4, batch_size=2)
    return ModelPlan(mr, 3, 16, BOS, spec, kn.plan_units(mr, "train", "store", train, spec, BOS),
                     kn.plan_units(mr, "val", "eval", val, spec, BOS))


def build(store, plans, log) -> int:
    """The in-process runner over the plans' units: how many ran."""
    from dispersion.measure.units import run_units

    return run_units([u for p in plans for u in p.units], store, progress=False, log=log).ran


def _files(store, plan):
    """Every published file's checksum, by path relative to the root."""
    out = {}
    for u in plan.units:
        out.update(store.read_json(u.marker_rel)[CHECKSUMS])
    return out


@pytest.fixture()
def tiny(monkeypatch):
    """``load_model`` returns the seeded tiny GPT-2 (counting the loads)."""
    import dispersion.measure.modeling as modeling

    loads = []
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: loads.append(1) or tiny_gpt2(VOCAB, BOS))
    return loads


def test_a_datastore_built_twice_is_identical(tmp_path, tiny):

    stores = [Store(str(tmp_path / name)) for name in ("a", "b")]
    plans = [_plan(s) for s in stores]
    for s, p in zip(stores, plans):
        assert build(s, [p], log=lambda m: None) == len(p.units) == 7
    a, b = (_files(s, p) for s, p in zip(stores, plans))
    assert a == b and len(a) == 4 * 3 + 3 * 4  # store: values + 2 keys; eval: windows, tokens + 2 queries
    for rel in a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    # what the files hold: values are next tokens, keys the captured states
    p = plans[0]
    vals = kn.read_table(stores[0], p.store_units, "values")
    assert vals.num_rows == 10 * 15 and vals.column("pos").to_pylist()[:3] == [1, 2, 3]
    first = np.asarray(stores[0].read_table(p.store_units[0].windows.shard_rel(0)).column("token_ids")[0].as_py())
    assert vals.column("value").to_pylist()[:15] == first[1:].tolist()
    wins = kn.read_table(stores[0], p.eval_units, "windows")
    assert wins.column("evaluated").to_pylist() == [True, False] * 4
    assert [h for h in wins.column("half").to_pylist() if h] == ["tune", "test", "tune", "test"]
    assert kn.read_table(stores[0], p.eval_units, "tokens").num_rows == 4 * 15
    assert build(stores[0], [p], log=lambda m: None) == 0  # a rerun skips every published shard


def test_a_resumed_build_equals_an_uninterrupted_one(tmp_path, tiny):
    """Interrupted after two shards (and half-way through a third: files without a marker), the
    rerun computes only the rest and ends with the same files as a build that never stopped; a
    file changed after it was published is computed again."""

    whole, cut = Store(str(tmp_path / "whole")), Store(str(tmp_path / "cut"))
    pw, pc = _plan(whole), _plan(cut)
    build(whole, [pw], log=lambda m: None)
    model = tiny_gpt2(VOCAB, BOS)
    for u in pc.units[:2]:
        kn.run_unit(cut, u, model, BOS)
    half = pc.units[2]
    cut.write_table(half.rel("values"), pa.table({"window": pa.array([0], pa.int32())}))  # no marker: not done
    tiny.clear()
    assert build(cut, [pc], log=lambda m: None) == len(pc.units) - 2
    assert len(tiny) == 1
    assert _files(cut, pc) == _files(whole, pw)
    damaged = pc.units[0].rel("values")
    (tmp_path / "cut" / damaged).write_bytes(b"not parquet")
    lines: list[str] = []
    assert build(cut, [pc], log=lines.append) == 1
    assert any(damaged in line for line in lines)
    assert _files(cut, pc) == _files(whole, pw)


# --------------------------------------------------------------------------- #
# configs and the step
# --------------------------------------------------------------------------- #
def test_the_configs_validate():
    """configs/knnlm.yaml (zoo + SmolLM2, 2 cores) and configs/knnlm-paper.yaml (the paper's
    scale: GPT-2 family, WikiText-103, 512-token chunks, IVF-PQ for ~117M keys)."""
    from dispersion.analyses.knnlm import candidate_layers
    from dispersion.config import load_config

    small = load_config("configs/knnlm.yaml")
    assert small.analysis.enabled("knnlm")
    assert {m.name for m in small.models} >= {"gpt2-tiny", "llama-small", "smollm2-135m"}
    paper = load_config("configs/knnlm-paper.yaml")
    o = paper.analysis.knnlm
    assert [m.id for m in paper.models] == ["distilgpt2", "gpt2", "gpt2-medium", "gpt2-large"]
    assert (o.window, o.chunks, o.seeds, o.k, o.lam, o.temperature) == (512, [10, 50, 100], 10, 1024, 0.25, 1.0)
    assert o.datastore.hf.path == "Salesforce/wikitext" and o.datastore.hf.split == "train"
    assert o.evaluation.hf.split == "validation" and o.datastore_tokens is None
    assert {"resid_mid", "block"} <= set(o.sites)
    assert o.index.kind(116_988_150) == "ivfpq" and o.index.lists(116_988_150) == 4096
    assert candidate_layers(12, o.layers, o.max_layers) == ["12"]  # the final block, as Table 1
    assert candidate_layers(30, "all", 4) == ["8", "15", "22", "30"]
    pair = load_config("configs/knnlm-pair.yaml").analysis.knnlm  # the pair at a size that can decide
    assert pair.sites == ["resid_mid", "block"] and candidate_layers(30, pair.layers, pair.max_layers) == ["30"]
    assert pair.datastore_tokens >= 200_000 and pair.index.kind(pair.datastore_tokens) == "ivfflat"
    assert pair.eval_windows * (pair.window - 1) >= 20_000  # scored tokens, tune and test halves
    assert len(pair.evaluation_seeds) >= 3
    zoo = load_config("configs/knnlm-zoo.yaml")  # the zoo's pair: 1M+ keys, 20k+ test tokens a sample
    z = zoo.analysis.knnlm
    assert {m.zoo for m in zoo.models} == {"gpt2-tiny", "llama-small"} and z.sites == ["resid_mid", "block"]
    assert z.datastore_tokens >= 1_000_000 and z.index.kind(z.datastore_tokens) == "ivfflat"
    assert z.eval_windows // 2 * (z.window - 1) >= 20_000 and len(z.evaluation_seeds) >= 3
    assert candidate_layers(4, z.layers, z.max_layers) == ["4"]
    assert "knnlm-zoo.yaml" in (Path("Makefile").read_text().split("\nknnlm-pair:", 1)[1].split("\n\n", 1)[0])


def test_options_are_checked():
    from dispersion.config import parse_config
    from dispersion.core.errors import ConfigError

    base = {"models": [{"name": "m", "zoo": "gpt2-tiny"}], "datasets": [{"name": "p", "embedded": "prose"}]}
    with pytest.raises(ConfigError, match=r"analysis.knnlm.sites.1: .*unknown site 'nope'"):
        parse_config({**base, "analysis": {"knnlm": {"sites": ["block", "nope"]}}})
    with pytest.raises(ConfigError, match=r"chunks: N = 100 exceeds pool_windows \(50\)"):
        parse_config({**base, "analysis": {"knnlm": {"pool_windows": 50}}})
    with pytest.raises(ConfigError, match=r"analysis.knnlm.lam"):
        parse_config({**base, "analysis": {"knnlm": {"lam": 1.0}}})
    with pytest.raises(ConfigError, match=r"analysis.knnlm.*eval_seeds: give distinct seeds \(got \[1, 1\]\)"):
        parse_config({**base, "analysis": {"knnlm": {"eval_seeds": [1, 1]}}})
    assert parse_config({**base, "analysis": {"knnlm": {"seed": 4}}}).analysis.knnlm.evaluation_seeds == [4]
    same = {"name": "x", "embedded": "prose", "split": "validation"}
    with pytest.raises(ConfigError, match=r"analysis.knnlm.evaluation: the same text as the datastore "
                                          r"\(embedded prose, split validation\): every evaluated token would "
                                          r"retrieve itself"):
        parse_config({**base, "analysis": {"knnlm": {"datastore": same, "evaluation": {**same, "name": "y"}}}})
    with pytest.raises(ConfigError, match="the same text as the datastore"):
        parse_config({**base, "analysis": {"knnlm": {"datastore": {**same, "split": "all"}}}})


def test_the_overlap_check_counts_shared_ngrams_and_refuses_the_same_text():
    """The share of evaluation n-grams found in the datastore, against a set of tuples."""
    from dispersion.analyses.knnlm import NGRAM, shared_ngrams

    rng = np.random.default_rng(0)
    store = [rng.integers(0, 500, 100) for _ in range(20)]
    evals = [rng.integers(0, 500, 100) for _ in range(10)] + [store[3][10:90], store[7]]
    grams = {tuple(w[i:i + NGRAM]) for w in store for i in range(len(w) - NGRAM + 1)}
    ev = [tuple(w[i:i + NGRAM]) for w in evals for i in range(len(w) - NGRAM + 1)]
    want = sum(g in grams for g in ev) / len(ev)
    assert shared_ngrams(store, evals) == pytest.approx(want) and 0.1 < want < 0.2
    assert shared_ngrams(store, store) == 1.0
    assert shared_ngrams(store, [np.arange(10)]) == 0.0  # shorter than an n-gram: nothing to compare


@pytest.mark.slow
def test_the_step_end_to_end(micro_zoo, tmp_path):
    """``dispersion scan`` with the knnlm step on the micro zoo: four tables (one view each),
    two figures, a report section; Table 1 rows agree with the stored last-token states."""
    from dispersion.config import parse_config
    from dispersion.measure.metrics import cosine_dispersion
    from dispersion.run import run_scan

    cfg = parse_config(scan_config_dict(micro_zoo, tmp_path, models=[
        {"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
        datasets=[{"name": "prose", "embedded": "prose", "split": "validation"}],
        sampling={"num_segments": 30, "segment_length": 32, "shard_size": 30, "seed": 3},
        analysis={"bin_size": 10, "steps": ["knnlm"], "knnlm": {
            "window": 32, "datastore_tokens": 1500, "pool_windows": 24, "eval_windows": 6, "chunks": [4, 8],
            "seeds": 3, "shard_windows": 16, "k": 64, "eval_seeds": [0, 7]}}))
    result = run_scan(cfg, progress=False, log=lambda m: None)
    store = Store(str(tmp_path))
    cands = store.read_table("results/knnlm_candidates/t.parquet").to_pylist()
    assert {(c["layer"], c["site"]) for c in cands} == {(str(b), s) for b in (1, 2)
                                                       for s in ("resid_mid", "mlp_in", "block")}
    assert all(c["k"] == 64 and c["datastore"] == 1519 and c["base_ppl"] > 1 for c in cands)
    verdict = store.read_table("results/knnlm_verdict/t.parquet").to_pylist()
    assert len(verdict) == 1 and verdict[0]["candidates"] == 6 and verdict[0]["att_more_dispersed"] is not None
    v = verdict[0]  # the pair at the tuned (lambda, T) of each key, pooled over the two evaluation samples
    pair = {c["site"]: c for c in cands if c["layer"] == "2" and c["site"] in ("resid_mid", "block")}
    samples = store.read_table("results/knnlm_pair/t.parquet").to_pylist()
    assert [(r["eval_seed"], r["primary"]) for r in samples] == [(0, True), (7, False)]
    first = samples[0]  # the primary sample's pair is the candidates' final-block pair
    assert first["pair_ppl_diff"] == pytest.approx(pair["block"]["tuned_ppl"] - pair["resid_mid"]["tuned_ppl"])
    assert first["att_tuned_ppl"] == pair["resid_mid"]["tuned_ppl"] and first["pair_tokens"] == pair["block"]["test_tokens"]
    for r in samples:
        assert r["pair_ci_low"] <= r["pair_ci_high"] and 0 < r["pair_p"] <= 1 and 1 <= r["pair_windows"] <= 6
        assert r["pair_ppl_diff"] == pytest.approx(r["ffn_tuned_ppl"] - r["att_tuned_ppl"])
    assert v["pair_samples"] == 2 and v["pair_n_boot"] == 1000 and v["pair_ci_low"] <= v["pair_ci_high"]
    assert v["pair_tokens"] == sum(r["pair_tokens"] for r in samples)
    assert v["pair_windows"] == sum(r["pair_windows"] for r in samples)
    # pooled perplexity = exp(token-weighted mean log perplexity) of the samples, per key
    n = np.array([r["pair_tokens"] for r in samples], float)
    pooled = {k: np.exp(n @ np.log([r[k] for r in samples]) / n.sum()) for k in ("att_tuned_ppl", "ffn_tuned_ppl")}
    assert v["pair_ppl_diff"] == pytest.approx(pooled["ffn_tuned_ppl"] - pooled["att_tuned_ppl"], rel=1e-9)
    claim = next(r for r in result.tables["claims"].to_pylist() if r["claim"] == "dispersed_key_is_better")
    assert claim["p"] == v["pair_p"] and claim["verdict"] in ("supported", "contradicted", "inconclusive")
    t1 = store.read_table("results/knnlm_table1/t.parquet").to_pylist()
    assert {r["layer"] for r in t1} == {"0", "1", "2", "final"}
    from dispersion.analyses.knnlm import plan, table1_draws

    p = plan(cfg, store, cfg.analysis.knnlm, log=lambda m: None)[0]
    wins = kn.read_table(store, p.eval_units, "windows")
    V = kn.vectors_of(wins, kn.last_column(("2", "resid_mid")))
    draws = table1_draws(24, [8], 3, 0)
    row = next(r for r in t1 if (r["layer"], r["site"], r["n_chunks"]) == ("2", "resid_mid", 8))
    vals = [cosine_dispersion(V[draws[(8, s)]]) for s in range(3)]
    assert row["mean"] == pytest.approx(np.mean(vals)) and row["std"] == pytest.approx(np.std(vals, ddof=1))
    assert store.exists("results/report/t/knnlm.png") and store.exists("results/report/t/knnlm_chunks.png")
    assert "Layer selection for kNN-LM" in (tmp_path / "results/report/t.md").read_text()
    from dispersion.core.catalog import query

    assert result.catalog
    for view in ("knnlm_table1", "knnlm_candidates", "knnlm_verdict", "knnlm_pair", "knnlm_chunks"):
        assert query(store, f"select count(*) as n from {view}").column("n")[0].as_py() > 0
    # the flow's path: the step's plan on the Ray runner; a shard whose marker is gone is built again, identically
    from dispersion.analyses import STEPS
    from dispersion.analyses.registry import StepContext, plan_steps
    from tasks.ray_units import run_on_ray

    before = {rel: cs for u in p.units for rel, cs in store.read_json(u.marker_rel)[CHECKSUMS].items()}
    store.remove(p.store_units[1].marker_rel)
    planned = plan_steps(STEPS, StepContext(cfg, store, [], {}, log=lambda m: None), only=["knnlm"])
    assert run_on_ray(planned["knnlm"].units, str(tmp_path), cfg.ray, log=lambda m: None).ran == 1
    assert {rel: cs for u in p.units for rel, cs in store.read_json(u.marker_rel)[CHECKSUMS].items()} == before
    # `dispersion verify` checks the kNN-LM shards too, and --repair releases a damaged one
    from dispersion.core.integrity import verify_root

    clean = verify_root(store, log=lambda m: None)
    assert clean.ok and clean.files >= len(before)
    damaged = sorted(before)[0]
    (tmp_path / damaged).write_bytes((tmp_path / damaged).read_bytes()[:-8])
    lines: list[str] = []
    check = verify_root(store, repair=True, log=lines.append)
    assert lines == [f"damaged: {damaged}: checksum mismatch (changed after it was published)"]
    assert len(check.removed) == 1 and not store.exists(check.removed[0])
