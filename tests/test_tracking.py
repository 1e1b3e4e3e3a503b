"""Experiment tracking (dispersion.report.tracking): one MLflow run per aggregation, read back
from a local MLflow store with MLflow's own client."""

from __future__ import annotations

import sys

import pyarrow as pa
import pytest

from dispersion.core.errors import ConfigError
from dispersion.core.storage import Store
from dispersion.report.tracking import TrackingSpec, correlation_metrics, flat_params, log_run


def _correlations() -> pa.Table:
    rows = []
    for rev, r in (("step0", 0.25), ("step300", -0.5), ("main", 0.75)):
        rows.append({"model": "m", "revision": rev, "dataset": "prose", "layer": "final", "site": "block",
                     "pool": "last", "scope": "across", "bins": "all", "n_bins": 10, "pearson_r": r / 2,
                     "pearson_p": 0.1, "spearman_r": r, "spearman_p": float("nan")})
    return pa.Table.from_pylist(rows)


def test_params_are_flat_dotted_keys_and_lists_stay_whole():
    got = flat_params({"name": "t", "sampling": {"num_segments": 40, "seed": 0}, "models": [{"name": "a"}],
                       "analysis": {"steps": [], "bins": {}}, "long": "x" * 7000})
    assert got["name"] == "t" and got["sampling.num_segments"] == "40" and got["sampling.seed"] == "0"
    assert got["models"] == '[{"name": "a"}]' and got["analysis.steps"] == "[]" and got["analysis.bins"] == "{}"
    assert len(got["long"]) == 6000


def test_correlation_metrics_take_the_revision_step_and_skip_non_finite():
    got = sorted(correlation_metrics(_correlations()))
    key = "m/checkpoints/prose/final/block/last/all"
    assert ("spearman_r/" + key, -0.5, 300) in got and ("spearman_r/" + key, 0.25, 0) in got
    assert ("pearson_r/m/main/prose/final/block/last/all", 0.375, 0) in got  # main: a series of its own
    assert not any(k.startswith("pearson_r/m/checkpoints") and v == 0.375 for k, v, _ in got)
    assert not any(k.startswith("spearman_p/") for k, _, _ in got)  # NaN p-values are not logged
    assert len(got) == 3 * 3


def test_tracking_off_logs_nothing(tmp_path):
    assert log_run(TrackingSpec(), {}, Store(str(tmp_path)), _correlations(), name="t", run_id=None,
                   version="0") is None


def test_without_mlflow_where_the_run_is_logged_the_error_is_one_line(tmp_path, monkeypatch):
    """A config validated where MLflow was installed, aggregated where it is not (a worker)."""
    spec = TrackingSpec.model_construct(mlflow=f"file:{tmp_path}/mlruns", experiment="dispersion", artifacts=True)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ConfigError, match=r"^tracking.mlflow: MLflow is not installed: pip install mlflow-skinny$"):
        log_run(spec, {}, Store(str(tmp_path)), _correlations(),
                name="t", run_id=None, version="0")


@pytest.mark.parametrize("backend", ["file", "sqlite"])
def test_a_run_is_read_back_from_a_local_mlflow_store(tmp_path, backend, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path / "..")  # nothing may land in the working folder
    from mlflow.tracking import MlflowClient

    store = Store(str(tmp_path / "root"))
    store.write_text("results/report/t.md", "# report\n")
    store.write_bytes("results/report/t/bins.png", b"\x89PNG fake")
    store.write_table("results/correlations/t.parquet", _correlations())
    uri = f"file:{tmp_path}/mlruns" if backend == "file" else f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    rid = log_run(TrackingSpec(mlflow=uri, experiment="exp"), {"name": "t", "sampling": {"num_segments": 40}}, store,
                  _correlations(), name="t", run_id="20261126T000000-abc123", version="9.9", log=lines.append)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"name": "t", "sampling.num_segments": "40"}
    assert run.data.tags["dispersion.run_id"] == "20261126T000000-abc123"
    assert run.data.tags["dispersion.root"] == store.url() and run.data.tags["dispersion.version"] == "9.9"
    hist = client.get_metric_history(rid, "spearman_r/m/checkpoints/prose/final/block/last/all")
    assert sorted((m.step, m.value) for m in hist) == [(0, 0.25), (300, -0.5)]
    assert [m.value for m in client.get_metric_history(rid, "spearman_r/m/main/prose/final/block/last/all")] == [0.75]
    arts = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "report")} \
        | {a.path for a in client.list_artifacts(rid, "report/t")} | {a.path for a in client.list_artifacts(rid, "tables")}
    assert {"report/t.md", "report/t/bins.png", "tables/correlations.parquet"} <= arts
    assert lines == [f"mlflow: run {rid} in experiment 'exp' at {uri}: 2 params, 9 metrics, 3 artifacts"]
    assert client.get_experiment_by_name("exp").experiment_id == run.info.experiment_id
    if backend == "sqlite":
        assert (tmp_path / "mlartifacts").is_dir()  # beside the database
    assert not (tmp_path / ".." / "mlruns").exists()
    # the same store run aggregated again (dispersion report): the one MLflow run, updated
    again = log_run(TrackingSpec(mlflow=uri, experiment="exp"), {"name": "t", "sampling": {"num_segments": 40}},
                    store, _correlations(), name="t", run_id="20261126T000000-abc123", version="9.9",
                    log=lines.append)
    assert again == rid and lines[-1].startswith(f"mlflow: resumed run {rid} ")
    assert len(client.search_runs([run.info.experiment_id])) == 1
    hist = client.get_metric_history(rid, "spearman_r/m/checkpoints/prose/final/block/last/all")
    assert len(hist) == 2  # unchanged metrics are not logged twice
    other = log_run(TrackingSpec(mlflow=uri, experiment="exp"), {"name": "t"}, store, _correlations(), name="t",
                    run_id="20261127T000000-def456", version="9.9", log=lines.append)
    assert other != rid and len(client.search_runs([run.info.experiment_id])) == 2  # another scan: another run


def test_a_config_asking_for_mlflow_without_it_fails_before_any_work(monkeypatch):
    from dispersion.config import parse_config

    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"^c: tracking.mlflow: MLflow is not installed: pip install mlflow-skinny$"):
        parse_config({"models": [{"name": "a", "zoo": "gpt2-tiny"}], "datasets": [{"name": "p", "embedded": "prose"}],
                      "tracking": {"mlflow": "sqlite:///x.db"}}, "c")
