"""The hardness step (paper 001 Sec. 3.1, B.1.2-B.1.4): query-set readers on lm-eval's real
format, the embedded cloze against a naive forward per (context, choice), slices, Spearman,
calibration MAE and per-example scores against naive recomputations, and the step end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reference as naive  # the naive float64 references (tests/reference.py)
from conftest import scan_config_dict, tiny_gpt2, tiny_llama
from scipy.stats import spearmanr

from dispersion.analyses.hardness import (
    HardnessOptions,
    Signal,
    calibrate,
    controlled_slices,
    fitting_size,
    fraction_grid,
    hardness_tables,
    mixed_slice,
    rank_scores,
)
from dispersion.core.errors import DataError
from dispersion.measure.metrics import cosine_dispersion, mean_cosine_distance_to_rest
from dispersion.measure.answering import answer_cloze
from dispersion.measure.cloze import Cloze, build_cloze
from dispersion.measure.query_sources import QUERY_SCHEMA, read_lm_eval_samples, read_query_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LM_EVAL = Path(__file__).parent / "data" / "lm_eval"  # written by lm-eval 0.4.13: bench/lm_eval_samples.py
CLOZE_LOG = next(LM_EVAL.glob("samples_py_cloze_*.jsonl"))
GEN_LOG = next(LM_EVAL.glob("samples_py_gen_*.jsonl"))


# --------------------------------------------------------------------------- query sets
def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_lm_eval_reader_on_logs_written_by_lm_eval():
    raw = _lines(CLOZE_LOG)
    for metric in ("acc", "acc_norm"):
        t = read_lm_eval_samples([str(CLOZE_LOG)], metric=metric)
        assert t.schema == QUERY_SCHEMA
        assert t.column("query_id").to_pylist() == [f"py_cloze/{r['doc_id']}" for r in raw]
        assert t.column("text").to_pylist() == [r["arguments"]["gen_args_0"]["arg_0"] for r in raw]
        assert t.column("correct").to_pylist() == [r[metric] == 1.0 for r in raw]
        assert set(t.column("task").to_pylist()) == {"py_cloze"}
    acc = read_lm_eval_samples([str(CLOZE_LOG)]).column("correct").to_pylist()
    norm = read_lm_eval_samples([str(CLOZE_LOG)], metric="acc_norm").column("correct").to_pylist()
    assert acc != norm  # the log holds documents where the two metrics disagree: the option matters
    # a generation task logged under two filters: one line per (document, filter)
    with pytest.raises(DataError, match="several filters .*strict.*first_word"):
        read_lm_eval_samples([str(GEN_LOG)], metric="exact_match")
    gen = read_lm_eval_samples([str(GEN_LOG)], metric="exact_match", filter="first_word")
    assert gen.num_rows == 6 and gen.column("query_id").to_pylist()[0] == "py_gen/0"
    with pytest.raises(DataError, match=r"no metric 'acc' \(logged: exact_match\)"):
        read_lm_eval_samples([str(GEN_LOG)], filter="strict")
    # a folder is searched recursively for samples_*.jsonl (here: both tasks, one without acc)
    with pytest.raises(DataError, match="no metric 'acc'"):
        read_lm_eval_samples([str(LM_EVAL)])


def test_lm_eval_reader_on_lm_evals_own_writer(tmp_path):
    """Samples in the evaluator's structure (lm_eval/evaluator.py), written by lm-eval's own
    ``EvaluationTracker`` in the order its CLI calls it."""
    pytest.importorskip("lm_eval")
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import hash_string

    docs = [("Q: 2 + 2 =", [" 4", " 5"], 0, [-1.0, -3.0]), ("Q: sky colour", [" red", " blue"], 1, [-0.5, -2.0])]
    samples = []
    for i, (ctx, choices, gold, lls) in enumerate(docs):
        acc = float(int(np.argmax(lls)) == gold)
        samples.append({"doc_id": i, "doc": {"q": ctx, "choices": choices, "gold": gold}, "target": gold,
                        "arguments": [(ctx, " " + c) for c in choices],
                        "resps": [[(str(ll), False)] for ll in lls], "filtered_resps": [(str(ll), False) for ll in lls],
                        "filter": "none", "metrics": ["acc"], "doc_hash": hash_string(ctx),
                        "prompt_hash": hash_string(ctx), "target_hash": hash_string(str(gold)), "acc": acc})
    tracker = EvaluationTracker(output_path=str(tmp_path))
    tracker.save_results_aggregated(results={"results": {}, "configs": {"toy_mc": {}}}, samples={"toy_mc": samples})
    tracker.save_results_samples(task_name="toy_mc", samples=samples)
    t = read_lm_eval_samples([str(tmp_path)])
    assert t.column("query_id").to_pylist() == ["toy_mc/0", "toy_mc/1"]
    assert t.column("text").to_pylist() == [d[0] for d in docs]
    assert t.column("correct").to_pylist() == [True, False]


def test_query_table_reader(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text('query_id,text,correct,slice\na,"What is 2+2?",1,math\nb,Who wrote it?,false,lit\n')
    t = read_query_table(str(csv))
    assert t.column("correct").to_pylist() == [True, False]
    assert t.column("task").to_pylist() == ["mine", "mine"] and t.column("slice").to_pylist() == ["math", "lit"]
    pq.write_table(pa.table({"query_id": ["x", "y"], "text": ["t1", "t2"], "correct": [True, True],
                             "task": ["k", "k"]}), tmp_path / "q.parquet")
    assert read_query_table(str(tmp_path / "q.parquet")).column("task").to_pylist() == ["k", "k"]
    (tmp_path / "bad.csv").write_text("query_id,text\na,b\n")
    with pytest.raises(DataError, match="missing column"):
        read_query_table(str(tmp_path / "bad.csv"))
    (tmp_path / "dup.csv").write_text("query_id,text,correct\na,b,1\na,c,0\n")
    with pytest.raises(DataError, match="appears twice"):
        read_query_table(str(tmp_path / "dup.csv"))


# --------------------------------------------------------------------------- the cloze
@pytest.mark.parametrize("make", [lambda: tiny_gpt2(100, 0), lambda: tiny_llama(100, 1)], ids=["gpt2", "llama"])
@pytest.mark.parametrize("bos", [True, False])
def test_cloze_answers_equal_a_naive_forward_per_context_and_choice(make, bos):
    import torch

    from dispersion.measure.extract import Extractor

    model = make()
    rng = np.random.default_rng(0)
    N, T, C, K = 7, 10, 4, 3
    ctx, opts, ans = rng.integers(1, 100, (N, T)), rng.integers(1, 100, (N, C, K)), rng.integers(0, C, N)
    queries = pa.table({"query_id": [str(i) for i in range(N)], "text": ["x"] * N, "correct": pa.nulls(N, pa.bool_()),
                        "task": ["t"] * N, "slice": pa.nulls(N, pa.string())}, schema=QUERY_SCHEMA)
    got = answer_cloze(model, Cloze(queries, ctx, opts, ans), layers=(1, "final"), pools=("last", "mean"),
                       prepend_bos=bos, batch_size=3)
    want = np.zeros((N, C))
    with torch.no_grad():
        for i in range(N):
            for c in range(C):  # the whole sequence, one (context, choice) at a time, no cache
                ids = ([model.config.bos_token_id] if bos else []) + list(ctx[i]) + list(opts[i, c])
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                want[i, c] = sum(lp[len(ids) - K - 1 + k, opts[i, c, k]].item() for k in range(K))
    np.testing.assert_allclose(got.loglik, want, atol=1e-4)
    assert (got.chosen == want.argmax(1)).all() and (got.correct == (want.argmax(1) == ans)).all()
    # the same context pass gives what the scan's extractor gives on the contexts alone
    ex = Extractor(model, layers=(1, "final"), pools=("last", "mean"), prepend_bos=bos,
                   bos_token_id=model.config.bos_token_id, batch_size=4).extract(list(ctx))
    np.testing.assert_allclose(got.ppl, ex.features["ppl"], rtol=1e-5)
    for key, v in ex.vectors.items():
        np.testing.assert_allclose(got.vectors[key].astype(np.float16), v, rtol=2e-3, atol=2e-3)
    for key, w in ex.within.items():
        np.testing.assert_allclose(got.within[key], w, atol=1e-5)


def test_build_cloze_on_the_embedded_corpus(micro_zoo):
    from transformers import AutoTokenizer

    from dispersion.measure.corpus import embedded_documents

    tok = AutoTokenizer.from_pretrained(str(Path(micro_zoo.cache) / "tokenizer"))
    docs = embedded_documents("code", "validation")[:40]
    cz = build_cloze(docs, tok, name="cloze-code", context=12, continuation=4, choices=4, n=40, seed=1)
    assert cz.contexts.shape == (40, 12) and cz.options.shape == (40, 4, 4)
    again = build_cloze(docs, tok, name="cloze-code", context=12, continuation=4, choices=4, n=40, seed=1)
    assert (again.options == cz.options).all() and (again.answer == cz.answer).all()  # seeded
    by_id = {d.doc_id: d.text for d in docs}
    conts = {}
    for qid, ctx, opts, a in zip(cz.queries.column("query_id").to_pylist(), cz.contexts, cz.options, cz.answer):
        doc, off = qid.split("/", 1)[1].rsplit("@", 1)
        ids = tok(by_id[doc], add_special_tokens=False)["input_ids"]
        off = int(off)
        assert list(ctx) == ids[off:off + 12] and list(opts[a]) == ids[off + 12:off + 16]  # the true continuation
        assert len({tuple(o) for o in opts}) == 4  # distinct options
        conts[qid] = (doc, tuple(opts[a]))
    for qid, opts, a in zip(cz.queries.column("query_id").to_pylist(), cz.options, cz.answer):
        doc = conts[qid][0]
        for c, o in enumerate(opts):  # every distractor is another document's continuation
            if c != a:
                assert any(d != doc and t == tuple(o) for d, t in conts.values())


def test_nearby_starts_against_a_naive_enumeration():
    from dispersion.measure.cloze import nearby_starts

    for start, T, K, length in [(0, 4, 2, 30), (20, 4, 2, 30), (10, 3, 3, 19), (6, 5, 1, 12), (0, 4, 2, 6)]:
        true = start + T
        free = [s for s in range(length - K + 1) if (s > true and (s - true) % K == 0)
                or (s + K <= start and (start - s) % K == 0)]  # K-spans off the context and the true span
        # nearest first, after before before at equal rank: rank j for true + jK and for start - jK
        rank = lambda s: ((s - true) // K if s > true else (start - s) // K, s < true)  # noqa: E731
        naive = sorted(free, key=rank)
        for count in range(len(free) + 2):
            assert nearby_starts(start, T, K, length, count) == naive[:count]


def test_same_document_distractors_are_the_nearest_spans_of_the_query_document(micro_zoo):
    from transformers import AutoTokenizer

    from dispersion.measure.cloze import nearby_starts
    from dispersion.measure.corpus import embedded_documents

    tok = AutoTokenizer.from_pretrained(str(Path(micro_zoo.cache) / "tokenizer"))
    docs = embedded_documents("prose", "validation")[:40]
    cz = build_cloze(docs, tok, name="near", context=8, continuation=3, choices=5, n=60, seed=2,
                     distractors="same_document")
    assert cz.options.shape == (60, 5, 3)
    by_id = {d.doc_id: d.text for d in docs}
    for qid, ctx, opts, a in zip(cz.queries.column("query_id").to_pylist(), cz.contexts, cz.options, cz.answer):
        doc, off = qid.split("/", 1)[1].rsplit("@", 1)
        ids, off = tok(by_id[doc], add_special_tokens=False)["input_ids"], int(off)
        assert list(ctx) == ids[off:off + 8] and list(opts[a]) == ids[off + 8:off + 11]
        spans: list[tuple] = []  # the nearest distinct spans, naive: walk every start in order
        for s in nearby_starts(off, 8, 3, len(ids), len(ids)):
            span = tuple(ids[s:s + 3])
            if span != tuple(opts[a]) and span not in spans:
                spans.append(span)
        assert sorted(tuple(o) for c, o in enumerate(opts) if c != a) == sorted(spans[:4])
    with pytest.raises(DataError, match="with room for the distractors"):
        build_cloze(docs[:1], tok, name="near", context=8, continuation=3, choices=5, n=10**6,
                    distractors="same_document")


# --------------------------------------------------------------------------- slices
def test_slices_have_exactly_the_requested_mix():
    rng0 = np.random.default_rng(3)
    correct = rng0.random(300) < 0.4
    S = 50
    for f in fraction_grid(10):
        rng = np.random.default_rng([7, 0])
        idx = mixed_slice(correct, f, S, rng)
        assert len(idx) == S == len(set(idx.tolist()))  # without replacement
        assert correct[idx].sum() == round(f * S)
        assert (mixed_slice(correct, f, S, np.random.default_rng([7, 0])) == idx).all()  # deterministic per seed
    assert fitting_size(correct, 1000) == min(correct.sum(), (~correct).sum())
    with pytest.raises(DataError, match="needs 200 correct"):
        mixed_slice(correct, 1.0, 200, np.random.default_rng(0))
    assert fraction_grid(10).tolist() == [i / 10 for i in range(11)] and len(fraction_grid(2)) == 51


def _synthetic(n=600, d=24, seed=0, acc=0.5):
    """Correct queries spread over the sphere, incorrect ones bunched near one direction: a
    slice's dispersion rises monotonically with its fraction correct."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < acc
    X = rng.normal(size=(n, d))
    X[~correct] = 0.25 * X[~correct] + 3.0 * np.eye(d)[0]
    ppl = rng.lognormal(3.0, 0.3, n)
    return X.astype(np.float16).astype(np.float64), ppl, correct  # as stored: float16


