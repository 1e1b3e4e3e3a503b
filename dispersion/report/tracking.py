"""Experiment tracking: a scan's parameters, correlations and figures as one MLflow run.

Off by default. ``tracking.mlflow`` (a tracking URI: ``sqlite:///mlflow.db``, ``file:./mlruns``,
``http://host:5000``; on the command line ``-o tracking.mlflow=URI``) turns it on; each
aggregation of a run (``dispersion scan``, ``dispersion analyze``, the flows) then logs to the
MLflow run of that store run in the experiment ``tracking.experiment``:

- **params**: the run config flattened to dotted keys (``sampling.num_segments``, ...; lists of
  mappings such as ``models`` as JSON), MLflow's 6000-character value limit respected;
- **tags**: ``dispersion.run_id`` (the manifest's run id), ``dispersion.root``,
  ``dispersion.version``, ``dispersion.config`` (the name);
- **metrics**: every correlation row, ``{spearman,pearson}_{r,p}`` keyed
  ``<stat>/<model>/checkpoints/<dataset>/<layer>/<site>/<pool>/<bins>`` with the revision's
  training step as MLflow's step (``step300`` -> 300), so a checkpoint sweep draws as a curve
  in the MLflow UI; a revision without a step (``main``, a hash) is a series of its own,
  ``<stat>/<model>/<revision>/...``, not a point at step 0 of the checkpoints' curve;
- **artifacts**: the report (Markdown, HTML, figures in every format written) under ``report/``
  and the run's result tables under ``tables/``.

MLflow is an optional dependency (``pip install mlflow-skinny``); asking for tracking without it
is a one-line error. One store run (its run id) is one MLflow run: aggregating the same scan
again (``dispersion report``, ``analyze``) updates that run (params and metrics that changed,
the artifacts) instead of adding a second of the same name. The local file store of MLflow 3
(``file:`` URIs) is in maintenance mode and needs ``MLFLOW_ALLOW_FILE_STORE=true`` from MLflow
3.13 on; it is set for ``file:`` URIs here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
from pydantic import Field, model_validator

from dispersion.core.config import Strict
from dispersion.core.errors import ConfigError
from dispersion.core.ids import digest, step_of
from dispersion.core.layout import REPORT, result_path
from dispersion.core.storage import Store

MAX_PARAM = 6000     # MLflow's limit on a param value
BATCH = 100          # params per log_batch call (MLflow's limit); metrics go 1000 at a time
STATS = ("spearman_r", "spearman_p", "pearson_r", "pearson_p")
METRIC_KEYS = ("model", "dataset", "layer", "site", "pool", "bins")
CHECKPOINTS = "checkpoints"  # the revision part of the metric key of every revision with a step


class TrackingSpec(Strict):
    """Where a run's parameters, correlations and figures are logged (off by default)."""

    mlflow: str | None = None  # MLflow tracking URI (sqlite:///mlflow.db, file:./mlruns, http://host:5000)
    experiment: Annotated[str, Field(min_length=1)] = "dispersion"  # the MLflow experiment's name
    artifacts: bool = True  # also log the report, its figures and the run's result tables
    # where a new experiment keeps its artifacts; default: MLflow's (inside a file: store), and
    # ``mlartifacts/`` beside the database of a ``sqlite:`` URI (MLflow's own default is ./mlruns
    # of whatever folder the process runs in)
    artifact_location: str | None = None

    @model_validator(mode="after")
    def _mlflow_installed(self) -> TrackingSpec:
        """Asked for before any work is done, not after a scan."""
        if self.mlflow is not None and not _mlflow_available():
            raise ValueError(f"mlflow: {NOT_INSTALLED}")
        return self


NOT_INSTALLED = "MLflow is not installed: pip install mlflow-skinny"


def _mlflow_available() -> bool:
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):  # a module set to None (tests) or a broken install
        return False


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"a.b.c": "value"}``; lists of mappings stay whole, as JSON."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"
    return out


