"""Model sources: where a configured model comes from, resolved to loadable revisions.

A :class:`dispersion.core.config.ModelSpec` sets exactly one source field
(:data:`dispersion.core.config.MODEL_SOURCES`); :data:`SOURCES` holds one entry per field,
``entry(spec, config, field, log) -> [ModelRevision, ...]``:

* ``id``: a hub repository or a local folder, at each configured revision (a
  :class:`~dispersion.core.config.RevisionRange` expands over the hub's ``stepN`` branches);
* ``zoo``: an embedded zoo model, built already (``dispersion zoo build``, or the scan's own
  build step), at its checkpoints (``all``: every one present);
* ``gguf`` / ``packaged``: one GGUF file (a path or URL, or the file a Python package ships),
  converted once into ``config.model_cache``, at revision ``main``.

A new source kind is one function here, one entry in :data:`SOURCES` and its field on
``ModelSpec``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dispersion.core.config import ModelSpec, ScanConfig
from dispersion.measure.modeling import ModelSource, check_hub_source, resolve_source, source_fingerprint
from dispersion.measure.zoo_cache import zoo_model_dir, zoo_revisions

Log = Callable[[str], None] | None


@dataclass(frozen=True)
class ModelRevision:
    """One model at one revision, resolved to something loadable."""

    model: str
    revision: str
    source: ModelSource
    dtype: str  # configured dtype ("auto" resolved at load time)
    field: str  # config path, for error messages
    fingerprint: str  # identifies the weights (see dispersion.measure.modeling.source_fingerprint)
    num_segments: int | None = None  # this model's segments per dataset (None: sampling.num_segments)


def at_revisions(spec: ModelSpec, model_id: str, revisions: Sequence[str], field: str) -> list[ModelRevision]:
    """``model_id`` (a hub id or a local folder) at each revision, checked and fingerprinted."""
    out = []
    for rev in revisions:
        src = resolve_source(model_id, rev, field=f"{field}.{spec.source_kind}",
                             trust_remote_code=spec.trust_remote_code)
        check_hub_source(src, field=f"{field}.id")
        out.append(ModelRevision(spec.name, rev, src, spec.dtype, field, source_fingerprint(src), spec.num_segments))
    return out


def hub_or_folder(spec: ModelSpec, config: ScanConfig, field: str, log: Log = None) -> list[ModelRevision]:
    """``id``: a hub repository or local folder at its revisions (a range expands over ``stepN``)."""
    assert spec.id is not None and spec.revisions != "all"  # ModelSpec validation: 'all' is zoo only
    revisions = spec.revisions
    if not isinstance(revisions, list):  # a RevisionRange over stepN branches
        from dispersion.measure.revisions import expand_revisions

        revisions = expand_revisions(spec.id, revisions)
    return at_revisions(spec, spec.id, revisions, field)


def zoo_model(spec: ModelSpec, config: ScanConfig, field: str, log: Log = None) -> list[ModelRevision]:
    """``zoo``: a built zoo model at its checkpoints (``all``: every one present)."""
    assert spec.zoo is not None
    root = zoo_model_dir(config.zoo.cache, spec.zoo)
    if spec.revisions == "all":
        revisions = zoo_revisions(config.zoo.cache, spec.zoo)
    elif isinstance(spec.revisions, list):
        revisions = spec.revisions
    else:  # a RevisionRange over the zoo's stepN folders
        from dispersion.measure.revisions import expand_revisions

        revisions = expand_revisions(str(root), spec.revisions)
    return at_revisions(spec, str(root), revisions, field)


def gguf_file(spec: ModelSpec, config: ScanConfig, field: str, log: Log = None) -> list[ModelRevision]:
    """``gguf`` / ``packaged``: one file, converted into ``config.model_cache``; revision ``main``."""
    from dispersion.measure.gguf import spec_gguf

    conv = spec_gguf(spec, config.model_cache, field=field, log=log)
    src = resolve_source(str(conv.folder), None, field=f"{field}.{spec.source_kind}")
    return [ModelRevision(spec.name, "main", src, spec.dtype, field, conv.fingerprint, spec.num_segments)]


SOURCES: dict[str, Callable[[ModelSpec, ScanConfig, str, Log], list[ModelRevision]]] = {
    "id": hub_or_folder,
    "zoo": zoo_model,
    "gguf": gguf_file,
    "packaged": gguf_file,
}


def model_revisions(config: ScanConfig, log: Log = None) -> list[ModelRevision]:
    """Every configured model@revision, resolved (zoo models must be built already; GGUF and
    packaged models are converted into ``config.model_cache`` on first use)."""
    return [mr for i, spec in enumerate(config.models)
            for mr in SOURCES[spec.source_kind](spec, config, f"models.{i}", log)]