def test_controlled_slices_and_spearman_equal_a_naive_recomputation():
    X, ppl, correct = _synthetic()
    S, R, seed = 40, 3, 5
    fr = fraction_grid(10)
    sl = controlled_slices(Signal(vectors=X), ppl, correct, fractions=fr, size=S, seeds=R, seed=seed)
    pos, neg = np.flatnonzero(correct), np.flatnonzero(~correct)
    disp, mp = np.empty((len(fr), R)), np.empty((len(fr), R))
    for r in range(R):  # the documented protocol, written out: seed r draws every fraction in order
        rng = np.random.default_rng([seed, r])
        for i, f in enumerate(fr):
            k = int(round(f * S))
            idx = np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, S - k, replace=False)])
            disp[i, r], mp[i, r] = naive.dispersion(X[idx]), ppl[idx].mean()
    np.testing.assert_allclose(sl.dispersion, disp, rtol=1e-10)
    np.testing.assert_allclose(sl.ppl, mp, rtol=1e-12)
    # the published rows: means, standard errors and Spearman
    opts = HardnessOptions(slice_size=S, seeds=R, seed=seed, calibration=False)
    table = _measured_table(X, ppl, correct)
    tables, _ = hardness_tables([("m", "main", "qs", table)], opts, log=lambda m: None)
    rows = tables["hardness_slices"].to_pylist()
    assert [r["fraction"] for r in rows] == fr.tolist() and {r["slice_size"] for r in rows} == {S}
    for i, r in enumerate(rows):
        assert r["dispersion"] == pytest.approx(disp[i].mean(), rel=1e-6)
        assert r["dispersion_se"] == pytest.approx(disp[i].std(ddof=1) / math.sqrt(R), rel=1e-6)
        assert r["ppl"] == pytest.approx(mp[i].mean(), rel=1e-9)
    sp = {r["signal"]: r for r in tables["hardness_spearman"].to_pylist()}
    for signal, values in (("dispersion", disp), ("perplexity", mp)):
        want = spearmanr(fr, values.mean(1))
        assert sp[signal]["spearman_r"] == pytest.approx(want[0]) and sp[signal]["spearman_p"] == pytest.approx(want[1])
        want_all = spearmanr(np.repeat(fr, R), values.reshape(-1))
        assert sp[signal]["spearman_slices_r"] == pytest.approx(want_all[0])
    assert sp["dispersion"]["spearman_r"] == pytest.approx(1.0)  # the synthetic curve is monotone
    # permutation p: relabel the pool as permutation_p does, draw the slices again, count |rho| >= observed
    P = opts.permutations
    perm_rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(P):
        labels = perm_rng.permutation(correct)
        sl_p = controlled_slices(Signal(vectors=X), ppl, labels, fractions=fr, size=S, seeds=R, seed=seed)
        hits += abs(spearmanr(fr, sl_p.dispersion.mean(1))[0]) >= 1.0 - 1e-12
    assert sp["dispersion"]["n_perm"] == P
    assert sp["dispersion"]["perm_p"] == pytest.approx((1 + hits) / (1 + P))
    assert sp["dispersion"]["perm_p"] < 0.05  # a real signal survives relabelling


