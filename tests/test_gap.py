"""Dispersion gap from the output embedding matrix (paper 001 §3.2, B.2.1): statistics against
a naive reference, tied / untied / sharded safetensors reads, token-set mapping, the micro zoo
end to end, ranking, Spearman against scores, bad score files, the plot."""

import builtins
import keyword

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import exact_p
import reference as naive
import torch
from scipy.stats import spearmanr

from dispersion.analyses.gap import plot_gap, rank_models, read_scores, spearman_vs_scores
from dispersion.core.errors import DataError, ModelError
from dispersion.measure import gap as gapmod
from dispersion.measure import modeling
from dispersion.measure.gap import (
    DIGITS,
    EVERYDAY,
    GAP_SCHEMA,
    PYTHON_KEYWORDS,
    GapSpec,
    TokenSetSpec,
    gap_rows,
    gap_stats,
    map_token_set,
    measure_gap,
)
from dispersion.measure.modeling import read_output_embeddings, resolve_source
from dispersion.training.zoo import zoo_model_dir

slow = pytest.mark.slow  # uses the micro zoo


# --------------------------------------------------------------------------- naive reference (tests/reference.py)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_gap_stats_equal_a_naive_reference(metric):
    rng = np.random.default_rng(7)
    for trial in range(3):
        E = rng.normal(size=(300, 24)) * rng.uniform(0.5, 3.0, size=(300, 1)) + rng.normal(size=24)
        t = rng.choice(300, size=12 + trial, replace=False)
        r = rng.choice(300, size=40 + 5 * trial, replace=False)  # may overlap with t
        s = gap_stats(E, t, r, metric)
        (w, w_se), (rw, rw_se), (b, b_se) = naive.gap_stats(E, t, r, metric)
        got = [s.result.within_domain, s.result.within_reference, s.result.between, s.result.gap,
               s.within_se, s.reference_within_se, s.between_se]
        want = [w, rw, b, w + b, w_se, rw_se, b_se]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        assert (s.result.n_domain, s.result.n_reference) == (len(t), len(r))


def test_gap_stats_small_chunks_and_torch_inputs(monkeypatch):
    rng = np.random.default_rng(3)
    E = rng.normal(size=(120, 16))
    t, r = np.arange(0, 30), np.arange(40, 100)
    ref = gap_stats(E, t, r, "euclidean")
    # the SE of many pairs, computed in blocks of 7 rows, is the same
    monkeypatch.setattr(gapmod._pair_se, "__defaults__", (7,))
    blocked = gap_stats(E, t, r, "euclidean")
    assert blocked.between_se == pytest.approx(ref.between_se, rel=1e-10)
    assert blocked.within_se == pytest.approx(ref.within_se, rel=1e-10)
    # a torch matrix (bf16 included) is gathered row-wise and gives the numbers of its values
    for dtype in (torch.float32, torch.bfloat16):
        T = torch.tensor(E, dtype=dtype)
        got = gap_stats(T, t, r, "cosine")
        want = gap_stats(T.double().numpy(), t, r, "cosine")
        assert got.result.gap == pytest.approx(want.result.gap, rel=1e-12)
        assert got.between_se == pytest.approx(want.between_se, rel=1e-9)


def test_gap_stats_errors():
    E = np.ones((10, 4)) + np.eye(10, 4)
    with pytest.raises(ValueError, match="out of range"):
        gap_stats(E, [0, 1], [2, 10])
    with pytest.raises(ValueError, match="at least 2 ids"):
        gap_stats(E, [0], [2, 3])


# --------------------------------------------------------------------------- built-in sets
def test_builtin_sets():
    assert DIGITS == tuple("0123456789")
    assert PYTHON_KEYWORDS == tuple(keyword.kwlist)
    assert 300 <= len(EVERYDAY) <= 500 and len(set(EVERYDAY)) == len(EVERYDAY)
    assert all(w.isalpha() and w.islower() for w in EVERYDAY)
    numbers = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
               "hundred", "thousand", "million", "half", "plus", "minus", "sum", "total", "count",
               "number", "equal", "double", "square", "circle"}
    clash = set(EVERYDAY) & (set(keyword.kwlist) | set(dir(builtins)) | set(DIGITS) | numbers)
    assert not clash


