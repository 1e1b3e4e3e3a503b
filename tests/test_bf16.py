"""bfloat16 extraction on the CPU: the dtype rule (native bf16 or one warning and float32) and
the agreement with float32 within a bound derived from bf16's unit roundoff."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dispersion.measure import modeling

U = 2.0 ** -8  # bf16's unit roundoff: 8 significand bits (7 stored + the implicit one)


def test_bfloat16_runs_natively_or_in_float32_with_one_warning(monkeypatch):
    cpu, lines = torch.device("cpu"), []
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: False)
    assert modeling.resolve_dtype("bfloat16", cpu, warn=lines.append) == "float32"
    assert len(lines) == 1 and lines[0].startswith("warning: dtype bfloat16: this CPU has no native bf16")
    assert modeling.resolve_dtype("auto", cpu, warn=lines.append) == "float32" and len(lines) == 1
    monkeypatch.setattr(modeling, "cpu_bf16", lambda: True)
    assert modeling.resolve_dtype("bfloat16", cpu, warn=lines.append) == "bfloat16" and len(lines) == 1
    assert modeling.resolve_dtype("float32", cpu) == "float32"


def test_cpu_bf16_reads_the_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    modeling.cpu_bf16.cache_clear()
    assert modeling.cpu_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_scan_says_once_that_bfloat16_falls_back(micro_zoo, tmp_path, monkeypatch):
    from conftest import scan_config_dict

    from dispersion.config import parse_config
    from dispersion.core.storage import Store
    from dispersion.measure.scan import plan

    monkeypatch.setattr(modeling, "cpu_bf16", lambda: False)
    cfg = scan_config_dict(micro_zoo, tmp_path / "r")
    for m in cfg["models"]:
        m["dtype"] = "bfloat16"
    config = parse_config(cfg)
    logs: list[str] = []
    units = plan(config, Store(config.root), log=logs.append)
    assert sum(line.startswith("warning: dtype bfloat16") for line in logs) == 1
    assert {u.dtype for u in units} == {"float32"}


@pytest.mark.skipif(not modeling.cpu_bf16(), reason="this CPU has no native bf16")
def test_bf16_extraction_agrees_with_float32_within_the_roundoff_bound(micro_zoo):
    """Per token, the NLL moves by at most 2 u (L + 1) nats and pooled states by a relative
    2 u (L + 1) in L2, for a model of L blocks: each block (its output and the residual add)
    and the head round to bf16, relative error u per rounding, and these add up over the depth;
    the NLL and the pooled sums themselves accumulate in fp32."""
    from dispersion.measure.corpus import embedded_documents
    from dispersion.measure.extract import Extractor
    from dispersion.measure.modeling import load_model, load_tokenizer, resolve_source
    from dispersion.measure.sampling import sample_segments

    folder = Path(micro_zoo.cache) / "gpt2-tiny" / "step20"
    src = resolve_source(str(folder), None)
    tok = load_tokenizer(src)
    segs = [np.asarray(t, np.int32) for t in sample_segments(
        embedded_documents("prose", "validation"), tok, length=48, num_segments=24, seed=0,
        dataset_key="k", dataset_name="prose").column("token_ids").to_pylist()]
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(src, dtype=dtype)
        ex = Extractor(model, layers=["final"], sites=["block"], pools=["last", "mean"], prepend_bos=True,
                       bos_token_id=0, batch_size=8)
        out[dtype] = ex.extract(segs)
    L = model.config.num_hidden_layers
    bound = 2 * U * (L + 1)
    a, b = out["float32"], out["bfloat16"]
    nll_a = a.features["nll_sum"] / a.features["n_scored"]
    nll_b = b.features["nll_sum"] / b.features["n_scored"]
    assert np.abs(nll_a - nll_b).max() <= bound
    assert not np.array_equal(nll_a, nll_b)  # bf16 did run
    for pool in ("last", "mean"):
        va = a.vectors[("final", "block", pool)].astype(np.float64)
        vb = b.vectors[("final", "block", pool)].astype(np.float64)
        rel = np.linalg.norm(va - vb, axis=1) / np.linalg.norm(va, axis=1)
        assert rel.max() <= bound
