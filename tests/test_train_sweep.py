"""Training sweeps with dispersion losses: grid, tables against a naive recomputation, resume,
and the train-sweep flow on local Ray giving the same numbers as the in-process sweep."""

import numpy as np
import pyarrow as pa
import pytest

from dispersion.core.errors import ConfigError
from dispersion.core.storage import Store
from dispersion.training.sweep import (ARM_SCHEMA, SweepConfig, arm_loss, arms, load_sweep_config, run_sweep,
                                       sweep_tables)


def _cfg(zoo, root, work, **grid):
    return SweepConfig.model_validate({
        "name": "s", "root": str(root), "workdir": str(work), "model": "gpt2-tiny",
        "train": {"steps": 4, "batch_size": 4, "seq_len": 32, "lr": 0.005, "eval_every": 2, "eval_batches": 1},
        "loss": {"max_tokens": 16},
        "grid": {"losses": ["none", "push_away", "dispersion"], "lambdas": [0.1, 1.0], "lrs": [0.005], "seeds": [0, 1], **grid},
        "zoo": zoo.model_dump(), "ray": {"num_cpus": 1}, "condensation_sequences": 4})


def test_grid_has_one_baseline_per_lr_and_seed():
    cfg = SweepConfig(grid={"losses": ["none", "squeeze", "dispersion"], "lambdas": [0.1, 1.0],
                            "lrs": [1e-3, 3e-3], "seeds": [0, 1, 2]})
    a = arms(cfg)
    assert sum(x.loss == "none" for x in a) == 2 * 3
    assert len(a) == 2 * 3 + 2 * 2 * 2 * 3
    assert len({x.key(cfg) for x in a}) == len(a)


def test_sweep_tables_against_a_naive_recomputation():
    rng = np.random.default_rng(0)
    rows = []
    for loss, lam in (("none", 0.0), ("squeeze", 0.1), ("squeeze", 1.0)):
        for seed in (0, 1):
            for dom in ("prose", "code"):
                for split in ("validation", "test"):
                    for step in (0, 10):
                        rows.append({"sweep": "s", "arm": f"{loss}{lam}{seed}", "loss": loss, "lam": lam, "lr": 1e-3,
                                     "seed": seed, "domain": dom, "split": split, "step": step,
                                     "ppl": float(rng.uniform(50, 100)), "train_loss": None, "seconds": 1.0,
                                     "checkpoint": "x", "checkpoint_url": "x"})
    t = sweep_tables(pa.Table.from_pylist(rows, schema=ARM_SCHEMA))

    def mean(loss, lam, dom, split, step):
        return np.mean([r["ppl"] for r in rows if (r["loss"], r["lam"], r["domain"], r["split"], r["step"])
                        == (loss, lam, dom, split, step)])
    for r in t["sweep"].to_pylist():
        m = mean(r["loss"], r["lam"], r["domain"], r["split"], r["step"])
        b = mean("none", 0.0, r["domain"], r["split"], r["step"])
        assert r["ppl"] == pytest.approx(m) and r["diff"] == pytest.approx(m - b)
        assert r["diff_pct"] == pytest.approx(100 * (m - b) / b)
    sel = {(r["loss"], r["domain"]): r for r in t["sweep_selected"].to_pylist()}
    best = min((0.1, 1.0), key=lambda lam: np.mean([mean("squeeze", lam, d, "validation", 10) for d in ("prose", "code")]))
    assert sel[("squeeze", "prose")]["lam"] == best
    assert sel[("squeeze", "code")]["test_ppl"] == pytest.approx(mean("squeeze", best, "code", "test", 10))


def test_bad_sweep_config_is_one_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("grid: {losses: [nope]}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: grid.losses.0: "):
        load_sweep_config(str(p))
    with pytest.raises(ConfigError, match="config file not found"):
        load_sweep_config(str(tmp_path / "missing.yaml"))