# --------------------------------------------------------------------------- token mapping
class _SentencePieceLike:
    """encode puts a bare '▁' (id 1) before a word that lacks its own '▁word' token."""

    vocab = {"<unk>": 0, "▁": 1, "5": 2, "7": 3, "▁the": 4, "▁dog": 5, "d": 6, "og": 7}
    unk_token_id = 0

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        word = text.strip()
        if "▁" + word in self.vocab:
            return [self.vocab["▁" + word]]
        if word in self.vocab:
            return [1, self.vocab[word]]
        if word == "cat":
            return [0]
        return [1, 6, 7]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids).replace("▁", " ")


def test_mapping_drops_a_bare_leading_space_token_and_multi_token_words():
    ts = map_token_set(_SentencePieceLike(), ["5", "7", "the", "dog", "dogs", "cat", "5"], "mixed")
    assert ts.ids == (2, 3, 4, 5)  # '▁'+'5' counts as '5'; 'dogs' is 3 tokens; 'cat' is <unk>
    assert ts.kept == ("5", "7", "the", "dog") and ts.dropped == ("dogs", "cat")
    assert ts.describe() == "mixed: 4 of 6 words -> 4 token ids"
    with pytest.raises(DataError, match=r"^token set 'x': 0 of its 2 words"):
        map_token_set(_SentencePieceLike(), ["dogs", "cat"], "x")


@slow
def test_mapping_with_the_micro_zoo_tokenizer(micro_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo_model_dir(micro_zoo.cache, "gpt2-tiny") / "step20")
    digits = map_token_set(tok, DIGITS, "digits")
    assert digits.kept == DIGITS and not digits.dropped
    bare = map_token_set(tok, DIGITS, "digits", variants="bare")
    assert bare.ids == tuple(tok.convert_tokens_to_ids(list(DIGITS)))
    assert set(bare.ids) < set(digits.ids)  # the space forms (' 0', ' 1' ...) that are one token
    space = map_token_set(tok, ["the", "return", "def"], "sp", variants="space")
    assert space.tokens == (" the", " return", " def")
    for tid, text in zip(digits.ids, digits.tokens):
        assert tok.encode(text, add_special_tokens=False) == [tid]
    python = map_token_set(tok, PYTHON_KEYWORDS, "python")
    assert {"def", "return", "if", "for"} <= set(python.kept)
    assert len(python.kept) + len(python.dropped) == len(PYTHON_KEYWORDS)
    # a 512-token vocabulary has none of the everyday words as one token: one line naming the set
    with pytest.raises(DataError) as exc:
        map_token_set(tok, EVERYDAY, "everyday")
    assert str(exc.value).startswith("token set 'everyday': 0 of its") and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- the matrix
