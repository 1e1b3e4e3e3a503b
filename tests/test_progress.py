"""Progress outside a terminal: plain timed lines with N/M, rate and ETA; no carriage returns."""

from __future__ import annotations

import pytest

from dispersion.core.progress import Progress, duration, interactive


def test_plain_lines_with_counts_rate_and_eta():
    lines: list[str] = []
    t = [0.0]
    p = Progress(100, "extract", unit="segments", log=lines.append, every_s=1.0, bar=False, clock=lambda: t[0])
    p.note("gpt2-tiny@step0")
    for _ in range(10):
        t[0] += 0.5
        p.update(10)
    p.close()
    assert lines[0] == "extract: 20/100 segments (20%), 20.0/s, ETA 4s [gpt2-tiny@step0]"
    assert lines[-1] == "extract: 100/100 segments (100%), 20.0/s, 5s [gpt2-tiny@step0]"
    assert len(lines) == 5 and not any("\r" in x for x in lines)


def test_disabled_progress_says_nothing_and_resumed_counts_start_from_initial():
    lines: list[str] = []
    p = Progress(10, "train", log=lines.append, enabled=False, bar=False)
    p.update(10)
    p.close()
    assert lines == []
    t = [0.0]
    p = Progress(10, "train", unit="steps", log=lines.append, bar=False, initial=6, clock=lambda: t[0])
    t[0] = 2.0
    p.update(4)
    p.close()
    assert lines == ["train: 10/10 steps (100%), 2.0/s, 2s"]


def test_not_interactive_in_a_pipe(monkeypatch):
    import io

    assert not interactive(io.StringIO())
    assert [duration(s) for s in (4.4, 65, 7322)] == ["4s", "1m05s", "2h02m"]


def test_the_eta_follows_work_not_rows():
    """100 rows of a big model (work 100 each) then 900 rows of a model 100x cheaper (work 1
    each): after the big model's first 50 rows in 50 s, the row rate says 950 s are left, the
    work rate 50 s + 9 s."""
    now = [0.0]
    lines: list[str] = []
    p = Progress(1000, "extract", unit="segments", log=lines.append, bar=False, every_s=1.0,
                 clock=lambda: now[0], work=100 * 100 + 900 * 1)
    now[0] = 50.0
    p.update(50, work=50 * 100)
    assert p.line().endswith("ETA 59s")
    rows_only = Progress(1000, "extract", bar=False, clock=lambda: now[0], log=lines.append)
    rows_only.t0 = 0.0
    rows_only.update(50)
    assert rows_only.line().endswith("ETA 15m50s")


def test_flops_per_token_against_the_parameters_of_real_configs():
    """2 x (block parameters + the LM head's d x V) of a GPT-2 and a Llama, counted on the
    instantiated modules (biases and norms aside, within 3%)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dispersion.measure.scan import flops_per_token

    torch.manual_seed(0)
    for cfg, model_cls, blocks in (
            (GPT2Config(vocab_size=1000, n_embd=64, n_layer=3, n_head=4, n_positions=32), GPT2LMHeadModel,
             lambda m: m.transformer.h),
            (LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32),
             LlamaForCausalLM, lambda m: m.model.layers)):
        model = model_cls(cfg)
        params = sum(p.numel() for p in blocks(model).parameters()) + cfg.vocab_size * 64
        assert flops_per_token(cfg) == pytest.approx(2 * params, rel=0.03)