def _measured_table(X, ppl, correct, within=None):
    """A table shaped like :func:`dispersion.measure.queries.read_measured`' output."""
    from dispersion.core.storage import vector_column

    n = len(correct)
    cols = {"query_id": [f"q{i}" for i in range(n)], "task": ["t"] * n, "slice": pa.nulls(n, pa.string()),
            "correct": pa.array(correct.astype(bool)), "ppl": pa.array(ppl, pa.float64()),
            "vec/final/block/last": vector_column(X.astype(np.float16))}
    if within is not None:
        cols["within/final/block"] = pa.array(within, pa.float32())
    return pa.table(cols)


def test_too_few_labels_shrink_the_slice_and_say_so():
    X, ppl, correct = _synthetic(n=200, acc=0.9, seed=2)
    lines = []
    tables, _ = hardness_tables([("m", "main", "qs", _measured_table(X, ppl, correct))],
                                HardnessOptions(slice_size=100, seeds=2, calibration=False), log=lines.append)
    S = int((~correct).sum())
    assert {r["slice_size"] for r in tables["hardness_slices"].to_pylist()} == {S} and S < 100
    assert any(f"slices of {S} instead of 100" in line for line in lines)


def test_calibration_on_a_known_curve_and_on_shuffled_labels():
    X, _, correct = _synthetic(n=3000, d=64, seed=1)
    sig = Signal(vectors=X)
    maes, consts = [], []
    for s in range(3):
        cal = calibrate(sig, correct, seed=s, size=100)
        # the MAE in percentage points, computed here from the predictions
        assert cal.mae == pytest.approx(np.mean(np.abs(cal.apply(cal.test_x) - cal.test_y)) * 100)
        assert cal.test_mae["constant"] == pytest.approx(np.mean(np.abs(cal.constant - cal.test_y)) * 100)
        assert cal.chosen == min(cal.val_mae, key=lambda r: (cal.val_mae[r], list(cal.val_mae).index(r)))
        maes.append(cal.mae)
        consts.append(cal.test_mae["constant"])
    assert np.mean(maes) < 4.0 < 20.0 < np.mean(consts)  # a monotone curve is recovered
    shuffled = np.random.default_rng(0).permutation(correct)
    sh = [calibrate(sig, shuffled, seed=s, size=100) for s in range(3)]
    assert np.mean([c.mae for c in sh]) >= 0.8 * np.mean([c.test_mae["constant"] for c in sh])  # no better
    # shuffle=True is that baseline, drawn inside (seeded per seed), and the whole-test numbers are the parts'
    inside = [calibrate(sig, correct, seed=s, size=100, shuffle=True) for s in range(3)]
    assert np.mean([c.mae for c in inside]) >= 0.8 * np.mean([c.test_mae["constant"] for c in inside]) > 15
    for s, c in enumerate(inside):
        labels = np.random.default_rng([0, 0x5F1E, s]).permutation(correct)
        perm = np.random.default_rng([0, 0xCA1, s]).permutation(correct.size)
        n_cal, n_val = round(0.2 * correct.size), round(0.1 * correct.size)
        assert c.natural[0] == pytest.approx(labels[perm[n_cal + n_val:]].mean())
        assert c.natural_constant == pytest.approx(labels[perm[:n_cal]].mean())


