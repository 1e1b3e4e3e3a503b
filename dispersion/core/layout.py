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
    {root}/results/report/{run}.md, {run}.png|svg, {run}/{figure}.png|svg     (reports, figures)
    {root}/checkpoints/{run}/arm={key}/step{N}/...                            (training checkpoints)
    {root}/train_runs/{sweep}/arm={key}.parquet                               (a finished sweep arm)
    {root}/runs/{run_id}/manifest.json                                        (what a scan did)
    {root}/_leases/...                          (a unit being computed: the path of its marker under _done/)
    {root}/queries/model={m}/revision={r}/queryset={q}/sample={qk}/spec={spec}/shard-{k:05d}.parquet
        query_id, task, slice, correct, chosen, ppl, vec/{layer}/{site}/{pool}, within/{layer}/{site}
    {root}/_done/queries/model={m}/.../spec={spec}/shard-{k:05d}.json         (query-shard marker)
    {root}/knnlm/model={m}/revision={r}/corpus={c}/part={store|eval}/sample={wk}/spec={spec}/{table}/shard-{k:05d}.parquet
        store: values (window, pos, value), keys/layer={l}/site={s} (key); eval: windows, tokens,
        queries/layer={l}/site={s}; index/layer={l}/site={s}.faiss (trained IVF indexes)
    {root}/_done/knnlm/model={m}/.../spec={spec}/shard-{k:05d}.json           (kNN-LM shard marker)
    {root}/measured/step={a}/model={m}/revision={r}/spec={spec}/shard-00000.parquet
        one model@revision's measurement for analysis step {a} (condensation, clusters, gap)
    {root}/_done/measured/step={a}/.../spec={spec}.json                       (its marker)
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


SEGMENTS_MARKERS = "_done/segments/*/*.json"  # every sample marker of a root
UNIT_MARKERS = f"_done/{'/'.join('*' for _ in UNIT_KEYS)}/shard-*.json"  # every work-unit marker


def partition_values(rel: str) -> dict[str, str]:
    """The ``key=value`` parts of a path (a file's own name included, without its extension)."""
    parts = rel.rsplit(".", 1)[0].split("/")
    return dict(p.split("=", 1) for p in parts if "=" in p)


def lease_of(marker: str) -> str:
    """The lease of the unit whose done marker is ``marker`` (``_done/X`` -> ``_leases/X``):
    every kind of unit (scan, kNN-LM, query shard) is leased the same way."""
    if not marker.startswith("_done/"):
        raise ValueError(f"not a done marker: {marker!r}")
    return "_leases/" + marker[len("_done/"):]


def done_of(lease: str) -> str:
    """The done marker of the unit whose lease is ``lease`` (the inverse of :func:`lease_of`)."""
    if not lease.startswith("_leases/"):
        raise ValueError(f"not a lease: {lease!r}")
    return "_done/" + lease[len("_leases/"):]


# -- query sets (the hardness step, dispersion.measure.queries) -------------------------------

QUERY_KEYS = ("model", "revision", "queryset", "sample", "spec")


def query_partition(model: str, revision: str, queryset: str, sample: str, spec: str) -> str:
    """One model@revision's measurement of one query set (``sample``: the set's content key)."""
    return partition(model=model, revision=revision, queryset=queryset, sample=sample, spec=spec)


def query_shard(part: str, k: int) -> str:
    return f"queries/{part}/{shard_name(k)}"


def query_marker(part: str, k: int) -> str:
    return f"_done/queries/{part}/{shard_name(k, 'json')}"


QUERY_MARKERS = f"_done/queries/{'/'.join('*' for _ in QUERY_KEYS)}/shard-*.json"  # every query-shard marker

# -- kNN-LM datastores and evaluation passes (the knnlm step, dispersion.measure.knnlm) -------

KNN_KEYS = ("model", "revision", "corpus", "part", "sample", "spec")


def knn_partition(model: str, revision: str, corpus: str, part: str, sample: str, spec: str) -> str:
    """One model@revision's forward pass over one window sample: ``part`` ``store`` (the
    datastore: keys and values) or ``eval`` (queries, base-model log-probabilities, last-token
    states of every window)."""
    return partition(model=model, revision=revision, corpus=corpus, part=part, sample=sample, spec=spec)


def knn_shard(part: str, table: str, k: int) -> str:
    """A file of shard ``k``: ``table`` is ``values``, ``windows``, ``tokens``, or
    ``keys/layer={l}/site={s}`` / ``queries/layer={l}/site={s}`` (one candidate key each)."""
    return f"knnlm/{part}/{table}/{shard_name(k)}"


def knn_marker(part: str, k: int) -> str:
    return f"_done/knnlm/{part}/{shard_name(k, 'json')}"


