"""The store layout: every path under a root (a local folder or any fsspec URL) is built here.

::

    {root}/segments/dataset={ds}/sample={sk}/shard-{k:05d}.parquet
        segment_id, doc_id, offset, n_tokens, token_ids (list<int32>), text
    {root}/features/model={m}/revision={r}/dataset={ds}/sample={sk}/spec={spec}/shard-{k:05d}.parquet
        segment_id, nll_sum, n_scored, ppl, [last_nll_c{c}, next_nll_c{c}]
    {root}/vectors/model={m}/revision={r}/dataset={ds}/sample={sk}/spec={spec}/layer={l}/site={s}/pool={p}/shard-{k:05d}.parquet
        segment_id, vec (fixed_size_list<float16>[d]), within
    {root}/_done/segments/dataset={ds}/sample={sk}.json                      (sample marker)
    {root}/_done/model={m}/.../spec={spec}/shard-{k:05d}.json                 (work-unit marker)
    {root}/results/{table}/{run}.parquet                                      (analysis tables)
    {root}/results/report/{run}.md, {run}.png, {run}/{figure}.png             (reports, figures)
    {root}/checkpoints/{run}/arm={key}/step{N}/...                            (training checkpoints)
    {root}/train_runs/{sweep}/arm={key}.parquet                               (a finished sweep arm)
    {root}/runs/{run_id}/manifest.json                                        (what a scan did)
    {root}/catalog.duckdb                                                     (views, see VIEWS)

``sample={sk}`` keeps features of different samples of one dataset (seed, N, L, shard
size) apart, so no table mixes two samples. Partitions are Hive-style, so DuckDB and Polars
read them with ``hive_partitioning``.
"""

from __future__ import annotations

from typing import Any

from dispersion.core.errors import DataError

CATALOG = "catalog.duckdb"
REPORT = "report"  # results/report/ holds reports and figures, not a table

UNIT_KEYS = ("model", "revision", "dataset", "sample", "spec")
VECTOR_KEYS = ("layer", "site", "pool")


def partition(**parts: Any) -> str:
    """``k1=v1/k2=v2``; values must not contain a slash or an equals sign."""
    out = []
    for k, v in parts.items():
        v = str(v)
        if not v or "/" in v or "=" in v:
            raise DataError(f"{k}: {v!r} cannot be a partition value")
        out.append(f"{k}={v}")
    return "/".join(out)


def shard_name(k: int, ext: str = "parquet") -> str:
    return f"shard-{k:05d}.{ext}"


# -- scan shards ------------------------------------------------------------------------------

def segments_shard(dataset: str, sample: str, k: int) -> str:
    return f"segments/{partition(dataset=dataset, sample=sample)}/{shard_name(k)}"


def segments_marker(dataset: str, sample: str) -> str:
    return f"_done/segments/{partition(dataset=dataset, sample=sample)}.json"


def unit_partition(model: str, revision: str, dataset: str, sample: str, spec: str) -> str:
    return partition(model=model, revision=revision, dataset=dataset, sample=sample, spec=spec)


def features_shard(part: str, k: int) -> str:
    return f"features/{part}/{shard_name(k)}"


def vectors_shard(part: str, k: int, layer: str, site: str, pool: str) -> str:
    return f"vectors/{part}/{vector_partition(layer, site, pool)}/{shard_name(k)}"


def vector_partition(layer: str, site: str, pool: str) -> str:
    return partition(layer=layer, site=site, pool=pool)


def unit_marker(part: str, k: int) -> str:
    return f"_done/{part}/{shard_name(k, 'json')}"


def manifest_path(run_id: str) -> str:
    return f"runs/{run_id}/manifest.json"


# -- results, reports, checkpoints -------------------------------------------------------------

def result_path(table: str, run: str) -> str:
    return f"results/{table}/{run}.parquet"


RESULTS_FOLDERS = "results/*"  # one folder per result table (and the report folder)


def result_glob(table: str) -> str:
    return f"results/{table}/*.parquet"


def report_path(run: str, ext: str = "md") -> str:
    return f"results/{REPORT}/{run}.{ext}"


def figure_path(run: str, name: str) -> str:
    return f"results/{REPORT}/{run}/{name}.png"


def checkpoint_prefix(run: str, arm: str) -> str:
    return f"checkpoints/{run}/{partition(arm=arm)}"


def train_arm_path(sweep: str, arm: str) -> str:
    """One finished arm of a training sweep (its per-step perplexities); its presence marks the arm done."""
    return f"train_runs/{sweep}/{partition(arm=arm)}.parquet"


# -- catalog views ----------------------------------------------------------------------------

VIEWS: dict[str, tuple[str, bool]] = {  # name -> (glob under the root, hive-partitioned)
    "segments": ("segments/*/*/shard-*.parquet", True),
    "features": ("features/*/*/*/*/*/shard-*.parquet", True),
    "vectors": ("vectors/*/*/*/*/*/*/*/*/shard-*.parquet", True),
    "bins": (result_glob("bins"), False),
    "correlations": (result_glob("correlations"), False),
    "trajectory": (result_glob("trajectory"), False),
}


def result_table_of(folder: str) -> str | None:
    """The table name of a ``results/{table}`` folder, ``None`` for the report folder."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return name if name != REPORT and name.isidentifier() else None
