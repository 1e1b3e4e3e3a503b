"""The LM head's NLL (dispersion.measure.head): the eager and the fused (compiled) paths against
a naive float64 loop, the `auto` policy and its break-even line, and the extractor on both."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dispersion.measure import head as H


def naive_nll(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, softcap) -> np.ndarray:
    """One row at a time in float64: log sum exp z - z_y with z = W h + b (soft-capped)."""
    W = weight.detach().double().numpy()
    b = None if bias is None else bias.detach().double().numpy()
    out = []
    for h, y in zip(hidden.double().numpy(), targets.numpy()):
        z = W @ h + (0.0 if b is None else b)
        if softcap:
            z = np.tanh(z / softcap) * softcap
        m = z.max()
        out.append(m + math.log(np.exp(z - m).sum()) - z[y])
    return np.asarray(out)


def _head(vocab: int, d: int, bias: bool, dtype=torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(d, vocab, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(4.0)
    return lin.to(dtype)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
def test_the_eager_head_equals_a_naive_loop(bias, softcap):
    lin = _head(300, 16, bias)
    h, y = torch.randn(37, 16), torch.randint(0, 300, (37,))
    got = H.Head(lin, chunk=8, softcap=softcap).nll(h, y)  # 37 rows: four full chunks and a short one
    assert got.dtype == torch.float32 and got.shape == (37,)
    np.testing.assert_allclose(got.numpy(), naive_nll(h, lin.weight.detach(), lin.bias, y, softcap), rtol=2e-6,
                               atol=2e-6)


def test_the_chunk_holds_at_most_the_logit_budget(monkeypatch):
    monkeypatch.setattr(H, "LOGIT_BUDGET", 1000)
    assert H.Head(_head(300, 8, False), chunk=2048).chunk == 3  # 3 x 300 logits <= 1000
    assert H.Head(_head(300, 8, False), chunk=2).chunk == 2
    assert H.Head(_head(2, 8, False), fused=True).chunk == H.FUSED_CHUNK  # 500 would fit the budget


def test_the_auto_policy_and_its_break_even_line():
    big, small = H.BREAK_EVEN_TOKENS, H.BREAK_EVEN_TOKENS - 1
    assert H.use_fused("auto", "float32", big) == (False, None)  # fp32 heads keep the eager path
    assert H.use_fused("auto", "bfloat16", big) == (True, None)
    fused, line = H.use_fused("auto", "float16", small)
    assert not fused and line == (f"extraction.fused_head: {small} tokens per model are below the compile's "
                                  f"break-even (~{H.BREAK_EVEN_TOKENS}): the eager head")
    assert H.use_fused("on", "float32", 10) == (True, None) and H.use_fused("off", "bfloat16", big) == (False, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_head_equals_the_eager_one(dtype):
    """The compiled kernel computes the same fp32 NLL as the eager path (the logits are the
    same matmul's; only the order of the fp32 sum may differ), over a padded last chunk."""
    lin = _head(500, 32, True, dtype)
    h, y = torch.randn(H.FUSED_CHUNK + 45, 32).to(dtype), torch.randint(0, 500, (H.FUSED_CHUNK + 45,))
    fused = H.Head(lin, softcap=30.0, fused=True)
    with torch.inference_mode():
        got, want = fused.nll(h, y), H.Head(lin, softcap=30.0).nll(h, y)
    assert fused.fused and fused.note is None and fused.compile_s is not None and fused.compile_s > 0
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        np.testing.assert_allclose(got.numpy(), naive_nll(h, lin.weight.detach(), lin.bias, y, 30.0), rtol=2e-5)


def test_a_failed_compile_falls_back_to_the_eager_head(monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    lin = _head(50, 8, False)
    h, y = torch.randn(10, 8), torch.randint(0, 50, (10,))
    head = H.Head(lin, fused=True)
    np.testing.assert_allclose(head.nll(h, y).numpy(), H.Head(lin).nll(h, y).numpy())
    assert not head.fused and head.note == ("extraction.fused_head: compile failed (RuntimeError: no C++ compiler); "
                                            "the eager head")
    assert capsys.readouterr().err == f"warning: {head.note}\n"


def test_the_extractor_with_a_fused_head_gives_the_eager_numbers(micro_zoo):
    """A zoo model through the extractor with and without the fused head: the same NLL and
    states (float rounding), and the compile's seconds reported once, in the first call."""
    from dispersion.measure.extract import Extractor
    from dispersion.measure.modeling import load_model, resolve_source

    model = load_model(resolve_source(str(Path(micro_zoo.cache) / "gpt2-tiny" / "step20"), None), dtype="float32")
    rng = np.random.default_rng(0)
    segs = [rng.integers(3, 200, size=n).astype(np.int32) for n in (30, 30, 17, 9)]
    eager = Extractor(model, bos_token_id=1, batch_size=2).extract(segs)
    ex = Extractor(model, bos_token_id=1, batch_size=2, fused_head=True)
    first, again = ex.extract(segs), ex.extract(segs)
    assert "compile_s" in first.timings and "compile_s" not in again.timings and "compile_s" not in eager.timings
    for out in (first, again):
        np.testing.assert_allclose(out.features["nll_sum"], eager.features["nll_sum"], rtol=1e-5)
        for k, v in eager.vectors.items():
            np.testing.assert_array_equal(out.vectors[k], v)
