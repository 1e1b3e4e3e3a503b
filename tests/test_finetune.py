"""Fine-tuning (dispersion.training.finetune) on the micro zoo: LoRA and full, merge, before/after table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dispersion.training import finetune as FT
from dispersion.training import checkpoints as C
from dispersion.training import train as T
from dispersion.core.errors import ConfigError, DispersionError, ModelError
from dispersion.measure.modeling import load_model, load_tokenizer, resolve_source

# 12 steps of 8 x 32 tokens: enough to lower the prose perplexity of the 20-step micro zoo model
TINY = dict(steps=12, batch_size=8, seq_len=32, eval_batches=1, eval_every=6, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _x(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(1, 500, (3, 20))).long()


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def lora_run(micro_zoo, tmp_path_factory):
    spec = FT.FinetuneSpec(method="lora", zoo="gpt2-tiny", lr=1e-2, save_at=[6], **TINY)
    out = tmp_path_factory.mktemp("ft")
    return spec, out, FT.finetune(spec, out, zoo=micro_zoo)


@pytest.fixture(scope="module")
def full_run(micro_zoo, lora_run):
    spec = FT.FinetuneSpec(method="full", zoo="gpt2-tiny", lr=1e-3, **TINY)
    return spec, lora_run[1], FT.finetune(spec, lora_run[1], zoo=micro_zoo)


def test_lora_changes_only_the_adapter_and_merges_exactly(micro_zoo, tmp_path):
    spec = FT.FinetuneSpec(method="lora", zoo="gpt2-tiny", lr=1e-2, **TINY)
    base = FT.base_source(spec, micro_zoo)
    assert base.location.endswith("step20")  # the zoo model's last checkpoint
    original = {n: p.detach().clone() for n, p in load_model(base).named_parameters()}
    model = FT.apply_lora(load_model(base), spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * 2  # c_attn and c_proj of 2 blocks
    train, evals = FT.finetune_tokens(spec, load_tokenizer(base), micro_zoo)
    T.train(model, train, FT.train_spec(spec, train["prose"].size), out_dir=tmp_path, run_key="t")
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        orig = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, original[orig]), name
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero
    x = _x()
    before = _logits(model, x)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "GPT2LMHeadModel"
    torch.testing.assert_close(_logits(merged, x), before, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged.transformer.h[0].attn.c_attn.weight, original["transformer.h.0.attn.c_attn.weight"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notes on peft's calls
def test_lora_final_loads_and_equals_the_peft_model(micro_zoo, lora_run):
    from peft import PeftModel

    spec, out, final = lora_run
    assert final == out / "lora" / "final"
    merged = load_model(resolve_source(str(final), None))
    peft_model = PeftModel.from_pretrained(load_model(FT.base_source(spec, micro_zoo)), str(out / "lora" / "adapter"))
    x = _x(1)
    torch.testing.assert_close(_logits(merged, x), _logits(peft_model, x), rtol=1e-4, atol=1e-5)
    # checkpoints are merged model folders too, with the tokenizer
    assert C.checkpoint_steps(out / "lora") == [6, 12]
    step12 = load_model(resolve_source(str(out / "lora"), "step12"))
    torch.testing.assert_close(_logits(step12, x), _logits(merged, x), rtol=1e-5, atol=1e-6)
    assert load_tokenizer(resolve_source(str(final), None)).eos_token_id == 0
    info = json.loads((final / "finetune.json").read_text())
    assert info["n_trainable"] < info["n_params"] / 10 and info["train"]["steps"] == 12
    assert set(info["ppl_before"]) == {"prose/validation", "prose/test", "code/validation", "code/test"}
    assert info["ppl_after"]["prose/validation"] < info["ppl_before"]["prose/validation"]
    assert [r["step"] for r in C.read_metrics(out / "lora") if r["kind"] == "train"] == list(range(1, 13))
    # done: a second call returns the same folder without training
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    assert FT.finetune(spec, out, zoo=micro_zoo) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime


def test_full_finetuning(micro_zoo, full_run):
    spec, out, final = full_run
    assert final == out / "full" / "final"
    tuned = dict(load_model(resolve_source(str(final), None)).named_parameters())
    base = dict(load_model(FT.base_source(spec, micro_zoo)).named_parameters())
    assert tuned.keys() == base.keys()
    assert all(not torch.equal(tuned[n], base[n]) for n in base)  # every parameter trained
    info = json.loads((final / "finetune.json").read_text())
    assert info["n_trainable"] == info["n_params"]
    assert info["ppl_after"]["prose/validation"] < info["ppl_before"]["prose/validation"]
    state = json.loads((out / "full" / "step12" / C.STATE_FILE).read_text())
    assert state["trainable"] is None  # resume reloads model.safetensors itself


def test_before_after_table_and_plot(micro_zoo, lora_run, full_run, tmp_path):
    import pyarrow as pa

    tables = [FT.dispersion_before_after(spec, final, zoo=micro_zoo, num_segments=24, segment_length=16,
                                         device="cpu") for spec, _, final in (lora_run, full_run)]
    for t in tables:
        assert t.schema.equals(FT.FINETUNE_SCHEMA)
        rows = t.to_pylist()
        assert [(r["checkpoint"], r["domain"], r["role"]) for r in rows] == [
            ("base", "prose", "target"), ("base", "code", "control"),
            ("finetuned", "prose", "target"), ("finetuned", "code", "control")]
        assert all(r["n_segments"] == 24 and 0 < r["dispersion"] < 1.1 and 0 < r["within"] < 1.1 and r["ppl"] > 1
                   for r in rows)
        assert rows[2]["ppl"] < rows[0]["ppl"]  # better on the fine-tuning domain
    # the same segments for both methods: identical base rows
    base = [[r for r in t.to_pylist() if r["checkpoint"] == "base"] for t in tables]
    assert [{k: v for k, v in r.items() if k != "method"} for r in base[0]] == \
           [{k: v for k, v in r.items() if k != "method"} for r in base[1]]
    png = tmp_path / "plots" / "ft.png"
    FT.plot_finetune(pa.concat_tables(tables), png)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


def test_lora_targets_per_architecture(micro_zoo):
    llama = load_model(FT.base_source(FT.FinetuneSpec(zoo="llama-small"), micro_zoo))
    gpt2 = load_model(FT.base_source(FT.FinetuneSpec(zoo="gpt2-tiny"), micro_zoo))
    assert FT.lora_targets(llama) == (["q_proj", "k_proj", "v_proj", "o_proj"], False)
    assert FT.lora_targets(llama, "all")[0][-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert FT.lora_targets(gpt2) == (["attn.c_attn", "attn.c_proj"], True)
    assert FT.lora_targets(gpt2, "all")[0] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    peft_llama = FT.apply_lora(llama, FT.FinetuneSpec(zoo="llama-small", lora_rank=4))
    names = [n for n, p in peft_llama.named_parameters() if p.requires_grad]
    assert len(names) == 4 * 4 * 2 and all(".self_attn." in n for n in names)
    with pytest.raises(ModelError, match="target_modules") as err:
        FT.lora_targets(gpt2, ["q_proj"])
    assert "\n" not in str(err.value)


def test_presets_and_paper_values():
    lora = FT.FinetuneSpec(id="some/model").hparams()
    assert lora["preset"] == "paper" and lora["lr"] == 1e-4 and lora["batch_size"] * lora["grad_accum"] == 64
    assert lora["epochs"] == 1.0 and lora["betas"] == (0.9, 0.999) and lora["warmup_ratio"] == 0.1
    full = FT.FinetuneSpec(id="some/model", method="full").hparams()
    assert full["lr"] == 1e-5 and full["epochs"] == 5.0 and full["batch_size"] * full["grad_accum"] == 64
    ts = FT.train_spec(FT.FinetuneSpec(id="m", method="full"), n_train_tokens=64 * 2048 * 10)
    assert ts.steps == 50 and ts.warmup_steps == 5 and ts.min_lr_ratio == 0.0
    emb = FT.FinetuneSpec(zoo="gpt2-tiny", lr=0.5).hparams()
    assert emb["preset"] == "embedded" and emb["lr"] == 0.5 and emb["steps"] == FT.EMBEDDED_DEFAULTS["lora"]["steps"]
    assert FT.FinetuneSpec(zoo="gpt2-tiny", epochs=2).hparams()["steps"] is None
    assert FT.FinetuneSpec(zoo="x", domain="code").control_domain == "prose"
    assert FT.FinetuneSpec(zoo="x", control="none").control_domain is None


@pytest.mark.parametrize("data, match", [
    ({"method": "qlora", "zoo": "gpt2-tiny"}, "method"),
    ({"method": "lora"}, "exactly one of 'zoo' or 'id'"),
    ({"zoo": "gpt2-tiny", "lora_rnak": 4}, "lora_rnak"),
    ({"zoo": "gpt2-tiny", "domain": "wiki"}, "domain"),
    ({"zoo": "gpt2-tiny", "steps": 5, "epochs": 1}, "steps"),
])
def test_bad_specs_error_in_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as err:
        FT.parse_finetune_spec(data)
    assert "\n" not in str(err.value)


def test_missing_models_error_in_one_line(micro_zoo, tmp_path):
    for data, match in (({"zoo": "gpt2-huge"}, "unknown model"), ({"id": str(tmp_path / "nope")}, "no such model"),
                        ({"zoo": "gpt2-tiny", "revision": "step999"}, "step999")):
        with pytest.raises(DispersionError, match=match) as err:
            FT.finetune(data, tmp_path, zoo=micro_zoo)
        assert "\n" not in str(err.value)
