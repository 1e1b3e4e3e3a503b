"""The paper's analyses (analysis.steps) end to end on a micro scan, checked against naive
recomputations from the stored shards."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import exact_p
import reference as naive  # the naive float64 references (tests/reference.py)
from conftest import scan_config_dict
from scipy.stats import spearmanr

from dispersion.config import parse_config
from dispersion.core.errors import ConfigError
from dispersion.core.storage import Store


@pytest.fixture(scope="module")
def analysed(micro_zoo, tmp_path_factory):
    from dispersion.run import run_scan

    root = tmp_path_factory.mktemp("analyses")
    cfg = parse_config(scan_config_dict(
        micro_zoo, root,
        # every checkpoint of gpt2-tiny (step0, step10, step20): a trajectory Spearman needs >= 3
        models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": "all"},
                {"name": "llama-small", "zoo": "llama-small", "revisions": ["step20"]}],
        datasets=[{"name": "prose", "embedded": "prose", "split": "validation"},
                  {"name": "prose-test", "embedded": "prose", "split": "test"},
                  {"name": "code", "embedded": "code", "split": "validation"}],
        extraction={"layers": ["all"], "pools": ["last", "context"], "context_lengths": [8, 32],
                    "batch_size": 16},
        analysis={"bin_size": 10, "select_bins": 5,
                  "steps": ["domains", "context", "layers", "heldout", "vendi", "gap", "clusters", "finetune", "trajectory", "condensation"],
                  "condensation": {"num_sequences": 20},
                  "finetune": [{"method": "lora", "zoo": "gpt2-tiny", "steps": 4, "batch_size": 4, "seq_len": 32,
                                "eval_every": 4}],
                  "clusters": {"n": 4, "min_count": 10, "per_cluster": 8, "context": 16, "max_clusters": 12,
                               "dataset": "code"},
                  # the micro zoo's 512-token vocabulary has few whole words: small explicit sets
                  "gap": {"domains": ["digits"], "reference": {"name": "common", "words": [
                      "the", "of", "to", "in", "is", "and", "for", "if", "return", "def", "self", "not"]}}}))
    result = run_scan(cfg, progress=False, log=lambda m: None)
    return cfg, Store(str(root)), result


def _read(store, name):
    return pq.read_table(store.path(f"results/{name}/t.parquet")).to_pylist()


def _segments(store, model, revision, dataset, pool, layer="final"):
    feats = pq.read_table(store.path(f"features/model={model}/revision={revision}/dataset={dataset}")).to_pandas()
    vec = pq.read_table(store.path(f"vectors/model={model}/revision={revision}/dataset={dataset}"),
                        filters=[("layer", "=", layer), ("site", "=", "block"), ("pool", "=", pool)]).to_pandas()
    feats = feats.sort_values("segment_id").reset_index(drop=True)
    vec = vec.sort_values("segment_id").reset_index(drop=True)
    assert (feats.segment_id.values == vec.segment_id.values).all()
    return feats, np.stack(vec.vec.values).astype(np.float64)


def test_context_bins_equal_a_naive_recomputation(analysed):
    cfg, store, _ = analysed
    rows = _read(store, "context_bins")
    assert {(r["context"], r["alignment"]) for r in rows} == {(8, "segment"), (8, "next"), (32, "segment")}
    feats, X = _segments(store, "gpt2-tiny", "step20", "code", "c8")
    for alignment, col in (("segment", "last_nll_c8"), ("next", "next_nll_c8")):
        ppl = np.exp(feats[col].values.astype(np.float64))
        order = np.argsort(ppl, kind="stable")
        got = sorted((r for r in rows if r["model"] == "gpt2-tiny" and r["revision"] == "step20"
                      and r["dataset"] == "code" and r["context"] == 8 and r["alignment"] == alignment),
                     key=lambda r: r["bin"])
        assert len(got) == len(ppl) // 10
        for r in got:
            idx = order[r["bin"] * 10:(r["bin"] + 1) * 10]
            assert r["mean_ppl"] == pytest.approx(ppl[idx].mean(), rel=1e-6)
            assert r["dispersion"] == pytest.approx(naive.dispersion(X[idx]), rel=1e-6)


def test_vendi_per_bin_and_layers_table(analysed):
    _, store, _ = analysed
    bins = [r for r in _read(store, "bins") if r["model"] == "llama-small" and r["dataset"] == "prose"
            and r["layer"] == "final" and r["scope"] == "across"]
    feats, X = _segments(store, "llama-small", "step20", "prose", "last")
    order = np.argsort(feats.ppl.values, kind="stable")
    assert sorted(r["bin"] for r in bins) == list(range(len(feats) // 10))
    for r in bins:
        idx = order[r["bin"] * 10:(r["bin"] + 1) * 10]
        assert r["vendi"] == pytest.approx(naive.vendi_score(X[idx]), rel=1e-6)
    layers = _read(store, "layers")
    # every layer 0..n and final for every revision of gpt2-tiny; correlations copied from the main table
    got = {(r["revision"], r["layer"]) for r in layers if r["model"] == "gpt2-tiny" and r["scope"] == "across"}
    assert got == {(rev, lay) for rev in ("step0", "step10", "step20") for lay in ("0", "1", "2", "final")}
    corr = {(r["model"], r["revision"], r["dataset"], r["layer"], r["scope"], r["pool"]): r["spearman_r"]
            for r in _read(store, "correlations") if r["bins"] == "all"}
    for r in layers:
        assert r["spearman_r"] == corr.get((r["model"], r["revision"], r["dataset"], r["layer"], r["scope"], r["pool"]))


def test_heldout_and_report(analysed):
    import matplotlib.image as mpimg

    _, store, _ = analysed
    held = _read(store, "heldout")
    assert {r["split"] for r in held} == {"validation", "test"}
    assert {r["dataset"] for r in held} == {"prose", "prose-test"}
    with open(store.path("results/report/t.md")) as fh:
        md = fh.read()
    for fig in ("domains", "context", "layers", "heldout", "vendi", "gap", "clusters", "finetune", "trajectory", "condensation"):
        rel = f"results/report/t/{fig}.png"
        assert f"(t/{fig}.png)" in md and store.exists(rel)
        assert store.exists(f"results/report/t/{fig}.svg")  # the same figure as SVG beside it
        with open(store.path(rel), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(store.path(rel))  # decodes: a real RGB(A) figure, not an empty canvas
        assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) >= 100 and img.std() > 0
    from dispersion.core.catalog import query

    n = query(store, "SELECT count(*) AS n FROM context_bins WHERE alignment = 'segment'").to_pylist()[0]["n"]
    assert n == sum(1 for r in _read(store, "context_bins") if r["alignment"] == "segment")
    assert query(store, "SELECT count(*) AS n FROM vendi").to_pylist()[0]["n"] > 0


def test_trajectory_table_equals_a_recomputation_from_the_shards(analysed):
    """One row per (model, revision, dataset): corpus perplexity, dispersion of the pooled
    vectors over all segments and mean within-segment dispersion, from the stored shards."""
    cfg, store, _ = analysed
    traj = _read(store, "trajectory")
    datasets = [d.name for d in cfg.datasets]
    assert sorted((r["model"], r["revision"], r["dataset"]) for r in traj) == sorted(
        [("gpt2-tiny", rev, ds) for rev in ("step0", "step10", "step20") for ds in datasets]
        + [("llama-small", "step20", ds) for ds in datasets])
    for r in traj:
        assert r["step"] == int(r["revision"].removeprefix("step")) and r["site"] == "block"
        feats, X = _segments(store, r["model"], r["revision"], r["dataset"], r["pool"], r["layer"])
        within = pq.read_table(
            store.path(f"vectors/model={r['model']}/revision={r['revision']}/dataset={r['dataset']}"),
            filters=[("layer", "=", r["layer"]), ("site", "=", "block"), ("pool", "=", r["pool"])],
        ).column("within").to_numpy(zero_copy_only=False)
        assert r["segments"] == len(feats) == len(X) == 90
        nll, n = feats.nll_sum.to_numpy(np.float64), feats.n_scored.to_numpy(np.float64)
        assert r["corpus_ppl"] == pytest.approx(np.exp(nll.sum() / n.sum()), rel=1e-9)
        assert r["mean_ppl"] == pytest.approx(feats.ppl.to_numpy(np.float64).mean(), rel=1e-9)
        assert r["dispersion"] == pytest.approx(naive.dispersion(X), rel=1e-6)
        assert r["within"] == pytest.approx(np.nanmean(within.astype(np.float64)), rel=1e-6)  # stored float32
    # training lowers the perplexity of every dataset from the first checkpoint to the last
    for ds in datasets:
        ppl = {r["revision"]: r["corpus_ppl"] for r in traj if r["model"] == "gpt2-tiny" and r["dataset"] == ds}
        assert ppl["step20"] < ppl["step0"]


def test_trajectory_spearman_equals_scipy_over_the_checkpoints(analysed, micro_zoo):
    """Spearman rho of each measure with the zoo's logged validation loss over gpt2-tiny's 3
    checkpoints, per dataset, recomputed with scipy from the trajectory and gap tables' own
    columns; llama-small (one checkpoint) gets no row."""
    from dispersion.measure.zoo_cache import zoo_train_log

    cfg, store, _ = analysed
    traj = _read(store, "trajectory")
    val_loss = {f"step{c['step']}": c["val_loss"] for c in zoo_train_log(micro_zoo.cache, "gpt2-tiny")["checkpoints"]}
    assert sorted(val_loss) == ["step0", "step10", "step20"]
    gap = {(g["model"], g["revision"], f"gap_{g['domain']}_{g['metric']}"): g["gap"] for g in _read(store, "gap")}
    gap_measures = sorted({k[2] for k in gap})
    assert "gap_digits_cosine" in gap_measures
    measures = ["corpus_ppl", "dispersion", "within", *gap_measures]
    rho = _read(store, "trajectory_spearman")
    assert sorted((r["model"], r["dataset"], r["measure"], r["task"]) for r in rho) == sorted(
        ("gpt2-tiny", d.name, m, "val_loss") for d in cfg.datasets for m in measures)
    for r in rho:
        sub = sorted((t for t in traj if (t["model"], t["dataset"]) == (r["model"], r["dataset"])),
                     key=lambda t: t["step"])
        x = [t[r["measure"]] if r["measure"] in t else gap[(t["model"], t["revision"], r["measure"])] for t in sub]
        y = [val_loss[t["revision"]] for t in sub]
        want = spearmanr(x, y)
        assert r["n_checkpoints"] == len(sub) == 3
        assert r["spearman_r"] == pytest.approx(want.statistic, abs=1e-12)
        assert r["spearman_p"] == pytest.approx(exact_p(x, y), abs=1e-12)  # 3 checkpoints: the exact p


def test_steps_with_missing_inputs_fail_in_one_line(micro_zoo, tmp_path, analysed):
    from dispersion.measure.scan import plan
    from dispersion.run import aggregate

    cfg, store, _ = analysed
    no_pairs = parse_config({**cfg.model_dump(), "datasets": [d.model_dump() for d in cfg.datasets[:1]]})
    units = [u for u in plan(cfg, store, log=lambda m: None) if u.segments.dataset == "prose"]
    with pytest.raises(ConfigError, match="'heldout' needs two datasets of one source"):
        aggregate(no_pairs, store, units, log=lambda m: None, only=["heldout"])
    no_ctx = parse_config({**cfg.model_dump(), "extraction": {**cfg.extraction.model_dump(), "pools": ["last"]}})
    with pytest.raises(ConfigError, match="'context' needs extraction.pools"):
        aggregate(no_ctx, store, units, log=lambda m: None, only=["context"])


def test_gap_step_reads_each_checkpoint_and_feeds_the_trajectory(analysed):
    cfg, store, _ = analysed
    from dispersion.measure.modeling import read_output_embeddings
    from dispersion.measure.sources import model_revisions

    gap = _read(store, "gap")
    mrs = model_revisions(cfg)
    assert {(r["model"], r["revision"]) for r in gap} == {(m.model, m.revision) for m in mrs}
    # the trajectory's measures include the gap columns of each checkpoint, for every dataset
    rho = _read(store, "trajectory_spearman")
    gap_measures = {f"gap_{r['domain']}_{r['metric']}" for r in gap}
    assert {(r["dataset"], r["measure"]) for r in rho} >= {(d.name, m) for d in cfg.datasets for m in gap_measures}
    clusters = _read(store, "clusters")
    assert {(r["model"], r["revision"]) for r in clusters} == {(m.model, m.revision) for m in mrs}
    assert all(r["n_clusters"] >= 2 and 0 < r["within"] < r["between"] for r in clusters if r["step"])
    ranks = _read(store, "gap_rank")
    assert sorted(r["rank"] for r in ranks if r["domain"] == "digits" and r["metric"] == "cosine") == \
        list(range(1, len(mrs) + 1))
    mr = mrs[0]
    W = read_output_embeddings(mr.source).weight
    row = next(r for r in gap if r["model"] == mr.model and r["revision"] == mr.revision and r["metric"] == "cosine")
    assert np.isfinite([row["within"], row["between"], row["gap"]]).all() and W.shape[0] == 512


def test_finetune_step_measures_base_and_finetuned(analysed):
    _, store, _ = analysed
    rows = _read(store, "finetune")
    assert {(r["checkpoint"], r["domain"]) for r in rows} == {(c, d) for c in ("base", "finetuned")
                                                              for d in ("prose", "code")}
    base = {r["domain"]: r for r in rows if r["checkpoint"] == "base"}
    tuned = {r["domain"]: r for r in rows if r["checkpoint"] == "finetuned"}
    assert all(np.isfinite([r["ppl"], r["dispersion"], r["within"]]).all() for r in rows)
    assert tuned["prose"]["ppl"] != base["prose"]["ppl"]  # the weights really changed
    # the runner fine-tuned and measured it as a unit: published with a done marker, so a rerun
    # finds it done instead of fine-tuning again
    markers = list(Path(store.path("_done/measured")).glob("step=finetune/**/*.json"))
    assert len(markers) == 1 and json.loads(markers[0].read_text())["rows"] == len(rows)


def test_condensation_step_maps_first_and_last_checkpoints(analysed):
    _, store, _ = analysed
    rows = _read(store, "condensation")
    assert {(r["model"], r["revision"]) for r in rows} == {("gpt2-tiny", "step0"), ("gpt2-tiny", "step20"),
                                                           ("llama-small", "step20")}
    for r in rows:
        assert r["n_sequences"] == 20 and abs(sum(r["hist"]) * 2 / len(r["hist"]) - 1) < 1e-4
    assert {r["model"] for r in _read(store, "condensation_depth")} == {"gpt2-tiny", "llama-small"}


def test_condensation_maps_more_zoo_sizes_without_a_scan(analysed):
    """``condensation.zoo_models`` maps zoo models that were not scanned, on the segments of a
    scanned zoo model: the same map as when the model is scanned."""
    from dispersion.measure.scan import plan
    from dispersion.run import aggregate

    cfg, store, _ = analysed
    analysis = {**cfg.analysis.model_dump(), "condensation": {"num_sequences": 20, "zoo_models": ["llama-small"]}}
    cfg2 = parse_config({**cfg.model_dump(), "name": "t2", "analysis": analysis})
    units = [u for u in plan(cfg2, store, log=lambda m: None) if u.mr.model == "gpt2-tiny"]
    aggregate(cfg2, store, units, log=lambda m: None, only=["condensation"])
    rows = pq.read_table(store.path("results/condensation/t2.parquet")).to_pylist()
    assert {(r["model"], r["revision"]) for r in rows} == {("gpt2-tiny", "step0"), ("gpt2-tiny", "step20"),
                                                           ("llama-small", "step0"), ("llama-small", "step20")}
    scanned = {(r["model"], r["revision"], r["layer"]): r["hist"] for r in _read(store, "condensation")}
    extra = [r for r in rows if (r["model"], r["revision"]) == ("llama-small", "step20")]
    assert extra and all(r["hist"] == scanned[("llama-small", "step20", r["layer"])] for r in extra)
    with pytest.raises(ConfigError, match="unknown zoo model 'nope'"):
        parse_config({**cfg.model_dump(), "analysis": {**analysis, "condensation": {"zoo_models": ["nope"]}}})


def test_the_zoo_build_step_builds_the_condensation_zoo_models(micro_zoo, tmp_path, monkeypatch):
    """The analysis steps train nothing: the scan's zoo build (before planning) also builds
    ``condensation.zoo_models`` when the condensation step runs, and only then."""
    import dispersion.run as run

    built: list[list[str]] = []
    monkeypatch.setattr(run, "build_zoo", lambda spec, names, progress: built.append(names))
    analysis = {"bin_size": 10, "steps": ["condensation"], "condensation": {"zoo_models": ["llama-small"]}}
    cfg = parse_config(scan_config_dict(micro_zoo, tmp_path, models=[{"name": "g", "zoo": "gpt2-tiny"}],
                                        analysis=analysis))
    run.prepare_models(cfg)
    run.prepare_models(cfg, only=["vendi"])
    run.prepare_models(parse_config({**cfg.model_dump(), "analysis": {**analysis, "steps": ["vendi"]}}))
    run.prepare_models(parse_config({**cfg.model_dump(), "analysis": {**analysis, "steps": ["vendi"]}}),
                   only=["condensation"])
    assert built == [["gpt2-tiny", "llama-small"], ["gpt2-tiny"], ["gpt2-tiny"], ["gpt2-tiny", "llama-small"]]
