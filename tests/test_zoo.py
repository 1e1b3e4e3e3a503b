"""The embedded zoo: a micro zoo (vocab 512, 40 steps) built once into a temporary folder."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dispersion.measure import zoo_cache  # noqa: E402
from dispersion.training import zoo  # noqa: E402
from dispersion.core.config import ZooSpec  # noqa: E402
from dispersion.core.errors import ConfigError, ModelError  # noqa: E402

MICRO = dict(vocab_size=512, train_steps=40, checkpoints=[0, 20, 40], batch_size=8, seq_len=64, seed=0)
NAMES = ["gpt2-tiny", "llama-small"]
STEPS = ["step0", "step20", "step40"]
slow = pytest.mark.slow  # these use the micro zoo (about 15 s to build on 2 cores)
SAMPLE = 'def f(x):\n    """Return x + 1."""\n    return x + 1  # héllo wörld\n\nThe quick brown fox.'


def _copy_corpus_cache(src: Path, dst: Path) -> None:
    """Seed a new cache with the tokenizer and token arrays (skips re-tokenizing)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    for f in src.glob("tokens*"):
        shutil.copy2(f, dst / f.name)


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    spec = ZooSpec(cache=str(tmp_path_factory.mktemp("zoo") / "cache"), **MICRO)
    t0 = time.perf_counter()
    paths = zoo.build_zoo(spec, NAMES, progress=False)
    return spec, paths, time.perf_counter() - t0


@slow
def test_layout(built):
    spec, paths, _ = built
    cache = Path(spec.cache)
    assert set(paths) == set(NAMES)
    for f in ("tokenizer.json", "tokenizer_config.json", "_SUCCESS"):
        assert (cache / "tokenizer" / f).is_file()
    for split in ("train", "validation"):
        assert np.load(cache / f"tokens-{split}.npy").dtype == np.int32
    for name in NAMES:
        root = paths[name]
        assert root == zoo.zoo_model_dir(spec.cache, name) and root.is_absolute()
        assert zoo.zoo_is_built(spec, name)
        assert (root / "_SUCCESS").read_text().strip() == zoo.model_key(spec, name)
        assert zoo_cache.zoo_revisions(spec.cache, name) == STEPS
        for step in STEPS:
            for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
                assert (root / step / f).is_file(), (name, step, f)
        log = json.loads((root / "train_log.json").read_text())
        assert [r["step"] for r in log["checkpoints"]] == [0, 20, 40]
        for r in log["checkpoints"]:
            assert {"step", "train_loss", "val_loss", "tokens_seen", "seconds"} <= set(r)
            assert r["tokens_seen"] == r["step"] * MICRO["batch_size"] * MICRO["seq_len"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@slow
def test_checkpoints_load_offline(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

    spec, paths, _ = built
    expected = {"gpt2-tiny": GPT2LMHeadModel, "llama-small": LlamaForCausalLM}
    for name in NAMES:
        folder = paths[name] / "step40"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, expected[name])
        cfg = model.config
        assert cfg.vocab_size == MICRO["vocab_size"] == len(tok)
        assert getattr(cfg, "n_positions", getattr(cfg, "max_position_embeddings", None)) == 256
        assert tok.bos_token == tok.eos_token == tok.pad_token == "<|endoftext|>"
        assert tok.bos_token_id == cfg.bos_token_id == cfg.eos_token_id == 0
        ids = tok(SAMPLE)["input_ids"]
        assert ids[0] != tok.bos_token_id  # no automatic BOS: the extractor adds it itself
        assert tok.decode(ids) == SAMPLE
        import torch

        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[0] + ids])).logits
        assert logits.shape == (1, len(ids) + 1, MICRO["vocab_size"])
        assert torch.isfinite(logits).all()


@slow
def test_tokenizer_round_trip(built):
    from transformers import AutoTokenizer

    spec, _, _ = built
    tok = AutoTokenizer.from_pretrained(Path(spec.cache) / "tokenizer")
    for text in (SAMPLE, "", "    indented\n\ttabbed\r\n", "unicode: ∑ λ 🙂 日本語"):
        assert tok.decode(tok(text)["input_ids"]) == text
    # the special token is one token, not split into bytes
    assert tok("<|endoftext|>")["input_ids"] == [0]