def test_shift_applies_one_sets_calibration_to_another():
    X1, p1, c1 = _synthetic(n=800, seed=3)
    X2, p2, c2 = _synthetic(n=800, seed=4)
    opts = HardnessOptions(slice_size=50, seeds=2, calibration_seeds=2, regressors=["linear", "isotonic"])
    tables, results = hardness_tables([("m", "main", "a", _measured_table(X1, p1, c1)),
                                       ("m", "main", "b", _measured_table(X2, p2, c2))], opts, log=lambda m: None)
    shift = {(r["fit_on"], r["applied_to"]): r for r in tables["hardness_shift"].to_pylist()}
    assert set(shift) == {("a", "b"), ("b", "a")}
    ra, rb = (next(r for r in results if r.queryset == q) for q in ("a", "b"))
    want = np.mean([np.mean(np.abs(ca.apply(cb.test_x) - cb.test_y)) * 100
                    for ca, cb in zip(ra.calibrations, rb.calibrations)])
    assert shift[("a", "b")]["mae"] == pytest.approx(want)
    assert shift[("a", "b")]["mae_in_domain"] == pytest.approx(np.mean([c.mae for c in rb.calibrations]))
    chosen = {r["regressor"] for r in tables["hardness_calibration"].to_pylist()}
    assert len(tables["hardness_calibration"]) == 4 and chosen <= {"linear", "isotonic"}
    for row in tables["hardness_calibration"].to_pylist():  # the whole-test errors from the row's own numbers
        assert row["test_error"] == pytest.approx(100 * abs(row["test_predicted"] - row["test_accuracy"]))
        assert 0 <= row["test_error_constant"] < 15 and row["mae_shuffled"] > 0 and row["test_error_shuffled"] >= 0