def test_grid_is_validated_against_the_loss_registry(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("grid: {losses: [none, cross_domain]}\nloss: {scope: sequence}\n")
    with pytest.raises(ConfigError, match=r"grid.losses: cross_domain .*scope: cross_domain takes only 'flatten'"):
        load_sweep_config(str(p))
    p.write_text("grid: {losses: [cross_domain]}\ndomains: [prose]\n")
    with pytest.raises(ConfigError, match=r"grid.losses: cross_domain pairs states of different domains"):
        load_sweep_config(str(p))
    cfg = SweepConfig(grid={"losses": ["none", "push_away", "dispersion"]}, loss={"max_tokens": 16, "tau": 0.5})
    specs = {a.loss: arm_loss(cfg, a.loss, a.lam) for a in arms(cfg)}
    assert specs["dispersion"].max_tokens == 16 and specs["dispersion"].tau == 0.5
    assert specs["push_away"].max_tokens is None and specs["none"].lam == 0.0


@pytest.mark.slow
def test_sweep_in_process_then_flow_on_ray(micro_zoo, tmp_path):
    cfg = _cfg(micro_zoo, tmp_path / "a", tmp_path / "wa")
    out = run_sweep(cfg, log=lambda m: None)
    store = Store(cfg.root)
    sweep = store.read_table("results/sweep/s.parquet").to_pylist()
    assert {r["loss"] for r in sweep} == {"none", "push_away", "dispersion"} and all(r["n_seeds"] == 2 for r in sweep)
    assert {r["step"] for r in sweep} == {0, 2, 4}
    selected = store.read_table("results/sweep_selected/s.parquet").to_pylist()
    assert {r["loss"] for r in selected} == {"none", "push_away", "dispersion"}
    # step 0 is before any update: every arm of a seed starts from the same weights
    at0 = {(r["seed"], r["domain"], r["split"]): r["ppl"] for r in store.read_table("results/train_runs/s.parquet")
           .to_pylist() if r["step"] == 0 and r["loss"] == "none"}
    for r in store.read_table("results/train_runs/s.parquet").to_pylist():
        if r["step"] == 0:
            assert r["ppl"] == pytest.approx(at0[(r["seed"], r["domain"], r["split"])], rel=1e-6)
    runs = store.read_table("results/train_runs/s.parquet").to_pylist()
    from dispersion.measure.modeling import load_model, resolve_source

    url = runs[0]["checkpoint_url"]  # the final checkpoint, copied to the store, loads as a model
    assert url.startswith(str(tmp_path / "a" / "checkpoints" / "s")) and load_model(resolve_source(url, None))
    cond = store.read_table("results/condensation/s.parquet")
    assert cond.num_rows > 0
    assert out["report"].endswith("results/report/s.md")
    # a rerun trains nothing: every arm is published
    import dispersion.training.sweep as ts

    calls = []
    orig = ts._model
    ts._model = lambda *a, **k: calls.append(a) or orig(*a, **k)
    try:
        run_sweep(cfg, log=lambda m: None)
    finally:
        ts._model = orig
    assert calls == []

    # the flow on local Ray: same per-arm numbers as in process (deterministic CPU training)
    from flows.train_sweep import train_sweep

    flow_cfg = _cfg(micro_zoo, tmp_path / "b", tmp_path / "wb", lambdas=[0.1], seeds=[0])
    (tmp_path / "b.yaml").write_text(flow_cfg.model_dump_json())
    res = train_sweep(str(tmp_path / "b.yaml"))
    assert res["ran"] == len(arms(flow_cfg))
    keys = {x.key(flow_cfg) for x in arms(flow_cfg)}
    a = sorted((r["arm"], r["domain"], r["split"], r["step"], r["ppl"]) for r in
               store.read_table("results/train_runs/s.parquet").to_pylist() if r["arm"] in keys)
    b = sorted((r["arm"], r["domain"], r["split"], r["step"], r["ppl"]) for r in
               Store(flow_cfg.root).read_table("results/train_runs/s.parquet").to_pylist())
    assert len(a) == len(b) > 0 and [x[:4] for x in a] == [x[:4] for x in b]
    np.testing.assert_allclose([x[4] for x in a], [x[4] for x in b], rtol=1e-5)
