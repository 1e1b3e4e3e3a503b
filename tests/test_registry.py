"""The analysis-step registry: run order, config fields and docs derived from it, and the
example step of docs/ANALYSES.md run as written."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from dispersion.analyses import STEPS, Step, StepContext, collect, run_order
from dispersion.analyses.registry import Section, run_steps, steps_markdown
from dispersion.config import ANALYSIS_STEPS, parse_config
from dispersion.core.errors import ConfigError
from dispersion.core.storage import Store

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ANALYSES.md"
MINIMAL = {"models": [{"name": "m", "zoo": "gpt2-tiny"}], "datasets": [{"name": "prose", "embedded": "prose"}]}


def _noop(name: str, **kw) -> Step:
    return Step(name=name, title=name, paper="-", tables=(name,), run=lambda ctx: Section(name, name, "-"), **kw)


def test_dependencies_run_first_whatever_the_typed_order():
    assert run_order(STEPS, ["trajectory", "gap"]) == ["gap", "trajectory"]
    assert run_order(STEPS, ["trajectory"]) == ["trajectory"]  # `uses` orders, it does not add
    reg = collect([_noop("a"), _noop("b", needs=("a",)), _noop("c", uses=("b",))])
    assert run_order(reg, ["c", "b"]) == ["a", "b", "c"]  # `needs` adds a
    assert run_order(reg, ["c"]) == ["c"]


def test_unknown_steps_and_bad_registrations():
    with pytest.raises(ConfigError, match=r"analysis.steps: unknown step 'nope'"):
        run_order(STEPS, ["nope"])
    with pytest.raises(ValueError, match="twice"):
        collect([_noop("a"), _noop("a")])
    with pytest.raises(ValueError, match="unknown step 'z'"):
        collect([_noop("a", needs=("z",))])
    with pytest.raises(ConfigError, match="cycle"):
        run_order(collect([_noop("a", needs=("b",)), _noop("b", needs=("a",))]), ["a"])


def test_config_fields_come_from_the_registry():
    assert ANALYSIS_STEPS == tuple(STEPS)
    cfg = parse_config({**MINIMAL, "analysis": {"steps": list(STEPS)}})
    for step in STEPS.values():
        if step.options is not None:
            assert getattr(cfg.analysis, step.name) == step.default()
    with pytest.raises(ConfigError, match=r"analysis.steps"):
        parse_config({**MINIMAL, "analysis": {"steps": ["nope"]}})
    with pytest.raises(ConfigError, match=r"analysis.gap"):
        parse_config({**MINIMAL, "analysis": {"gap": {"no_such_option": 1}}})


def test_docs_table_is_the_registry():
    text = DOC.read_text()
    m = re.search(r"<!-- steps:begin[^>]*-->\n(.*?)<!-- steps:end -->", text, re.S)
    assert m, "docs/ANALYSES.md has no generated step table"
    assert m.group(1) == steps_markdown(STEPS)


def _example_module(tmp_path: Path):
    text = DOC.read_text()
    section = text[text.index("## Adding a step"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "spread_example.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("spread_example", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["spread_example"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_documented_example_step_runs(tmp_path):
    mod = _example_module(tmp_path)
    reg = collect([*STEPS.values(), mod.STEP])
    rng = np.random.default_rng(0)
    rows = []
    for rev in ("step0", "step30"):
        for scope, pool in (("across", "last"), ("within", "tokens")):
            for b in range(5):
                rows.append({"model": "m", "revision": rev, "dataset": "prose", "layer": "final", "site": "block",
                             "scope": scope, "pool": pool, "bin": b, "dispersion": float(rng.random())})
    bins = pa.Table.from_pylist(rows)
    opts = mod.SpreadOptions(scope="within")
    config = SimpleNamespace(name="run", analysis=SimpleNamespace(layer="final", site="block", pool="last",
                                                                  spread=opts, enabled=lambda s: s == "spread"))
    store = Store(str(tmp_path / "root"))
    ctx = StepContext(config, store, [], {"bins": bins, "correlations": bins})
    sections = run_steps(reg, ctx, only=["spread"])
    assert [s.name for s in sections] == ["spread"]
    got = store.read_table("results/spread/run.parquet").to_pylist()
    assert {(r["revision"], r["pool"]) for r in got} == {("step0", "tokens"), ("step30", "tokens")}
    for r in got:
        vals = [x["dispersion"] for x in rows if x["revision"] == r["revision"] and x["scope"] == "within"]
        assert r["spread"] == pytest.approx(max(vals) - min(vals), rel=1e-12)
