"""n-gram clusters (paper 001 section 2.3, Fig. 7): construction vs a naive reference, states vs
HF hidden states, and the checkpoint table end to end on the micro zoo."""

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from dispersion.analyses.clusters import plot_clusters, zoo_token_docs
from dispersion.measure import clusters as cl
from dispersion.measure.clusters import (CLUSTERS_SCHEMA, EMBEDDED_DEFAULTS, ClusterSpec, cluster_dispersion_table,
                                         cluster_states, find_ngram_clusters, run_clusters)
from dispersion.core.errors import ConfigError, DataError
from dispersion.measure.metrics import cluster_dispersion


# --------------------------------------------------------------------------- helpers
def _spec(**kw) -> ClusterSpec:
    base = dict(n=3, min_count=4, per_cluster=100, context=5, max_clusters=100, select="frequent", seed=0)
    base.update(kw)
    return ClusterSpec(**base)


def _naive(docs, n, M, T):
    """Dict count of every n-gram inside a document; eligible = start >= T."""
    occ = defaultdict(list)
    for d, doc in enumerate(docs):
        for s in range(len(doc) - n + 1):
            occ[tuple(int(x) for x in doc[s:s + n])].append((d, s))
    return {g: (len(o), [(d, s) for d, s in o if s >= T]) for g, o in occ.items() if len(o) >= M}


A = (1, 2, 3)   # planted with enough left context (and twice without)
B = (4, 5, 6)   # M-1 times inside documents + once across a document boundary: must not qualify
R = (7, 7, 7)   # degenerate run of one token


