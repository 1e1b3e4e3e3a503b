"""Typed run configurations, loaded from YAML.

Every model here forbids unknown keys, so a typo is an error that names the field path
(``models.0.revisons: Extra inputs are not permitted``) instead of a silently ignored
setting. ``load_config`` turns every failure (missing file, malformed YAML, schema
violation) into :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dispersion.errors import ConfigError

LayerRef = int | Literal["final", "all"]
Site = Literal["block", "attn", "mlp"]
Pool = Literal["last", "mean"]
StoredPool = Literal["last", "mean", "context"]  # context: pools c{c} per context length (Fig. 4)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HFDatasetSource(_Strict):
    """A dataset on a hub (or a local dataset folder/script), read with ``datasets``."""

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_documents: Annotated[int, Field(gt=0)] | None = None
    group_rows: Annotated[int, Field(gt=0)] = 1  # join consecutive rows into one document (WikiText lines)
    trust_remote_code: bool = False


class DatasetSpec(_Strict):
    """One text domain to sample segments from: the embedded corpus or a hub dataset."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    embedded: Literal["prose", "code"] | None = None
    split: Literal["train", "validation", "test", "all"] = "validation"
    hf: HFDatasetSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.embedded is None) == (self.hf is None):
            raise ValueError("give exactly one of 'embedded' or 'hf'")
        return self


