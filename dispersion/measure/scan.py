"""Plan and run a scan: (model@revision) x (dataset shard) work units, each a plain function.

A scan is::

    resolve models -> sample segments per (dataset, tokenizer) -> plan work units
    -> run every pending unit (in process here; on Ray actors in tasks/) -> analyse

A work unit is (model@revision, dataset sample, shard, extraction spec). Its outputs live at
paths made of those inputs and its completion marker records a key hashing all of them,
so a unit whose marker exists is skipped: reruns resume, and a sweep that adds
checkpoints computes only the new ones. Markers record the checksum of every file they
publish; a unit whose files no longer match is logged in one line and computed again.
A unit runs under a lease (``_leases/...``), so scans of one root at the same time, and
retries, split the units instead of each running all of them.
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa

from dispersion import __version__
from dispersion.core import layout
from dispersion.core.config import ExtractionSpec, ScanConfig
from dispersion.core.errors import ConfigError, DataError, IntegrityError, ModelError
from dispersion.core.ids import digest
from dispersion.core.integrity import CHECKSUMS, check_marker, recorded
from dispersion.core.leases import LEASE_SECONDS
from dispersion.core.storage import Store, feature_schema, vector_column, vector_schema
from dispersion.measure.binning import MIN_POINTS
from dispersion.measure.corpus import dataset_key, document_source
from dispersion.measure.modeling import load_tokenizer
from dispersion.measure.sampling import sample_key, sample_segments, shard_slices, tokenizer_fingerprint
from dispersion.measure.sources import ModelRevision, model_revisions
from dispersion.measure.units import run_units


@dataclass(frozen=True)
class SegmentSet:
    dataset: str
    sample: str
    shard_rows: tuple[int, ...]
    seed: int = 0  # the sampling seed that drew it

    def shard_rel(self, k: int) -> str:
        return layout.segments_shard(self.dataset, self.sample, k)

    @property
    def marker_rel(self) -> str:
        return layout.segments_marker(self.dataset, self.sample)

    def read_shard(self, store: Store, k: int) -> pa.Table:
        """Shard ``k``, checked against the checksum the sample marker recorded."""
        rel = self.shard_rel(k)
        return store.read_shard(rel, recorded([store.read_json(self.marker_rel) or {}]).get(rel))


@dataclass(frozen=True)
class WorkUnit:
    """Everything that determines one output shard."""

    mr: ModelRevision
    segments: SegmentSet
    shard: int
    spec_key: str
    dtype: str  # resolved dtype, part of spec_key
    extraction: ExtractionSpec | None = field(default=None, compare=False)  # what spec_key hashes
    flops_per_segment: float = field(default=0.0, compare=False)  # forward FLOPs of one segment (progress)
    fused_head: bool = field(default=False, compare=False)  # the model's head compiled (extraction.fused_head)
    compiled: bool = field(default=False, compare=False)  # the model's blocks compiled (extraction.compile)

    @property
    def n_rows(self) -> int:
        return self.segments.shard_rows[self.shard]

    # -- the unit protocol (dispersion.measure.units) --
    @property
    def size(self) -> int:
        return self.n_rows

    @property
    def cost(self) -> float:
        """Expected compute (FLOPs; rows when unknown): what progress weighs the unit by."""
        return self.n_rows * self.flops_per_segment or float(self.n_rows)

    @property
    def model_key(self) -> tuple[str, str, str, str]:
        return ("extract", self.mr.model, self.mr.revision, self.spec_key)

    def expect(self) -> dict:
        return {"key": self.key, "rows": self.n_rows}

    def load(self):
        if self.extraction is None:
            raise ValueError(f"{self.describe()}: planned without its extraction spec")
        return load_extractor(self.mr, self.extraction, self.dtype, fused_head=self.fused_head,
                              compiled=self.compiled)

    def run(self, store: Store, loaded, progress: Callable[[int], None] | None = None) -> dict:
        return run_unit(self, loaded, store, progress=progress)

    def _part(self) -> str:
        return layout.unit_partition(self.mr.model, self.mr.revision, self.segments.dataset,
                                     self.segments.sample, self.spec_key)

    @property
    def features_rel(self) -> str:
        return layout.features_shard(self._part(), self.shard)

    def vectors_rel(self, layer: str, site: str, pool: str) -> str:
        return layout.vectors_shard(self._part(), self.shard, layer, site, pool)

    @property
    def marker_rel(self) -> str:
        return layout.unit_marker(self._part(), self.shard)

    @property
    def lease_rel(self) -> str:
        return layout.lease_of(self.marker_rel)

    @property
    def key(self) -> str:
        payload = [self.mr.model, self.mr.revision, self.mr.source.location, self.mr.source.revision,
                   self.mr.fingerprint, self.segments.dataset, self.segments.sample, self.shard, self.n_rows,
                   self.spec_key]
        return digest(payload, chars=20)

    def describe(self) -> str:
        return f"{self.mr.model}@{self.mr.revision} {self.segments.dataset} shard {self.shard}"


# -- planning ---------------------------------------------------------------------------------

def _check_model_config(mr: ModelRevision, config: ScanConfig) -> tuple[int, int, float]:
    """Fail before any work if the layers or the segment length do not fit the model; returns
    (hidden size, number of layers extracted), what a vector shard's size follows, and the
    forward FLOPs per token (:func:`flops_per_token`), what its time follows."""
    from transformers import AutoConfig

    from dispersion.measure.modeling import max_positions

    try:
        cfg = AutoConfig.from_pretrained(mr.source.location, revision=mr.source.revision,
                                         trust_remote_code=mr.source.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"{mr.field}: cannot load config of {mr.source.describe()!r}: "
                         f"{str(err).splitlines()[0]}") from None
    from dispersion.measure.capture import layer_names
    from dispersion.measure.modeling import causal_lm_problem, num_layers

    problem = causal_lm_problem(cfg)
    if problem:
        raise ModelError(f"{mr.field}: {mr.source.describe()!r} is {problem}; only causal language models "
                         f"(decoders) can be scanned")

    names = layer_names(config.extraction.layers, num_layers(cfg))  # raises naming extraction.layers
    limit = max_positions(cfg)
    need = config.sampling.segment_length + int(config.extraction.prepend_bos)
    if limit is not None and need > limit:
        raise ConfigError(f"sampling.segment_length: {config.sampling.segment_length} tokens"
                          f"{' + BOS' if config.extraction.prepend_bos else ''} exceed the context of "
                          f"{mr.model}@{mr.revision} ({limit})")
    hidden = next((getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model")
                   if isinstance(getattr(cfg, k, None), int)), 0)
    return hidden, len(names), flops_per_token(cfg)


def flops_per_token(cfg) -> float:
    """About the forward FLOPs of one token (Kaplan et al. 2020): 2 x the non-embedding
    parameters of L blocks of width d (attention 4 d^2, less with grouped key/value heads; an MLP of
    2 or, gated, 3 d x inner, 8 d^2 at the usual 4 d), plus 2 d V for the LM head.
    What progress weighs a unit by; 0 when the config names no width."""
    from dispersion.measure.modeling import num_layers

    d = next((getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(cfg, k, None), int)),
             0)
    inner = next((getattr(cfg, k) for k in ("intermediate_size", "n_inner", "ffn_dim")
                  if isinstance(getattr(cfg, k, None), int)), 4 * d)
    mlp = 3 * d * inner if getattr(cfg, "model_type", "") in ("llama", "mistral", "qwen2", "gemma") else 2 * d * inner
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    attn = 2 * d * d + 2 * d * (d * kv // heads if isinstance(heads, int) and isinstance(kv, int) else d)  # q, o; k, v
    return 2.0 * (num_layers(cfg) * (attn + mlp) + d * int(getattr(cfg, "vocab_size", 0) or 0))


def publish_bytes(unit: WorkUnit, hidden: int, n_layers: int) -> int:
    """About how many bytes one unit publishes: a float16 vector of ``hidden`` values and three
    scalars per segment and target (layer x site x pool or context length), and the features."""
    ex = unit.extraction or ExtractionSpec()
    targets = n_layers * len(ex.sites) * (len(ex.pools) + len(ex.context_lengths))
    return unit.n_rows * (targets * (2 * hidden + 24) + 64 + 16 * len(ex.context_lengths))


def warn_if_short_of_space(units: list[WorkUnit], widths: dict[str, tuple[int, int]], store: Store,
                           log: Callable[[str], None]) -> int:
    """On a local root, one warning line when the units not done yet will publish more than
    the free space of the device holding it; returns the estimate (bytes)."""
    import shutil

    if not store.local:
        return 0
    need = sum(publish_bytes(u, *widths[u.mr.field]) for u in units if not store.exists(u.marker_rel))
    folder = store.base
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if need > free:
        log(f"warning: this scan will publish about {_size(need)} into {store.url()}, which has {_size(free)} free: "
            f"it stops with 'no space left' when the device is full (finished units are kept)")
    return need


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def prepare_segments(config: ScanConfig, store: Store, tokenizer, tok_fp: str,
                     log: Callable[[str], None] = print, num_segments: int | None = None, *,
                     defer: list[Callable[[], None]] | None = None,
                     sample: bool = True) -> dict[str, SegmentSet]:
    """Sample (or reuse) the segments of every dataset for one tokenizer: ``num_segments``
    per dataset (default ``sampling.num_segments``).

    Every missing sample is drawn before any is written, so a bad dataset (missing text
    field, too few segments) publishes nothing. With ``defer`` the writes are not done but
    appended to it as one function (the plan publishes after every sample is drawn);
    ``sample=False`` only reuses published samples: a missing one is an error (``report``
    and ``analyze`` on a root that was never scanned)."""
    s = config.sampling
    if num_segments is not None:
        s = s.model_copy(update={"num_segments": num_segments})
    out: dict[str, SegmentSet] = {}
    todo: list[tuple[SegmentSet, pa.Table, dict]] = []
    for i, ds in enumerate(config.datasets):
        key = sample_key(dataset_key(ds), tok_fp, s.num_segments, s.segment_length, s.seed, s.shard_size)
        rows = tuple(b - a for a, b in shard_slices(s.num_segments, s.shard_size))
        seg = SegmentSet(ds.name, key, rows, s.seed)
        out[ds.name] = seg
        try:
            marker = store.read_json(seg.marker_rel)
        except IntegrityError as err:  # an unreadable marker: sample again
            log(f"warning: {err.path}: {err.reason}; sampling {ds.name} again")
            marker = None
        if marker and marker.get("rows") == list(rows):
            damage = check_marker(store, seg.marker_rel, marker, first_only=True)
            if not damage:
                continue
            if not sample:  # report, analyze: the scan samples it again
                raise IntegrityError(damage[0].path, damage[0].reason)
            log(f"warning: {damage[0].line()}; sampling {ds.name} again")
        if not sample:
            raise DataError(f"root: {store.url()} holds no scan of this config (no segments of dataset "
                            f"{ds.name!r} for these sampling settings); run `dispersion scan` first")
        t0 = time.perf_counter()
        try:
            table = sample_segments(document_source(ds), tokenizer, length=s.segment_length,
                                    num_segments=s.num_segments, seed=s.seed, dataset_key=dataset_key(ds),
                                    dataset_name=ds.name)
        except DataError as err:
            msg = str(err)
            raise DataError(msg if msg.startswith("datasets.") else f"datasets.{i}.{msg}") from None
        log(f"sampled {s.num_segments} segments of {s.segment_length} tokens from {ds.name} "
            f"in {time.perf_counter() - t0:.1f}s")
        todo.append((seg, table, {"rows": list(rows), "dataset": ds.model_dump(), "tokenizer": tok_fp,
                                  "sampling": s.model_dump()}))
    def publish() -> None:
        for seg, table, marker in todo:
            sums = {}
            for k, (a, b) in enumerate(shard_slices(s.num_segments, s.shard_size)):
                sums[seg.shard_rel(k)] = store.write_table(seg.shard_rel(k), table.slice(a, b - a))
            store.write_json(seg.marker_rel, {**marker, CHECKSUMS: sums})

    if defer is None:
        publish()
    elif todo:
        defer.append(publish)
    return out


def check_sample_sizes(config: ScanConfig, bin_size: int) -> None:
    """Every (model, dataset) sample must give the correlations at least :data:`MIN_POINTS`
    bins of ``bin_size`` segments (``analysis.bin_size``): a ConfigError naming the fields and
    the sizes that would do."""
    for i, m in enumerate(config.models):
        n = m.num_segments or config.sampling.num_segments
        if n // bin_size < MIN_POINTS:
            field = f"models.{i}.num_segments" if m.num_segments else "sampling.num_segments"
            raise ConfigError(
                f"analysis.bin_size: {n} segments ({field}) make {n // bin_size} bin(s) of {bin_size} "
                f"and a correlation needs {MIN_POINTS}: set analysis.bin_size to at most "
                f"{n // MIN_POINTS} or {field} to at least {MIN_POINTS * bin_size}")


def plan(config: ScanConfig, store: Store, log: Callable[[str], None] = print, *,
         sample: bool = True, bin_size: int | None = None) -> list[WorkUnit]:
    """All work units of a scan, with segments sampled and stored (done units included).

    Nothing is published before every check that can fail cheaply has passed: each
    model's config (a causal language model whose layers and context fit the request), its
    weights (present, in safetensors), every tokenizer, and every missing sample drawn.
    ``sample=False`` (``report``, ``analyze``) reuses the published samples only, refuses a
    root without them and skips the weight check: nothing is extracted then. With ``bin_size``
    (a run that bins its samples), samples too small to correlate are refused
    (:func:`check_sample_sizes`) once the models and datasets have passed their checks."""
    from dispersion.measure.compiled import use_compile
    from dispersion.measure.head import use_fused
    from dispersion.measure.modeling import check_weights, resolve_device, resolve_dtype

    device = resolve_device(config.extraction.device)
    if config.extraction.skip_first >= config.sampling.segment_length:
        raise ConfigError(f"extraction.skip_first: {config.extraction.skip_first} drops every token of a "
                          f"{config.sampling.segment_length}-token segment")
    for c in config.extraction.context_lengths:
        if c > config.sampling.segment_length or (c < 2 and not config.extraction.prepend_bos):
            raise ConfigError(f"extraction.context_lengths: {c} is outside 1..segment_length "
                              f"({config.sampling.segment_length}; 2.. without prepend_bos)")
    units: list[WorkUnit] = []
    seg_cache: dict[tuple[str, int, int], dict[str, SegmentSet]] = {}
    tok_cache: dict[tuple, tuple] = {}
    mrs = model_revisions(config, log=log)
    widths: dict[str, tuple[int, int]] = {}
    flops: dict[str, float] = {}
    for mr in mrs:
        hidden, n_layers, flops[mr.field] = _check_model_config(mr, config)
        widths[mr.field] = (hidden, n_layers)
        if sample:
            check_weights(mr.source, field=mr.field)
    for mr in mrs:  # every tokenizer loads before anything is sampled
        tkey = (mr.source.location, mr.source.revision)
        if tkey not in tok_cache:
            tok = load_tokenizer(mr.source, field=mr.field)
            tok_cache[tkey] = (tok, tokenizer_fingerprint(tok))
    if bin_size is not None:
        check_sample_sizes(config, bin_size)
    publish: list[Callable[[], None]] = []  # every missing sample is drawn before any is written
    warned: set[str] = set()  # a dtype warning once per scan, not once per model
    for mr in mrs:
        tok, fp = tok_cache[(mr.source.location, mr.source.revision)]
        n = mr.num_segments or config.sampling.num_segments
        dtype = resolve_dtype(mr.dtype, device, warn=warned.add)
        spec_key = config.extraction.key(dtype)
        tokens = n * config.sampling.segment_length * len(config.sampling.all_seeds) * len(config.datasets)
        fused, why = use_fused(config.extraction.fused_head, dtype, tokens)
        compiled, why_not = use_compile(config.extraction.compile, str(device), tokens * flops[mr.field])
        warned.update(line for line in (why, why_not) if line)
        for seed in config.sampling.all_seeds:  # one independent sample per seed
            if (fp, n, seed) not in seg_cache:
                seeded = config.model_copy(update={"sampling": config.sampling.model_copy(update={"seed": seed})})
                seg_cache[(fp, n, seed)] = prepare_segments(seeded, store, tok, fp, log, num_segments=n,
                                                            defer=publish, sample=sample)
            for seg in seg_cache[(fp, n, seed)].values():
                units.extend(WorkUnit(mr, seg, k, spec_key, dtype, config.extraction,
                                      flops[mr.field] * config.sampling.segment_length, fused, compiled)
                             for k in range(len(seg.shard_rows)))
    for line in sorted(warned):
        log(line)
    if sample:
        warn_if_short_of_space(units, widths, store, log)
    for write in publish:
        write()
    return units


# -- execution --------------------------------------------------------------------------------

def load_extractor(mr: ModelRevision, spec: ExtractionSpec, dtype: str, fused_head: bool = False,
                   compiled: bool = False):
    """Load model and tokenizer once; the returned Extractor serves all of its units."""
    from dispersion.measure.capture import bos_or_eos, resolve_bos
    from dispersion.measure.extract import Extractor
    from dispersion.measure.modeling import load_model, resolve_device

    tok = load_tokenizer(mr.source, field=mr.field)
    bos = resolve_bos(tok, "extraction.prepend_bos") if spec.prepend_bos else None
    model = load_model(mr.source, dtype=dtype, device=resolve_device(spec.device), field=mr.field)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (bos_or_eos(tok) or 0)
    return Extractor(model, layers=spec.layers, sites=spec.sites, pools=spec.pools,
                     prepend_bos=spec.prepend_bos, bos_token_id=bos, skip_first=spec.skip_first,
                     context_lengths=spec.context_lengths, batch_size=spec.batch_size,
                     nll_chunk_tokens=spec.nll_chunk_tokens, pad_token_id=pad, fused_head=fused_head,
                     compile_blocks=compiled)


def run_unit(unit: WorkUnit, extractor, store: Store, progress: Callable[[int], None] | None = None) -> dict:
    """Extract one shard and publish its features, vectors and marker. Returns the marker."""
    t0 = time.perf_counter()
    seg = unit.segments.read_shard(store, unit.shard)
    if seg.num_rows != unit.n_rows:
        raise DataError(f"{unit.segments.shard_rel(unit.shard)}: {seg.num_rows} rows, expected {unit.n_rows}")
    tokens = [np.asarray(t, dtype=np.int32) for t in seg.column("token_ids").to_pylist()]
    out = extractor.extract(tokens, progress=progress)
    ids = seg.column("segment_id")
    feats = {"segment_id": ids, "n_tokens": seg.column("n_tokens")}
    feats.update({k: v for k, v in out.features.items()})
    schema = feature_schema(extractor.context_lengths, extractor.context_pools)
    sums = {unit.features_rel: store.write_table(unit.features_rel,
                                                 pa.table({f.name: feats[f.name] for f in schema}, schema=schema))}
    files = [unit.features_rel]
    for (layer, site, pool), vec in out.vectors.items():
        table = pa.table({"segment_id": ids, "vec": vector_column(vec), "norm": out.norms[(layer, site, pool)],
                          "within": out.within[(layer, site)]}, schema=vector_schema(vec.shape[1]))
        rel = unit.vectors_rel(layer, site, pool)
        sums[rel] = store.write_table(rel, table)
        files.append(rel)
    marker = {"key": unit.key, "rows": unit.n_rows, "files": files, "features": files[0], "vectors": files[1:],
              CHECKSUMS: sums,
              "unit": unit.describe(),
              "seconds": round(time.perf_counter() - t0, 3), "forward_s": round(out.timings["forward_s"], 3),
              **({"compile_s": round(out.timings["compile_s"], 3)} if "compile_s" in out.timings else {}),
              "host": platform.node(), "version": __version__}
    store.write_json(unit.marker_rel, marker)
    return marker


@dataclass
class ScanStats:
    planned: int = 0
    skipped: int = 0
    ran: int = 0
    segments: int = 0
    seconds: float = 0.0
    markers: list[dict] = field(default_factory=list)


def execute(units: list[WorkUnit], config: ScanConfig, store: Store, progress: bool = True,
            log: Callable[[str], None] = print, *, owner: str | None = None,
            lease_seconds: float = LEASE_SECONDS) -> ScanStats:
    """Run every pending unit in this process (:func:`dispersion.measure.units.run_units`:
    leased, resumable, each model@revision loaded once)."""
    units = [u if u.extraction is not None else replace(u, extraction=config.extraction) for u in units]
    done = run_units(units, store, what="extract", unit_name="segments", progress=progress, log=log, owner=owner,
                     lease_seconds=lease_seconds)
    return ScanStats(planned=done.planned, skipped=done.skipped, ran=done.ran, segments=done.rows,
                     seconds=done.seconds, markers=done.markers)


def new_run_id(config: ScanConfig) -> str:
    """``{UTC time}-{config digest}-{random}``: sorts by time; scans finishing in the same second
    (on one host or several) still get their own id."""
    return (time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + digest(config.model_dump(mode="json"), chars=6)
            + "-" + uuid.uuid4().hex[:6])


def write_manifest(config: ScanConfig, store: Store, units: list[WorkUnit], stats: ScanStats) -> str:
    run_id = new_run_id(config)
    store.write_json(layout.manifest_path(run_id), {
        "config": config.model_dump(), "version": __version__, "python": platform.python_version(),
        "units": [{"unit": u.describe(), "key": u.key, "features": u.features_rel} for u in units],
        "stats": {k: v for k, v in asdict(stats).items() if k != "markers"},
        "timings": [{k: m[k] for k in ("unit", "seconds", "forward_s", "compile_s") if k in m} for m in stats.markers],
    })
    return run_id