def _planted():
    """Random background (ids >= 100, so no accidental repeat of a planted 3-gram) + plants."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(100, 5000, size=60) for _ in range(4)]
    for d, s in [(0, 10), (0, 30), (1, 8), (2, 20), (3, 40), (1, 1), (2, 0)]:  # last two: start < T
        docs[d][s:s + 3] = A
    for d, s in [(0, 45), (1, 30), (2, 40)]:
        docs[d][s:s + 3] = B
    docs[0][-2:] = B[:2]          # B straddles docs 0 | 1
    docs[1][0] = B[2]
    for d, s in [(2, 50), (3, 10), (3, 20), (1, 50)]:
        docs[d][s:s + 3] = R
    return docs


# --------------------------------------------------------------------------- construction
def test_planted_clusters_match_naive_reference():
    docs = _planted()
    ref = _naive(docs, 3, 4, 5)
    assert set(ref) == {A, R}                       # B reaches M only across the boundary
    assert _naive(docs, 3, 3, 5).get(B, (0,))[0] == 3
    c = find_ngram_clusters(docs, _spec())
    got = {tuple(g): k for k, g in enumerate(c.ngrams.tolist())}
    assert set(got) == set(ref) and c.n_qualifying == 2
    for g, k in got.items():
        count, elig = ref[g]
        assert c.counts[k] == count and c.eligible[k] == len(elig)
        members = sorted(zip(c.doc[c.labels == k].tolist(), c.start[c.labels == k].tolist()))
        assert members == sorted(elig)
    assert c.counts[got[A]] == 7 and c.eligible[got[A]] == 5
    # frequent first
    assert list(c.counts) == sorted(c.counts, reverse=True)
    # windows: T tokens of left context, the n-gram is the continuation (anchor 'context')
    w = c.token_windows(docs)
    assert w.shape == (c.n_occurrences, 5)
    for (d, b, e), row, lab in zip(c.windows, w, c.labels):
        assert e - b == 5 and np.array_equal(docs[d][b:e], row)
        assert tuple(docs[d][e:e + 3]) == tuple(c.ngrams[lab])
    # anchor 'ngram': the window ends with the n-gram
    cn = find_ngram_clusters(docs, _spec(anchor="ngram"))
    wn = cn.token_windows(docs)
    assert wn.shape == (cn.n_occurrences, 8)
    assert all(tuple(r[-3:]) == tuple(cn.ngrams[lab]) for r, lab in zip(wn, cn.labels))
    # degenerate filter (off by default, as in the paper)
    cd = find_ngram_clusters(docs + [np.array([1, 2, 3, 9, 9, 1, 2, 3] * 3)], _spec(min_distinct=2, min_count=3))
    assert R not in {tuple(g) for g in cd.ngrams.tolist()}


def _random_corpus(seed=1, n_docs=30, vocab=12):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, 400)) for _ in range(n_docs)]


@pytest.mark.parametrize("n,M,T", [(1, 50, 0 + 1), (2, 20, 7), (3, 6, 30), (4, 3, 50)])
def test_random_corpus_matches_naive_reference(n, M, T):
    docs = _random_corpus()
    ref = {g: v for g, v in _naive(docs, n, M, T).items() if len(v[1]) >= 2}
    c = find_ngram_clusters(docs, _spec(n=n, min_count=M, context=T, max_clusters=10**6, per_cluster=10**6))
    assert c.n_qualifying == len(ref) == c.n_clusters
    for k, g in enumerate(map(tuple, c.ngrams.tolist())):
        count, elig = ref[g]
        assert c.counts[k] == count
        assert sorted(zip(c.doc[c.labels == k].tolist(), c.start[c.labels == k].tolist())) == sorted(elig)


def test_caps_and_seed_determinism():
    docs = _random_corpus(seed=2, n_docs=40)
    spec = _spec(n=3, min_count=8, context=10, max_clusters=25, per_cluster=6, select="random", seed=5)
    a, b = find_ngram_clusters(docs, spec), find_ngram_clusters(docs, spec)
    for f in ("ngrams", "counts", "eligible", "doc", "start", "labels"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert a.n_qualifying > 25 and a.n_clusters == 25                        # K
    assert (a.counts >= 8).all()                                              # M
    sizes = np.bincount(a.labels)
    assert sizes.max() <= 6 and np.array_equal(sizes, np.minimum(a.eligible, 6))  # C
    assert (a.start >= 10).all()                                              # T
    other = find_ngram_clusters(docs, spec.model_copy(update={"seed": 6}))
    assert {tuple(g) for g in other.ngrams.tolist()} != {tuple(g) for g in a.ngrams.tolist()}
    # the seed also picks the members of a cluster shared by both choices
    ref = _naive(docs, 3, 8, 10)
    g = tuple(a.ngrams[0])
    assert {(d, s) for d, s in zip(a.doc[a.labels == 0], a.start[a.labels == 0])} <= set(ref[g][1])


def test_hash_collisions_cannot_merge_clusters(monkeypatch):
    docs = _random_corpus(seed=3)
    spec = _spec(n=3, min_count=6, context=4, select="random", max_clusters=40, per_cluster=5, seed=1)
    good = find_ngram_clusters(docs, spec)
    for weak in (lambda ids, starts, n: ids[starts].astype(np.uint64),       # first token only
                 lambda ids, starts, n: np.zeros(starts.shape[0], np.uint64)):  # everything collides
        monkeypatch.setattr(cl, "_ngram_hash", weak)
        bad = find_ngram_clusters(docs, spec)
        for f in ("ngrams", "counts", "eligible", "doc", "start", "labels"):
            assert np.array_equal(getattr(bad, f), getattr(good, f)), f
        assert bad.n_qualifying == good.n_qualifying
        for k, g in enumerate(bad.ngrams):          # every member really is its cluster's n-gram
            for d, s in zip(bad.doc[bad.labels == k], bad.start[bad.labels == k]):
                assert np.array_equal(docs[d][s:s + 3], g)


def test_exact_groups_splits_a_collided_group():
    ids = np.array([1, 2, 1, 3, 1, 2, 1, 3, 9], dtype=np.int64)
    pos = np.array([0, 2, 4, 6])                     # 2-grams (1,2), (1,3), (1,2), (1,3)
    out_pos, gid = cl._exact_groups(ids, pos, np.zeros(4, np.int64), 2)
    groups = {tuple(ids[p:p + 2]) for p in out_pos}
    assert groups == {(1, 2), (1, 3)} and len(set(gid.tolist())) == 2
    for g in set(gid.tolist()):
        assert len({tuple(ids[p:p + 2]) for p in out_pos[gid == g]}) == 1


def test_bad_input_one_line_errors():
    docs = _planted()
    with pytest.raises(ValidationError):
        ClusterSpec(n=0)
    for field, value in (("n", 0), ("min_count", 1), ("context", 0), ("max_clusters", 1)):
        with pytest.raises(ConfigError, match=rf"^analysis\.clusters\.{field}: ") as err:
            find_ngram_clusters(docs, _spec().model_copy(update={field: value}))
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"^analysis\.clusters\.min_count: no 3-gram occurs >= 50 times") as err:
        find_ngram_clusters(docs, _spec(min_count=50))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"^analysis\.clusters\.min_count: "):  # only one cluster left
        find_ngram_clusters(docs, _spec(min_count=6))
    with pytest.raises(DataError, match=r"^analysis\.clusters\.n: no document has 99 tokens"):
        find_ngram_clusters([np.arange(5)], _spec(n=99))
    with pytest.raises(DataError, match=r"^analysis\.clusters\.dataset: "):
        find_ngram_clusters([], _spec())
    with pytest.raises(DataError, match=r"^analysis\.clusters\.dataset: .*negative"):
        find_ngram_clusters([np.array([1, -2, 3])], _spec())


def test_embedded_defaults_are_valid():
    assert EMBEDDED_DEFAULTS.n < ClusterSpec().n and EMBEDDED_DEFAULTS.window_length + 1 <= 256
    assert ClusterSpec().model_dump()["anchor"] == "context"  # the paper's reading


# --------------------------------------------------------------------------- states
def _load(zoo, name, rev):
    from dispersion.measure.modeling import load_model, resolve_source
    from dispersion.training.zoo import zoo_model_dir

    return load_model(resolve_source(str(zoo_model_dir(zoo.cache, name)), rev))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-small"])
def test_states_equal_plain_forward_hidden_states(micro_zoo, name):
    import torch

    model = _load(micro_zoo, name, "step20")
    n_layers = model.config.num_hidden_layers
    rng = np.random.default_rng(0)
    W = rng.integers(1, model.config.vocab_size, size=(7, 12))
    for bos in (True, False):
        got = cluster_states(model, W, [0, 1, "final"], "block", batch_size=3, prepend_bos=bos, bos_token_id=0)
        ids = torch.as_tensor(np.c_[np.zeros((7, 1), np.int64), W] if bos else W)
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hs) == n_layers + 1
        for key, ref in ((("0", "block"), hs[0]), (("1", "block"), hs[1]), (("final", "block"), hs[-1])):
            np.testing.assert_allclose(got[key], ref[:, -1].numpy(), rtol=1e-5, atol=1e-5)
        # a forward stopped after block 1 gives the same states
        early = cluster_states(model, W, 1, "block", batch_size=4, prepend_bos=bos, bos_token_id=0)
        np.testing.assert_allclose(early[("1", "block")], got[("1", "block")], rtol=1e-6, atol=1e-6)
    subs = cluster_states(model, W, 1, ["attn", "mlp"], prepend_bos=False)
    assert set(subs) == {("1", "attn"), ("1", "mlp")} and subs[("1", "mlp")].shape == (7, model.config.hidden_size)
    with pytest.raises(ConfigError, match=r"^analysis\.clusters\.layer: "):
        cluster_states(model, W, 99)
    with pytest.raises(ConfigError, match=r"^analysis\.clusters\.context: "):
        cluster_states(model, np.ones((2, 400), np.int64))
    with pytest.raises(DataError, match=r"^analysis\.clusters\.dataset: token id out of range"):
        cluster_states(model, np.full((2, 4), 10**6))


# --------------------------------------------------------------------------- end to end
SMALL = ClusterSpec(n=4, min_count=10, per_cluster=12, context=16, max_clusters=24, layer=[1, "final"], seed=0)


def test_zoo_token_docs(micro_zoo):
    from dispersion.training.zoo import token_splits

    ts = token_splits(micro_zoo.cache, micro_zoo.vocab_size)["validation"]
    docs = zoo_token_docs(micro_zoo.cache, micro_zoo.vocab_size, "validation")
    assert sum(d.size for d in docs) == ts.ids.size - int((ts.ids == 0).sum())
    assert all(d.size and not (d == 0).any() for d in docs)
    code = zoo_token_docs(micro_zoo.cache, micro_zoo.vocab_size, "validation", "code")
    assert 0 < len(code) < len(docs)
    with pytest.raises(DataError, match="^split: "):
        zoo_token_docs(micro_zoo.cache, micro_zoo.vocab_size, "nope")


def test_run_clusters_over_checkpoints(micro_zoo, tmp_path):
    from dispersion.measure.zoo_cache import zoo_revisions, zoo_train_log
    from dispersion.training.zoo import zoo_model_dir

    docs = zoo_token_docs(micro_zoo.cache, micro_zoo.vocab_size, "validation")
    c = find_ngram_clusters(docs, SMALL)
    revs = zoo_revisions(micro_zoo.cache, "gpt2-tiny")
    assert len(revs) >= 2
    models = [("gpt2-tiny", str(zoo_model_dir(micro_zoo.cache, "gpt2-tiny")), r) for r in revs]
    models.append(("llama-small", str(zoo_model_dir(micro_zoo.cache, "llama-small")), "step20"))
    table = run_clusters(models, docs, SMALL, clusters=c, dataset="validation", batch_size=64)
    assert table.schema == CLUSTERS_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == len(models) * 2                                   # one row per checkpoint x layer
    final = [r for r in rows if r["layer"] == "final"]
    assert [(r["model"], r["revision"]) for r in final] == [(m, r) for m, _, r in models]
    log = {c["step"]: c["train_loss"] for c in zoo_train_log(micro_zoo.cache, "gpt2-tiny")["checkpoints"]}
    for r in rows:
        assert r["n_clusters"] == 24 and r["n"] == 4 and r["site"] == "block" and r["anchor"] == "context"
        for k in ("within", "between", "ratio", "within_euclidean", "between_euclidean", "train_loss", "val_loss"):
            assert np.isfinite(r[k]) and r[k] > 0, k
        assert r["ratio"] == pytest.approx(r["between"] / r["within"])
        if r["model"] == "gpt2-tiny":
            assert r["train_loss"] == pytest.approx(log[r["step"]])
    by_step = {r["step"]: r for r in final if r["model"] == "gpt2-tiny"}
    assert by_step[0]["train_loss"] > by_step[max(by_step)]["train_loss"]
    # the table's numbers are metrics.cluster_dispersion of the states at the window ends
    model = _load(micro_zoo, "gpt2-tiny", revs[-1])
    st = cluster_states(model, c.token_windows(docs), "final", "block", prepend_bos=True)
    w, b = cluster_dispersion(st[("final", "block")], c.labels)
    assert by_step[max(by_step)]["within"] == pytest.approx(w, rel=1e-9)
    assert by_step[max(by_step)]["between"] == pytest.approx(b, rel=1e-9)
    one = cluster_dispersion_table("x", "main", st, c)
    assert one.num_rows == 1 and one.column("step").to_pylist() == [None]
    assert one.column("train_loss").to_pylist() == [None]
    png = plot_clusters(table, tmp_path / "fig" / "clusters.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    empty = run_clusters([], docs, SMALL)  # finds its own clusters
    assert isinstance(empty, pa.Table) and empty.num_rows == 0 and empty.schema == CLUSTERS_SCHEMA