class ModelSpec(_Strict):
    """A model and the revisions (checkpoints) to scan.

    ``zoo`` names a model of the embedded zoo (built locally, see ``dispersion zoo build``);
    otherwise ``id`` is a local folder or a hub model id, loaded with ``revision``.
    For a local folder, a revision ``stepN`` resolves to the sub-folder ``id/stepN`` when it
    exists. ``revisions: all`` takes every checkpoint of a zoo model.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    zoo: str | None = None
    id: str | None = None
    revisions: list[str] | Literal["all"] | RevisionRange = ["main"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.zoo is None) == (self.id is None):
            raise ValueError("give exactly one of 'zoo' or 'id'")
        if self.revisions == "all" and self.zoo is None:
            raise ValueError("'revisions: all' is only defined for zoo models")
        if isinstance(self.revisions, list) and not self.revisions:
            raise ValueError("revisions must not be empty")
        return self


class SamplingSpec(_Strict):
    """Paper 001 A.1.2 step 1: N non-overlapping segments of L tokens, sampled with a seed."""

    num_segments: Annotated[int, Field(gt=0)] = 1000
    segment_length: Annotated[int, Field(ge=2)] = 128
    shard_size: Annotated[int, Field(gt=0)] = 500
    seed: int = 0


class ExtractionSpec(_Strict):
    """What one forward pass records per segment.

    Layer indexing: ``0`` is the embedding output (input of block 1), ``l`` in 1..n is the
    output of block ``l`` (the residual stream, before the final norm), ``final`` is the
    final-norm output that feeds the LM head (``h_n`` of paper 001 Sec. 2.1), ``all`` means
    0..n and final. Sites: ``block`` (residual stream), ``attn`` / ``mlp`` (the sub-layer
    outputs of block ``l`` before they are added to the residual stream).
    """

    layers: list[LayerRef] = ["final"]
    sites: list[Site] = ["block"]
    pools: list[StoredPool] = ["last", "mean"]
    prepend_bos: bool = True
    skip_first: Annotated[int, Field(ge=0)] = 0
    context_lengths: list[Annotated[int, Field(ge=1)]] = []
    batch_size: Annotated[int, Field(gt=0)] = 16
    nll_chunk_tokens: Annotated[int, Field(gt=0)] = 2048
    device: str = "auto"

    @field_validator("layers", "sites", "pools")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must not be empty")
        return v

    def key(self, dtype: str) -> str:
        """Hash of every field that changes the numbers (not batch size or device)."""
        payload = self.model_dump(exclude={"batch_size", "device", "nll_chunk_tokens"})
        payload["dtype"] = dtype
        return _digest(payload)


AnalysisStep = Literal["domains", "context", "layers", "finetune", "clusters", "heldout", "vendi", "gap",
                       "trajectory", "condensation"]
ANALYSIS_STEPS: tuple[str, ...] = AnalysisStep.__args__


class AnalysisSpec(_Strict):
    """Paper 001 A.1.2 steps 3-7: bins of B segments, Algorithm 1 picks K of them; then the
    analyses named in ``steps`` (see dispersion.analyses and docs/ANALYSES.md), or ``all``.

    ``compare_revisions``: the untrained and trained checkpoints of the ``layers`` step
    (default: each model's first and last by step). ``scores``: a CSV/Parquet table (model,
    revision, task, score; a local path or any fsspec URL) for the ``gap`` and ``trajectory``
    steps; zoo models also bring their validation loss.
    """

    bin_size: Annotated[int, Field(ge=2)] = 100
    select_bins: Annotated[int, Field(ge=2)] | None = None
    layer: LayerRef = "final"
    site: Site = "block"
    pool: Pool = "last"
    steps: list[AnalysisStep] | Literal["all"] = []
    compare_revisions: list[str] | None = None
    scores: str | None = None
    gap: GapSpec = Field(default_factory=lambda: GapSpec())
    clusters: ClusterSpec = Field(default_factory=lambda: ClusterSpec())
    finetune: list[FinetuneSpec] = []
    condensation: CondensationSpec = Field(default_factory=lambda: CondensationSpec())

    def enabled(self, step: str) -> bool:
        return self.steps == "all" or step in self.steps


class ZooSpec(_Strict):
    """Where the embedded zoo lives and how big its models are (see dispersion.zoo)."""

    cache: str = ".cache/zoo"
    vocab_size: Annotated[int, Field(ge=300)] = 4096
    train_steps: Annotated[int, Field(gt=0)] = 300
    checkpoints: list[Annotated[int, Field(ge=0)]] = [0, 30, 100, 300]
    batch_size: Annotated[int, Field(gt=0)] = 16
    seq_len: Annotated[int, Field(ge=8)] = 128
    seed: int = 0


class RaySpec(_Strict):
    """Where and how extraction actors run (used by tasks/, ignored by the in-process scan).

    ``address``: ``None`` starts a local Ray (or joins the cluster named by the
    ``RAY_ADDRESS`` environment variable); ``"auto"`` or ``host:port`` joins a cluster.
    Each actor holds one model@revision at a time and asks for ``num_cpus`` / ``num_gpus``
    (default one CPU slot, one torch thread: on a CPU-only machine one actor per core, which
    beats one actor with every core as intra-op threads for the small models run on CPUs);
    ``max_actors`` caps how many run at once (default: as many as the resources allow).
    ``stall_timeout_s``: the flow fails, naming the units still pending, when no unit has
    finished for this long (a hung node or object store must not hang a nightly run).
    """

    address: str | None = None
    num_cpus: Annotated[float, Field(gt=0)] = 1
    num_gpus: Annotated[float, Field(ge=0)] = 0
    max_actors: Annotated[int, Field(gt=0)] | None = None
    max_restarts: Annotated[int, Field(ge=0)] = 3
    stall_timeout_s: Annotated[float, Field(gt=0)] = 3600.0


class RunConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] = "default"
    root: str = "runs/default"
    models: list[ModelSpec]
    datasets: list[DatasetSpec]
    sampling: SamplingSpec = SamplingSpec()
    extraction: ExtractionSpec = ExtractionSpec()
    analysis: AnalysisSpec = Field(default_factory=lambda: AnalysisSpec())
    zoo: ZooSpec = ZooSpec()
    ray: RaySpec = RaySpec()

    @model_validator(mode="after")
    def _unique_names(self) -> RunConfig:
        for what, names in (("models", [m.name for m in self.models]),
                            ("datasets", [d.name for d in self.datasets])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what}: duplicate name(s) {sorted(dup)}")
        if not self.models or not self.datasets:
            raise ValueError("models and datasets must not be empty")
        return self


def _digest(payload: object, n: int = 12) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()[:n]


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {first['msg']}{more}"


def parse_config(data: object, source: str = "<config>") -> RunConfig:
    """Validate a mapping into a RunConfig; errors name the field path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return validate(RunConfig, data, source)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a local path or an fsspec URL; ConfigError in one line otherwise."""
    import fsspec

    path = str(path)
    try:
        with fsspec.open(path, "r") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: object, source: str):
    """``model.model_validate(data)`` with errors turned into a one-line ConfigError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config from a local path or an fsspec URL."""
    return parse_config(read_yaml(path), str(path))


# Analysis options defined beside their analyses (they import this module's base types,
# so they are imported last and the models rebuilt).
from dispersion.clusters import ClusterSpec  # noqa: E402
from dispersion.condensation import CondensationSpec  # noqa: E402
from dispersion.finetune import FinetuneSpec  # noqa: E402
from dispersion.gap import GapSpec  # noqa: E402
from dispersion.revisions import RevisionRange  # noqa: E402

ModelSpec.model_rebuild()
AnalysisSpec.model_rebuild()
RunConfig.model_rebuild()