def _metric_part(value: object) -> str:
    """A key part MLflow accepts (letters, digits, ``_-. /``)."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in str(value))


def correlation_metrics(correlations: pa.Table) -> Iterator[tuple[str, float, int]]:
    """``(key, value, step)`` for each finite statistic of each correlation row. Checkpoints
    (revisions naming a training step) share the key part :data:`CHECKPOINTS` and differ in
    step; a revision without a step has its own name in the key (MLflow's step is then 0, the
    one point of that series)."""
    for r in correlations.to_pylist():
        revision = str(r.get("revision", ""))
        step = step_of(revision)
        parts = [r[k] for k in METRIC_KEYS if k in r]
        parts.insert(1, CHECKPOINTS if step is not None else revision)
        key = "/".join(_metric_part(p) for p in parts)
        for stat in STATS:
            v = r.get(stat)
            if v is not None and math.isfinite(v):
                yield f"{stat}/{key}", float(v), step or 0


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"tracking.mlflow: {NOT_INSTALLED}") from None
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def artifact_location(spec: TrackingSpec) -> str | None:
    """Where a new experiment stores artifacts (see :attr:`TrackingSpec.artifact_location`)."""
    if spec.artifact_location is not None or spec.mlflow is None:
        return spec.artifact_location
    if spec.mlflow.startswith("sqlite:///"):
        db = Path(spec.mlflow.removeprefix("sqlite:///")).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def _report_files(store: Store, name: str) -> list[str]:
    """The report of run ``name`` (``<name>.md/.html/.png/...``) and its figures folder."""
    base = f"results/{REPORT}"
    return sorted(set(store.glob(f"{base}/{name}.*")) | set(store.glob(f"{base}/{name}/*.*")))


def log_run(spec: TrackingSpec, config: dict[str, Any], store: Store, correlations: pa.Table, *,
            name: str, run_id: str | None, version: str, log: Callable[[str], None] = print) -> str | None:
    """Log one MLflow run (see the module docstring); returns its MLflow run id, ``None`` when
    tracking is off."""
    if spec.mlflow is None:
        return None
    client = _client(spec.mlflow)
    from mlflow.entities import Metric, Param, RunTag

    exp = client.get_experiment_by_name(spec.experiment)
    exp_id = exp.experiment_id if exp is not None else \
        client.create_experiment(spec.experiment, artifact_location=artifact_location(spec))
    tags = {"mlflow.runName": f"{name}" + (f" {run_id}" if run_id else ""), "dispersion.config": name,
            "dispersion.root": store.url(), "dispersion.version": version}
    if run_id:
        tags["dispersion.run_id"] = run_id
    run = _same_run(client, exp_id, tags) if run_id else None
    resumed = run is not None
    if run is None:
        run = client.create_run(exp_id, tags=tags)
    rid = run.info.run_id
    try:
        logged = run.data.params if resumed else {}
        params = [Param(k, v) for k, v in flat_params(config).items()]
        new_params = [p for p in params if logged.get(p.key) != p.value]
        for i in range(0, len(new_params), BATCH):
            client.log_batch(rid, params=new_params[i:i + BATCH])
        stamp = int(run.info.start_time)
        values = sorted(correlation_metrics(correlations))
        metrics = [Metric(k, v, stamp, s) for k, v, s in values]
        fingerprint = digest(values)
        if not (resumed and run.data.tags.get("dispersion.metrics_digest") == fingerprint):
            for i in range(0, len(metrics), 1000):
                client.log_batch(rid, metrics=metrics[i:i + 1000])
        client.log_batch(rid, tags=[RunTag("dispersion.metrics", str(len(metrics))),
                                    RunTag("dispersion.metrics_digest", fingerprint)])
        n_files = 0
        if spec.artifacts:
            with tempfile.TemporaryDirectory(prefix="dispersion-mlflow-") as tmp:
                files = [(rel, "report/" + rel.split(f"/{REPORT}/", 1)[1]) for rel in _report_files(store, name)]
                files += [(rel, f"tables/{rel.split('/')[1]}.parquet")
                          for rel in store.glob(result_path("*", name)) if rel.split("/")[1] != REPORT]
                for rel, dest in files:
                    local = Path(tmp, dest)
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_bytes(store.read_bytes(rel))
                    n_files += 1
                if n_files:
                    client.log_artifacts(rid, tmp)
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    log(f"mlflow: {'resumed ' if resumed else ''}run {rid} in experiment {spec.experiment!r} at {spec.mlflow}: "
        f"{len(params)} params, {len(metrics)} metrics, {n_files} artifacts")
    return rid


def _same_run(client, exp_id: str, tags: dict[str, str]):
    """The MLflow run already logged for this store run (same run id, config name and root):
    a second ``dispersion report`` of one scan updates it instead of adding a duplicate."""
    def quoted(v: str) -> str:
        return v.replace("'", "\\'")

    found = client.search_runs([exp_id], max_results=1, filter_string=" and ".join(
        f"tags.`{k}` = '{quoted(tags[k])}'" for k in ("dispersion.run_id", "dispersion.config", "dispersion.root")))
    return found[0] if found else None

