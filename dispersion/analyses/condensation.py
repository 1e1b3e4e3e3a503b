"""The ``condensation`` analysis step: embedding-condensation maps (papers 002 and 003,
Sec. 2.1) of each scanned model's untrained and trained checkpoint, their depth correlation
and the heatmap.

The measurement (what is counted, the histograms, the depth correlation) is
:mod:`dispersion.measure.condensation`; the heatmap is
:func:`dispersion.report.condensation.plot_condensation`.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import field_validator

from dispersion.analyses.registry import Planned, Section, Step, StepContext
from dispersion.core.errors import ConfigError
from dispersion.measure.condensation import CondensationSpec, depth_table, maps_from_table, measure_map
from dispersion.measure.units import TableUnit
from dispersion.report.condensation import plot_condensation
from dispersion.report.markdown import md_table


class CondensationOptions(CondensationSpec):
    """Options of the ``condensation`` step (``analysis.condensation``): those of
    :class:`~dispersion.measure.condensation.CondensationSpec`, and

    Attributes:
        zoo_models: embedded zoo models mapped beside the scanned ones (their first and last
            checkpoint, on the same segments, without a scan): e.g. ``[gpt2-small]`` puts two
            GPT-2 sizes side by side.
    """

    zoo_models: list[str] = []

    @field_validator("zoo_models")
    @classmethod
    def _known_zoo_models(cls, names: list[str]) -> list[str]:
        from dispersion.training.zoo import ZOO_MODELS

        unknown = [n for n in names if n not in ZOO_MODELS]
        if unknown:
            raise ValueError(f"unknown zoo model {unknown[0]!r} (known: {', '.join(ZOO_MODELS)})")
        return names


# -- the step ------------------------------------------------------

def plan_step(ctx: StepContext) -> Planned:
    """One map per model and compared revision (``analysis.compare_revisions``, default first
    and last) on the scan's own segments of the first dataset, and per ``zoo_models`` revision
    on a scanned zoo model's segments (same tokenizer): :class:`TableUnit` of
    :func:`dispersion.measure.condensation.measure_map`."""
    import numpy as np

    from dispersion.analyses.layers import compared_revisions
    from dispersion.core.ids import digest
    from dispersion.measure.modeling import resolve_device, resolve_dtype, resolve_source, source_fingerprint
    from dispersion.measure.sources import ModelRevision

    cfg = ctx.config
    spec = ctx.options("condensation")
    if "prepend_bos" not in spec.model_fields_set:  # as the scan's segments were sized for
        spec = spec.model_copy(update={"prepend_bos": cfg.extraction.prepend_bos})
    ds = cfg.datasets[0].name
    device = resolve_device(cfg.extraction.device)
    revs: dict[str, list[str]] = {}
    for u in ctx.units:
        revs.setdefault(u.mr.model, []).append(u.mr.revision)

    def sequences(unit) -> list:
        seqs: list = []
        for k in range(len(unit.segments.shard_rows)):
            seqs += [np.asarray(t, np.int64) for t in
                     unit.segments.read_shard(ctx.store, k).column("token_ids").to_pylist()]
            if len(seqs) >= spec.num_sequences:
                break
        return seqs

    def map_unit(mr, seqs: list, segments: str, dtype: str) -> TableUnit:
        return TableUnit("condensation", mr, (seqs, spec, mr.model, mr.revision, ds),
                         digest([spec.model_dump(mode="json"), segments, ds]), measure_map,
                         dtype=resolve_dtype(dtype, device), device=cfg.extraction.device)

    units = []
    for model, rs in revs.items():
        for rev in compared_revisions(rs, cfg.analysis.compare_revisions):
            unit = next(u for u in ctx.units if u.mr.model == model and u.mr.revision == rev
                        and u.segments.dataset == ds)
            units.append(map_unit(unit.mr, sequences(unit), unit.segments.sample, unit.mr.dtype))
    if spec.zoo_models:  # more zoo sizes, on the segments of a scanned zoo model (same tokenizer)
        from dispersion.measure.zoo_cache import zoo_model_dir, zoo_revisions

        zoo_names = {m.name for m in cfg.models if m.zoo}
        unit = next((u for u in ctx.units if u.mr.model in zoo_names and u.segments.dataset == ds), None)
        if unit is None:
            raise ConfigError("analysis.condensation.zoo_models: needs a zoo model among the scanned models "
                              "(its segments are in the zoo tokenizer)")
        seqs = sequences(unit)
        for name in spec.zoo_models:
            for rev in compared_revisions(zoo_revisions(cfg.zoo.cache, name), cfg.analysis.compare_revisions):
                src = resolve_source(str(zoo_model_dir(cfg.zoo.cache, name)), rev)
                mr = ModelRevision(name, rev, src, unit.mr.dtype, "analysis.condensation.zoo_models",
                                   source_fingerprint(src))
                units.append(map_unit(mr, seqs, unit.segments.sample, unit.mr.dtype))
    return Planned(units=units)


def run(ctx: StepContext) -> Section:
    """Condensation maps (papers 002/003) from the published maps of :func:`plan_step`: the
    zoo's sizes side by side, their depth correlation and the heatmap."""
    table = pa.concat_tables([u.read(ctx.store) for u in ctx.planned["condensation"].units])
    maps = maps_from_table(table)
    depth = depth_table(maps)
    return STEP.section(tables={"condensation": table, "condensation_depth": depth},
                   figures={"condensation": plot_condensation(maps)},
                   markdown=md_table(depth, ["model", "revision", "label", "n_layers", "spearman_r", "kendall_tau"]))


STEP = Step(name="condensation", title="Embedding condensation maps", paper="002/003 (condensation)",
            tables=("condensation", "condensation_depth"), run=run, options=CondensationOptions,
            default=CondensationOptions, plan=plan_step, unit_name="maps")