def _tiny(arch, tie, vocab=96):
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=16, hidden_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=16,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """GPT-2 and Llama, tied and untied, single-file and sharded, saved with save_pretrained."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ("gpt2", "llama"):
        for tie in (True, False):
            m = _tiny(arch, tie)
            with torch.no_grad():  # distinct input and output rows when untied
                m.get_output_embeddings().weight.mul_(1.0 + (not tie))
            single = root / f"{arch}-{tie}"
            m.save_pretrained(single)
            sharded = root / f"{arch}-{tie}-sharded"
            m.save_pretrained(sharded, max_shard_size="4KB")
            out[(arch, tie)] = (m, single, sharded)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_read_equals_the_model_head(tiny_models, arch, tie):
    model, single, sharded = tiny_models[(arch, tie)]
    want = model.get_output_embeddings().weight.detach()
    assert (sharded / "model.safetensors.index.json").is_file()
    for folder in (single, sharded):
        emb = read_output_embeddings(resolve_source(str(folder), "main"))
        assert emb.via == "safetensors" and emb.tied is tie
        expected = {("gpt2", True): "transformer.wte.weight", ("llama", True): "model.embed_tokens.weight"}
        assert emb.tensor == expected.get((arch, tie), "lm_head.weight")
        assert torch.equal(emb.weight, want)
        if not tie:
            assert not torch.equal(emb.weight, model.get_input_embeddings().weight.detach())


def test_fallback_loads_the_model(tiny_models, monkeypatch):
    model, single, _ = tiny_models[("llama", False)]
    src = resolve_source(str(single), "main")
    monkeypatch.setattr(modeling, "_weight_map", lambda source: None)  # files that name no known tensor
    emb = read_output_embeddings(src)
    assert emb.via == "model" and emb.tensor is None and emb.tied is False
    assert torch.equal(emb.weight, model.get_output_embeddings().weight.detach())
    with pytest.raises(ModelError, match="no output embedding tensor"):
        read_output_embeddings(src, allow_load=False)
    _, tied_folder, _ = tiny_models[("gpt2", True)]
    assert read_output_embeddings(resolve_source(str(tied_folder), "main")).tied is True


def test_head_is_found_by_suffix_under_a_prefix(tiny_models, tmp_path):
    """A bare 2-D output projection under an unusual prefix is still found by its suffix."""
    from safetensors.torch import save_file

    model, single, _ = tiny_models[("gpt2", False)]
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    head = model.get_output_embeddings().weight.detach().clone()
    save_file({"wrapper.lm_head.weight": head, "wrapper.transformer.wte.weight": head * 0 + 1},
              str(tmp_path / "model.safetensors"))
    emb = read_output_embeddings(resolve_source(str(tmp_path), "main"), allow_load=False)
    assert emb.tensor == "wrapper.lm_head.weight" and torch.equal(emb.weight, head)


# --------------------------------------------------------------------------- end to end
COMMON = TokenSetSpec(name="common", words=["the", "that", "are", "name", "value", "file"])


@pytest.fixture(scope="module")
def zoo_gap(micro_zoo):
    spec = GapSpec(reference=COMMON)
    logs = []
    tables = [measure_gap("gpt2-tiny", str(zoo_model_dir(micro_zoo.cache, "gpt2-tiny")), ["step0", "step20"],
                          spec, log_fn=logs.append),
              measure_gap("llama-small", str(zoo_model_dir(micro_zoo.cache, "llama-small")), ["step20"], spec,
                          log_fn=logs.append)]
    return pa.concat_tables(tables), logs


@slow
def test_measure_gap_on_the_micro_zoo(zoo_gap, micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table, logs = zoo_gap
    assert table.schema == GAP_SCHEMA
    assert table.num_rows == 3 * 2 * 2  # 3 model@revision x 2 domains x 2 metrics
    rows = table.to_pylist()
    assert {(r["model"], r["revision"], r["step"]) for r in rows} == \
        {("gpt2-tiny", "step0", 0), ("gpt2-tiny", "step20", 20), ("llama-small", "step20", 20)}
    assert all(r["tied"] and r["reference"] == "common" for r in rows)
    assert all(r["gap"] == pytest.approx(r["within"] + r["between"], rel=1e-12) for r in rows)
    assert "digits: 10 of 10 words" in logs[0] and "safetensors transformer.wte.weight" in logs[0]
    # the same numbers from the model loaded by transformers
    folder = zoo_model_dir(micro_zoo.cache, "llama-small") / "step20"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ref = map_token_set(tok, COMMON.words, "common")
    dom = map_token_set(tok, DIGITS, "digits")
    want = gap_rows(model.get_output_embeddings().weight, [dom], ref, ["euclidean"],
                    model="llama-small", revision="step20", tied=True)[0]
    got = [r for r in rows if r["model"] == "llama-small" and r["domain"] == "digits"
           and r["metric"] == "euclidean"][0]
    for k in ("within", "reference_within", "between", "gap", "within_se", "n_domain", "n_reference"):
        assert got[k] == pytest.approx(want[k], rel=1e-9)


@slow
def test_rank_and_plot_on_the_micro_zoo(zoo_gap, tmp_path):
    table, _ = zoo_gap
    ranked = rank_models(table, "digits", "euclidean").to_pylist()
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    assert [r["gap"] for r in ranked] == sorted((r["gap"] for r in ranked), reverse=True)
    png = plot_gap(table, tmp_path / "plots" / "gap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_measure_gap_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        measure_gap("x", str(tmp_path / "missing"), ["main"])
    with pytest.raises(ValueError, match="unknown token set 'numbers'"):
        GapSpec(domains=["numbers"])
    with pytest.raises(ValueError):
        GapSpec(metrics=[])
    with pytest.raises(ValueError):
        TokenSetSpec(name="empty", words=[" "])


# --------------------------------------------------------------------------- model selection
def _gap_table(gaps: dict[tuple[str, str], float], domain="digits", metric="cosine") -> pa.Table:
    rows = [{"model": m, "revision": rev, "step": None, "domain": domain, "reference": "everyday",
             "metric": metric, "n_domain": 10, "n_reference": 300, "within": g / 2, "reference_within": 0.9,
             "between": g / 2, "gap": g, "within_se": 0.0, "reference_within_se": 0.0, "between_se": 0.0,
             "tied": False} for (m, rev), g in gaps.items()]
    return pa.Table.from_pylist(rows, schema=GAP_SCHEMA)


# Table 10 (Qwen, cosine): D-D + D-NM, and MATH accuracy
QWEN = {"Qwen2.5-1.5B": (0.2489 + 1.0068, 35.0), "Qwen2.5-Math-1.5B": (0.3347 + 1.0755, 49.8),
        "Distill-Qwen-1.5B": (0.3562 + 1.0781, 83.9), "Qwen2.5-7B": (0.1786 + 1.0000, 49.8),
        "Qwen2.5-Math-7B": (0.2672 + 1.0554, 55.4), "Distill-Qwen-7B": (0.2775 + 1.0640, 92.8)}


def test_rank_models_orders_by_gap_with_ties_by_name():
    table = pa.concat_tables([
        _gap_table({("b", "main"): 1.0, ("a", "main"): 1.0, ("c", "main"): 2.0}),
        _gap_table({("z", "main"): 9.0}, metric="euclidean")])
    ranked = rank_models(table, "digits", "cosine").to_pylist()
    assert [(r["rank"], r["model"]) for r in ranked] == [(1, "c"), (2, "a"), (3, "b")]
    with pytest.raises(DataError, match="no rows for domain 'python'"):
        rank_models(table, "python", "cosine")


def test_spearman_equals_scipy_on_a_hand_made_table(tmp_path):
    gaps = {(m, "main"): g for m, (g, _) in QWEN.items()}
    gaps[("unscored", "main")] = 5.0
    table = _gap_table(gaps)
    scores = [{"model": m, "revision": "main", "task": "math", "score": acc} for m, (_, acc) in QWEN.items()]
    scores += [{"model": "Qwen2.5-1.5B", "revision": "main", "task": "humaneval", "score": 1.0},
               {"model": "absent", "revision": "main", "task": "math", "score": 50.0}]
    want = spearmanr([g for g, _ in QWEN.values()], [a for _, a in QWEN.values()])
    csv = tmp_path / "scores.csv"
    pacsv.write_csv(pa.Table.from_pylist(scores), csv)
    pq.write_table(pa.Table.from_pylist(scores), tmp_path / "scores.parquet")
    for src in (csv, tmp_path / "scores.parquet", pa.Table.from_pylist(scores), str(csv)):
        res = spearman_vs_scores(table, src, task="math", domain="digits", metric="cosine")
        assert res.n == 6
        assert res.rho == pytest.approx(want.statistic, abs=1e-12)
        assert res.p_value == pytest.approx(exact_p([g for g, _ in QWEN.values()], [a for _, a in QWEN.values()]),
                                            abs=1e-12)  # 6 models: the exact p
        assert res.rows.column("model").to_pylist() == list(QWEN)
        assert res.rows.column("score").to_pylist() == [a for _, a in QWEN.values()]


def test_spearman_joins_on_model_and_revision_and_checks_tasks(tmp_path):
    gaps = {("olmo", f"step{s}"): g for s, g in [(1, 1.0), (2, 1.5), (3, 1.2), (4, 2.0)]}
    table = _gap_table(gaps)
    sc = pa.table({"model": ["olmo"] * 5, "revision": ["step1", "step2", "step3", "step4", "step9"],
                   "task": ["gsm8k"] * 5, "score": [0.1, 0.3, 0.2, 0.5, 0.9]})
    res = spearman_vs_scores(table, sc, domain="digits", metric="cosine")  # the only task
    assert res.n == 4 and res.rho == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"no rows for task 'mbpp' \(tasks present: gsm8k\)"):
        spearman_vs_scores(table, sc, task="mbpp", domain="digits")
    two = pa.concat_tables([sc, sc.set_column(2, "task", pa.array(["humaneval"] * 5))])
    with pytest.raises(DataError, match="give task="):
        spearman_vs_scores(table, two, domain="digits")
    dup = pa.concat_tables([sc, sc.slice(0, 1)])
    with pytest.raises(DataError, match="two scores for model 'olmo' revision 'step1'"):
        spearman_vs_scores(table, dup, task="gsm8k", domain="digits")
    with pytest.raises(DataError, match="need at least 3"):
        spearman_vs_scores(table, sc.slice(0, 2), task="gsm8k", domain="digits")


@pytest.mark.parametrize("content, suffix, pattern", [
    (None, ".csv", r"^scores: no such file '.*scores\.csv'$"),
    ("model,revision,score\na,main,1\n", ".csv", r"^scores: '.*scores\.csv' has no column 'task' \(columns: "),
    ("model,task,score\na,t,1\n", ".csv", r"^scores: '.*scores\.csv' has no column 'revision'"),
    ("model,revision,task,score\na,main,t,high\n", ".csv", r"^scores: '.*scores\.csv': column 'score' is not numeric$"),
    ("model,revision,task,score\na,main,t\n", ".csv", r"^scores: cannot read '.*scores\.csv': "),
    ("not a parquet file", ".parquet", r"^scores: cannot read '.*scores\.parquet': "),
    ("model,revision,task,score\n", ".xlsx", r"^scores: '.*scores\.xlsx': unsupported format '\.xlsx'"),
])
def test_bad_scores_files_are_one_line_errors(tmp_path, content, suffix, pattern):
    path = tmp_path / f"scores{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=pattern) as exc:
        read_scores(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError):
        spearman_vs_scores(_gap_table({("a", "main"): 1.0}), path, task="t", domain="digits")


def test_read_scores_keeps_numeric_looking_revisions_as_text(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("model,revision,task,score\n7,1000,gsm8k,12\n")
    t = read_scores(path)
    assert t.schema.field("revision").type == pa.string() and t.column("revision").to_pylist() == ["1000"]
    assert t.column("model").to_pylist() == ["7"] and t.column("score").to_pylist() == [12.0]


def test_read_scores_from_s3(tmp_path, s3):
    """A scores table in object storage (moto's S3 server on loopback), CSV and Parquet."""
    import fsspec
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file("dispersion-test/scores/s.csv", b"model,revision,task,score\nm,step10,arc,0.25\nm,step20,arc,0.5\n")
    local = tmp_path / "s.parquet"
    pq.write_table(pa.table({"model": ["m"], "revision": ["step10"], "task": ["hs"], "score": [1]}), local)
    fs.put_file(str(local), "dispersion-test/scores/s.parquet")
    csv = read_scores("s3://dispersion-test/scores/s.csv")
    assert csv.column("revision").to_pylist() == ["step10", "step20"] and csv.column("score").to_pylist() == [0.25, 0.5]
    assert read_scores("s3://dispersion-test/scores/s.parquet").column("score").to_pylist() == [1.0]
    with pytest.raises(DataError, match=r"^scores: no such file 's3://dispersion-test/scores/none\.csv'$"):
        read_scores("s3://dispersion-test/scores/none.csv")