def knn_index(part: str, layer: str, site: str) -> str:
    """A trained FAISS IVF index over one candidate's keys (exact indexes are rebuilt in memory)."""
    return f"knnlm/{part}/index/{partition(layer=layer, site=site)}.faiss"


def knn_index_marker(part: str, layer: str, site: str) -> str:
    return f"_done/knnlm/{part}/index/{partition(layer=layer, site=site)}.json"


KNN_MARKERS = f"_done/knnlm/{'/'.join('*' for _ in KNN_KEYS)}/shard-*.json"  # every kNN-LM shard marker
KNN_INDEX_MARKERS = f"_done/knnlm/{'/'.join('*' for _ in KNN_KEYS)}/index/*/*.json"  # every trained-index marker


# -- one table per model@revision measured for an analysis step (dispersion.measure.units.TableUnit) --

MEASURED_KEYS = ("step", "model", "revision", "spec")


def measured_partition(step: str, model: str, revision: str, spec: str) -> str:
    """One model@revision's measurement for an analysis step (a condensation map, n-gram cluster
    states, an output-embedding gap); ``spec`` keys what it was measured with."""
    return partition(step=step, model=model, revision=revision, spec=spec)


def measured_table(part: str) -> str:
    return f"measured/{part}/{shard_name(0)}"


def measured_marker(part: str) -> str:
    return f"_done/measured/{part}.json"


MEASURED_MARKERS = f"_done/measured/{'/'.join('*' for _ in MEASURED_KEYS)}.json"  # every measured-table marker


def manifest_path(run_id: str) -> str:
    return f"runs/{run_id}/manifest.json"


MANIFESTS = "runs/*/manifest.json"  # every finished scan of a root


def run_of_manifest(rel: str) -> str:
    """The run id of a ``runs/{run_id}/manifest.json`` path."""
    return rel.rstrip("/").split("/")[-2]


# -- results, reports, checkpoints -------------------------------------------------------------

def result_path(table: str, run: str) -> str:
    return f"results/{table}/{run}.parquet"


RESULTS_FOLDERS = "results/*"  # one folder per result table (and the report folder)


def result_glob(table: str) -> str:
    return f"results/{table}/*.parquet"


def report_path(run: str, ext: str = "md") -> str:
    return f"results/{REPORT}/{run}.{ext}"


def section_path(run: str, step: str) -> str:
    """An analysis step's report section as last rendered; the report joins every stored one."""
    return f"results/{REPORT}/{run}/sections/{step}.md"


def figure_path(run: str, name: str, ext: str = "png") -> str:
    """A report figure: ``png``, or the same figure as ``svg`` beside it."""
    return f"results/{REPORT}/{run}/{name}.{ext}"


def checkpoint_prefix(run: str, arm: str) -> str:
    return f"checkpoints/{run}/{partition(arm=arm)}"


def train_arm_path(sweep: str, arm: str) -> str:
    """One finished arm of a training sweep (its per-step perplexities); its presence marks the arm done."""
    return f"train_runs/{sweep}/{partition(arm=arm)}.parquet"


# -- catalog views ----------------------------------------------------------------------------

ROOT_VARIABLE = "dispersion_root"  # the DuckDB variable every view's paths start from ('.' if unset)
SEGMENTS_GLOB = "segments/*/*/shard-*.parquet"
FEATURES_GLOB = "features/*/*/*/*/*/shard-*.parquet"
VECTORS_GLOB = "vectors/*/*/*/*/*/*/*/*/shard-*.parquet"


def segments_glob(dataset: str, sample: str) -> str:
    return f"segments/{partition(dataset=dataset, sample=sample)}/shard-*.parquet"


def features_glob(part: str) -> str:
    return f"features/{part}/shard-*.parquet"


def vectors_glob(part: str) -> str:
    return f"vectors/{part}/*/*/*/shard-*.parquet"


# ``segments``, ``features`` and ``vectors`` (one spec per model, revision and dataset, see
# dispersion.core.catalog) are built from the ``*_all`` globs' partitions.
VIEWS: dict[str, tuple[str, bool]] = {  # name -> (glob under the root, hive-partitioned)
    "segments_all": (SEGMENTS_GLOB, True),
    "features_all": (FEATURES_GLOB, True),
    "vectors_all": (VECTORS_GLOB, True),
    "bins": (result_glob("bins"), False),
    "correlations": (result_glob("correlations"), False),
    "trajectory": (result_glob("trajectory"), False),
}


def result_table_of(folder: str) -> str | None:
    """The table name of a ``results/{table}`` folder, ``None`` for the report folder."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return name if name != REPORT and name.isidentifier() else None