# --------------------------------------------------------------------------- per-example scores
def test_mean_distance_to_the_rest_equals_the_naive_matrix():
    X = np.random.default_rng(0).normal(size=(37, 9)) + 0.5
    D = naive.distance_matrix(X, X, "cosine")
    want = (D.sum(1) - np.diag(D)) / (len(X) - 1)
    got = mean_cosine_distance_to_rest(X)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got.mean() == pytest.approx(cosine_dispersion(X), abs=1e-12)


def test_rank_scores_against_pair_counting():
    rng = np.random.default_rng(1)
    correct = rng.random(200) < 0.6
    score = rng.normal(size=200) + correct * 0.8  # higher for correct answers: low flags wrong
    got = rank_scores(score, correct, flag="low", tail=0.1)
    wrong, right = score[~correct], score[correct]
    pairs = (wrong[:, None] < right[None, :]).sum() + 0.5 * (wrong[:, None] == right[None, :]).sum()
    assert got["auroc"] == pytest.approx(pairs / (wrong.size * right.size))  # P(a wrong one scores lower)
    k = 20
    assert got["tail_n"] == k and got["tail_error_rate"] == pytest.approx((~correct[np.argsort(score)[:k]]).mean())
    high = rank_scores(-score, correct, flag="high", tail=0.1)
    assert high["auroc"] == pytest.approx(got["auroc"]) and high["error_rate"] == pytest.approx((~correct).mean())
    assert rank_scores(score, np.ones(200, bool), flag="low")["auroc"] is None