@slow
def test_validation_loss_falls(built):
    """Logged losses fall, and re-evaluating the saved checkpoints agrees."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    spec, paths, _ = built
    val = np.load(Path(spec.cache) / "tokens-validation.npy")
    starts = np.linspace(0, val.size - 65, 8).astype(int)
    x = torch.from_numpy(np.stack([val[s:s + 65] for s in starts]).astype(np.int64))
    for name in NAMES:
        log = zoo_cache.zoo_train_log(spec.cache, name)["checkpoints"]
        v = [r["val_loss"] for r in log]
        assert abs(v[0] - math.log(MICRO["vocab_size"])) < 0.5  # step 0 is the random init
        assert v[-1] < v[0] - 0.5, (name, v)
        assert v[-1] < v[1] + 0.05, (name, v)
        losses = {}
        for step in ("step0", "step40"):
            model = AutoModelForCausalLM.from_pretrained(paths[name] / step).eval()
            with torch.no_grad():
                logits = model(input_ids=x[:, :-1]).logits
            losses[step] = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
        assert losses["step40"] < losses["step0"] - 0.5, (name, losses)


@slow
def test_rebuild_is_a_no_op(built, caplog):
    spec, paths, _ = built
    before = _files(Path(spec.cache))
    with caplog.at_level(logging.DEBUG, logger="dispersion.training.zoo"):
        t0 = time.perf_counter()
        again = zoo.build_zoo(spec, NAMES, progress=False)
        elapsed = time.perf_counter() - t0
    assert again == paths
    assert elapsed < 2.0
    assert _files(Path(spec.cache)) == before
    for name in NAMES:
        assert any(name in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)


@slow
def test_relative_cache(built, monkeypatch):
    spec, paths, _ = built
    cache = Path(spec.cache)
    monkeypatch.chdir(cache.parent)
    rel = spec.model_copy(update={"cache": cache.name})
    assert zoo.zoo_is_built(rel, "gpt2-tiny")  # the cache path is not part of the key
    assert zoo.build_zoo(rel, ["gpt2-tiny"], progress=False) == {"gpt2-tiny": paths["gpt2-tiny"]}
    assert zoo_cache.zoo_revisions(cache.name, "gpt2-tiny") == STEPS


@slow
def test_key_tracks_spec(built):
    spec, _, _ = built
    for change in ({"seed": 1}, {"train_steps": 41}, {"vocab_size": 600}, {"checkpoints": [0, 40]},
                   {"batch_size": 4}, {"seq_len": 32}):
        assert not zoo.zoo_is_built(spec.model_copy(update=change), "gpt2-tiny"), change
    # order/duplicates of checkpoints do not matter
    assert zoo.zoo_is_built(spec.model_copy(update={"checkpoints": [40, 0, 20, 20]}), "gpt2-tiny")


@slow
def test_deterministic(built, tmp_path):
    from safetensors.numpy import load_file

    spec, paths, _ = built
    cache = Path(spec.cache)
    # the tokenizer: trained again from scratch, byte-identical
    assert zoo.build_tokenizer(tmp_path / "tok-only", MICRO["vocab_size"]) == tmp_path / "tok-only" / "tokenizer"
    assert ((tmp_path / "tok-only" / "tokenizer" / "tokenizer.json").read_bytes()
            == (cache / "tokenizer" / "tokenizer.json").read_bytes())
    # a model: same seed, same weights at every checkpoint
    other = tmp_path / "other"
    _copy_corpus_cache(cache, other)
    spec2 = spec.model_copy(update={"cache": str(other)})
    p2 = zoo.build_zoo(spec2, ["gpt2-tiny"], progress=False)["gpt2-tiny"]
    for step in STEPS:
        a = load_file(paths["gpt2-tiny"] / step / "model.safetensors")
        b = load_file(p2 / step / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{step} {k}")
    la, lb = (zoo_cache.zoo_train_log(c, "gpt2-tiny")["checkpoints"] for c in (cache, other))
    assert [r["val_loss"] for r in la] == [r["val_loss"] for r in lb]


@slow
def test_a_crashed_build_resumes_and_ends_with_the_same_weights(built, tmp_path, monkeypatch):
    """A crash while training leaves no model visible; the next build resumes from the newest
    checkpoint of its hidden build folder and ends bit-identical to an uninterrupted build."""
    from safetensors.numpy import load_file

    from dispersion.training import train as T

    spec, paths, _ = built
    cache = tmp_path / "crash"
    _copy_corpus_cache(Path(spec.cache), cache)
    spec2 = spec.model_copy(update={"cache": str(cache)})
    real = T.evaluate
    calls = []

    def crash_at_step40(model, windows, batch_size, **kw):
        calls.append(1)
        if len(calls) == 3:  # evaluations at step 0, 20, then 40
            raise RuntimeError("simulated crash")
        return real(model, windows, batch_size, **kw)

    monkeypatch.setattr(T, "evaluate", crash_at_step40)
    with pytest.raises(RuntimeError, match="simulated crash"):
        zoo.build_zoo(spec2, ["gpt2-tiny"], progress=False)
    assert not (cache / "gpt2-tiny").exists() and not zoo.zoo_is_built(spec2, "gpt2-tiny")
    with pytest.raises(ModelError, match="not built"):
        zoo_cache.zoo_revisions(cache, "gpt2-tiny")
    [build] = [p for p in cache.iterdir() if p.name.startswith(".build-gpt2-tiny-")]
    assert sorted(p.name for p in build.glob("step*")) == ["step0", "step20"]

    calls.clear()
    monkeypatch.setattr(T, "evaluate", real)
    zoo.build_zoo(spec2, ["gpt2-tiny"], progress=False)
    assert zoo_cache.zoo_train_log(cache, "gpt2-tiny")["resumed_from"] == 20
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    for step in STEPS:
        a = load_file(paths["gpt2-tiny"] / step / "model.safetensors")
        b = load_file(cache / "gpt2-tiny" / step / "model.safetensors")
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{step} {k}")
    la, lb = (zoo_cache.zoo_train_log(c, "gpt2-tiny")["checkpoints"] for c in (Path(spec.cache), cache))
    assert [r["val_loss"] for r in la] == [r["val_loss"] for r in lb]


def test_revisions_sort_numerically(tmp_path):
    root = tmp_path / "gpt2-tiny"
    for step in ("step100", "step20", "step0", "step3"):
        (root / step).mkdir(parents=True)
        (root / step / "config.json").write_text("{}")
    (root / "stepx").mkdir()
    (root / "train_log.json").write_text("{}")
    (root / "_SUCCESS").write_text("abc\n")
    assert zoo_cache.zoo_revisions(tmp_path, "gpt2-tiny") == ["step0", "step3", "step20", "step100"]


def test_unknown_model_name(tmp_path):
    spec = ZooSpec(cache=str(tmp_path), **MICRO)
    for call in (lambda: zoo.build_zoo(spec, ["gpt2-tiny", "nope"], progress=False),
                 lambda: zoo.zoo_model_dir(tmp_path, "nope"),
                 lambda: zoo.zoo_is_built(spec, "nope")):
        with pytest.raises(ModelError) as exc:
            call()
        msg = str(exc.value)
        assert "'nope'" in msg and "gpt2-tiny" in msg and "llama-small" in msg and "\n" not in msg
    with pytest.raises(ModelError, match=r"^zoo: model 'nope' is not built in .* \(run `dispersion zoo build`\)$"):
        zoo_cache.zoo_revisions(tmp_path, "nope")
    assert not any(tmp_path.iterdir())  # nothing was built


def test_bad_spec(tmp_path):
    with pytest.raises(ConfigError, match="checkpoints"):
        zoo.build_zoo(ZooSpec(cache=str(tmp_path), train_steps=10, checkpoints=[0, 20]), progress=False)
    with pytest.raises(ConfigError, match=r"zoo.checkpoints: the last checkpoint must be train_steps \(10\)"):
        zoo.build_zoo(ZooSpec(cache=str(tmp_path), train_steps=10, checkpoints=[0, 5]), progress=False)
    with pytest.raises(ConfigError, match="seq_len"):
        zoo.build_zoo(ZooSpec(cache=str(tmp_path), seq_len=512), ["gpt2-tiny"], progress=False)
    assert not any(tmp_path.iterdir())


def test_recipes():
    assert {"gpt2-tiny", "llama-small"} <= set(zoo.ZOO_MODELS)
    for name, recipe in zoo.ZOO_MODELS.items():
        cfg = recipe(300)
        assert cfg.vocab_size == 300 and cfg.bos_token_id == cfg.eos_token_id == 0
        assert getattr(cfg, "n_positions", getattr(cfg, "max_position_embeddings", None)) == 256
    assert zoo.ZOO_MODELS["gpt2-tiny"](512).model_type == "gpt2"
    assert zoo.ZOO_MODELS["llama-small"](512).model_type == "llama"

