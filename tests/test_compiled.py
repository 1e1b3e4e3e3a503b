"""Compiled decoder blocks (dispersion.measure.compiled, ``extraction.compile``): the `auto`
policy and its line, the extractor's numbers against the eager ones at every site (the hooks
still fire), the compile's seconds reported once, and a failed compile falling back to eager."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scan_config_dict

from dispersion.core.config import ExtractionSpec
from dispersion.measure import compiled as C

SITES = ["block", "attn", "mlp", "resid_mid", "mlp_in"]


def test_the_auto_policy_and_its_break_even_line():
    big, small = C.BREAK_EVEN_FLOPS, C.BREAK_EVEN_FLOPS / 2
    assert C.use_compile("auto", "cuda", big) == (True, None) and C.use_compile("auto", "cuda:1", big) == (True, None)
    assert C.use_compile("auto", "cpu", 1e20) == (False, None)  # measured no faster on the CPU: eager, silently
    assert C.use_compile("on", "cpu", 1.0) == (True, None) and C.use_compile("off", "cuda", 1e20) == (False, None)
    assert C.use_compile("auto", "cuda", 0.0) == (False, None)  # size unknown: eager, nothing to say
    on, line = C.use_compile("auto", "cuda", small)
    assert not on and line == ("extraction.compile: models below the compile's break-even (~1e+13 forward "
                               "FLOPs a scan) run eager blocks")
    assert C.use_compile("auto", "cuda", 5.0)[1] == line  # one line for every model: a scan logs it once


def test_the_setting_leaves_the_spec_key_alone():
    assert ExtractionSpec(compile="on").key("float32") == ExtractionSpec(compile="off").key("float32")


def _model(micro_zoo, name: str):
    from dispersion.measure.modeling import load_model, resolve_source

    return load_model(resolve_source(str(Path(micro_zoo.cache) / name / "step20"), None), dtype="float32")


def _segments() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 200, size=n).astype(np.int32) for n in (30, 30, 30, 30, 17, 9)]


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-small"])
def test_compiled_blocks_give_the_eager_numbers_at_every_site(micro_zoo, name):
    """Both architectures, every site, three batch shapes (a recompile for the shorter ones): the
    same NLL and pooled states to float rounding; the compile's seconds in the first call only."""
    from dispersion.measure.extract import Extractor

    model = _model(micro_zoo, name)
    kw = dict(layers=["all"], sites=SITES, bos_token_id=1, batch_size=2)
    eager = Extractor(model, **kw).extract(_segments())
    ex = Extractor(model, compile_blocks=True, **kw)
    assert ex.compiled is not None and all("forward" in vars(c) for c in ex.compiled.children)
    first, again = ex.extract(_segments()), ex.extract(_segments())
    assert ex.compile_note is None and ex.compiled is not None
    assert first.timings["compile_s"] >= 0 and "compile_s" not in again.timings
    for out in (first, again):
        np.testing.assert_allclose(out.features["nll_sum"], eager.features["nll_sum"], rtol=1e-5)
        assert out.vectors.keys() == eager.vectors.keys()
        for k, v in eager.vectors.items():
            np.testing.assert_allclose(out.vectors[k].astype(np.float32), v.astype(np.float32), rtol=2e-3, atol=2e-3)
        for k, v in eager.within.items():
            np.testing.assert_allclose(out.within[k], v, rtol=1e-4, atol=1e-5)


def test_a_failed_compile_falls_back_to_eager_blocks(micro_zoo, monkeypatch, capsys):
    from dispersion.measure.extract import Extractor

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler\nmore")
        return run

    model = _model(micro_zoo, "gpt2-tiny")
    eager = Extractor(model, bos_token_id=1, batch_size=2).extract(_segments())
    monkeypatch.setattr(torch, "compile", broken)
    ex = Extractor(model, bos_token_id=1, batch_size=2, compile_blocks=True)
    out = ex.extract(_segments())
    np.testing.assert_array_equal(out.features["nll_sum"], eager.features["nll_sum"])
    assert ex.compiled is None and "compile_s" not in out.timings
    assert ex.compile_note == "extraction.compile: compile failed (RuntimeError: no C++ compiler); eager blocks"
    assert capsys.readouterr().err == f"warning: {ex.compile_note}\n"
    blocks = model.base_model.h  # the eager forwards are back: a plain forward runs
    assert not any("forward" in vars(c) for b in blocks for c in b.children())


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_the_plan_compiles_the_models_the_setting_names(micro_zoo, tmp_path, setting):
    """On the CPU `auto` plans every model eager (no line: the CPU never compiles under auto);
    `on` compiles every unit's model; neither changes a unit's key."""
    from dispersion.config import parse_config
    from dispersion.core.storage import Store
    from dispersion.measure.scan import plan

    lines: list[str] = []
    cfg = scan_config_dict(micro_zoo, tmp_path, extraction={"layers": ["final"], "compile": setting,
                                                            "device": "cpu"})
    units = plan(parse_config(cfg), Store(str(tmp_path)), log=lines.append)
    assert {u.compiled for u in units} == {setting == "on"}
    assert not [line for line in lines if line.startswith("extraction.compile:")]
    off = plan(parse_config({**cfg, "extraction": {"layers": ["final"], "compile": "off", "device": "cpu"}}),
               Store(str(tmp_path)), log=lambda *_: None)
    assert [u.key for u in units] == [u.key for u in off]