# --------------------------------------------------------------------------- the step
def test_step_end_to_end_on_the_micro_zoo(micro_zoo, tmp_path):
    from dispersion.analyses import STEPS, StepContext
    from dispersion.analyses.registry import run_steps
    from dispersion.config import parse_config
    from dispersion.core.catalog import build_catalog, query
    from dispersion.measure.units import run_units
    from dispersion.core.storage import Store

    table = tmp_path / "answers.csv"
    table.write_text("query_id,text,correct\n" + "".join(
        f"q{i},def f{i}(x): return x + {i},{int(i % 3 == 0)}\n" for i in range(24)))
    cfg = parse_config(scan_config_dict(micro_zoo, tmp_path / "root", analysis={"steps": ["hardness"], "hardness": {
        "query_sets": [{"kind": "embedded_cloze", "domain": "prose", "split": "test", "context": 16,
                        "continuation": 4, "n": 200},
                       {"kind": "embedded_cloze", "domain": "code", "split": "test", "context": 16,
                        "continuation": 4, "n": 200},
                       {"kind": "lm_eval", "paths": [str(CLOZE_LOG)], "model": "gpt2-tiny", "revision": "step20"},
                       {"kind": "table", "path": str(table), "model": "llama-small"}],
        "slice_size": 20, "seeds": 3, "calibration_seeds": 2, "shard_size": 25, "layers": [1, "final"],
        "scopes": ["across", "within"], "regressors": ["linear", "poly2", "isotonic"]}}))  # forest: above
    store = Store(str(tmp_path / "root"))
    lines: list[str] = []
    run_steps(STEPS, StepContext(cfg, store, [], {}, log=lines.append, runner=run_units), only=["hardness"])
    for name in STEPS["hardness"].tables:
        assert store.exists(f"results/{name}/t.parquet"), name
    assert store.exists("results/report/t/hardness.png")
    read = {name: pq.read_table(store.path(f"results/{name}/t.parquet")).to_pylist()
            for name in STEPS["hardness"].tables}
    sets = {(r["model"], r["revision"], r["queryset"]) for r in read["hardness_queries"]}
    assert sets == {("gpt2-tiny", "step20", "cloze-prose"), ("gpt2-tiny", "step20", "cloze-code"),
                    ("llama-small", "step20", "cloze-prose"), ("llama-small", "step20", "cloze-code"),
                    ("gpt2-tiny", "step20", "py_cloze"), ("llama-small", "step20", "answers")}
    # the lm-eval labels are the log's, the cloze labels the model's own answers (stored shards)
    lm = [r for r in read["hardness_queries"] if r["queryset"] == "py_cloze" and r["layer"] == "final"
          and r["scope"] == "across"]
    assert [r["correct"] for r in lm] == [r["acc"] == 1.0 for r in _lines(CLOZE_LOG)]
    shards = pq.read_table(store.path("queries/model=gpt2-tiny/revision=step20/queryset=cloze-code")).to_pylist()
    assert len(shards) == 200 and all(r["chosen"] == int(np.argmax(r["loglik"])) for r in shards)
    mine = {r["query_id"]: r["correct"] for r in read["hardness_queries"] if r["queryset"] == "cloze-code"
            and r["model"] == "gpt2-tiny" and r["layer"] == "final" and r["scope"] == "across"}
    assert mine == {r["query_id"]: r["correct"] for r in shards}
    assert {(r["layer"], r["scope"]) for r in read["hardness_slices"]} == {
        ("1", "across"), ("final", "across"), ("1", "within"), ("final", "within")}
    assert any("py_cloze" in line and "slices of" in line for line in lines)  # 3 of 12 correct: S shrinks
    assert {(r["fit_on"], r["applied_to"]) for r in read["hardness_shift"] if r["model"] == "gpt2-tiny"} == {
        ("cloze-prose", "cloze-code"), ("cloze-code", "cloze-prose")}
    # a rerun reads the stored shards: no model runs again
    again: list[str] = []
    run_steps(STEPS, StepContext(cfg, store, [], {}, log=again.append, runner=run_units), only=["hardness"])
    assert not any("measured" in line for line in again) and any("measured" in line for line in lines)
    assert pq.read_table(store.path("results/hardness_slices/t.parquet")).to_pylist() == read["hardness_slices"]
    build_catalog(store)
    n = query(store, "SELECT count(*) AS n FROM hardness_spearman").to_pylist()[0]["n"]
    assert n == len(read["hardness_spearman"]) > 0
    # query shards carry checksummed markers: `dispersion verify` sees a damaged one, a rerun redoes it only
    from dispersion.core.integrity import verify_root

    shard = sorted(store.glob("queries/model=gpt2-tiny/*/queryset=cloze-code/*/*/shard-*.parquet"))[1]
    assert verify_root(store, log=lambda m: None).ok
    with open(store.path(shard), "ab") as fh:
        fh.write(b"x")
    assert [d.path for d in verify_root(store, log=lambda m: None).damaged] == [shard]
    third: list[str] = []
    run_steps(STEPS, StepContext(cfg, store, [], {}, log=third.append, runner=run_units), only=["hardness"])
    measured = [line.split(" in ")[0] for line in third if "measured" in line]
    assert len(measured) == 1 and re.fullmatch(r"analysis hardness: measured 1 of \d+ units \(25 queries\)",
                                               measured[0]), third
    assert any(shard in line and "recomputing gpt2-tiny@step20 cloze-code shard 1" in line for line in third), third
    assert pq.read_table(store.path("results/hardness_slices/t.parquet")).to_pylist() == read["hardness_slices"]
    # the flow's path: a shard whose marker is gone is measured again by a Ray task, identically
    from dispersion.analyses.registry import plan_steps
    from dispersion.core.layout import QUERY_MARKERS
    from tasks.ray_units import run_on_ray

    before = {m: store.read_json(m)["checksums"] for m in store.glob(QUERY_MARKERS)}
    gone = next(m for m in sorted(before) if "model=llama-small" in m and "queryset=answers" in m)
    store.remove(gone)
    planned = plan_steps(STEPS, StepContext(cfg, store, [], {}, log=lambda m: None), only=["hardness"])
    stats = run_on_ray(planned["hardness"].units, str(tmp_path / "root"), cfg.ray, log=lambda m: None)
    assert stats.ran == 1 and stats.skipped == len(planned["hardness"].units) - 1  # only the shard whose marker is gone
    assert {m: store.read_json(m)["checksums"] for m in store.glob(QUERY_MARKERS)} == before
    # without a runner the step refuses a plan whose shards are not all published
    store.remove(gone)
    with pytest.raises(DataError, match=r"analysis hardness: 1 of \d+ units are not measured \(first: llama-small"):
        run_steps(STEPS, StepContext(cfg, store, [], {}, log=lambda m: None), only=["hardness"])
