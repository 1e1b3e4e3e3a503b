"""Fine-tuning effect on dispersion (paper 001 Sec. 2.2(3), A.2, Fig. 6): each
``analysis.finetune`` entry is trained and measured before and after on its domain and a
control by the runner (a unit of :func:`dispersion.training.finetune.finetune_and_measure`);
the step reads the published tables (see :mod:`dispersion.training.finetune`)."""

from __future__ import annotations

import pyarrow as pa

from dispersion.analyses.registry import Planned, Section, Step, StepContext
from dispersion.core.errors import ConfigError
from dispersion.core.ids import digest
from dispersion.measure.units import TableUnit, source_of
from dispersion.report.markdown import md_table
from dispersion.training.finetune import FinetuneSpec

# -- the step ------------------------------------------------------

def plan_step(ctx: StepContext) -> Planned:
    """Each ``analysis.finetune`` entry (default: LoRA and full fine-tuning of the first zoo
    model on prose) is one :class:`TableUnit` of
    :func:`dispersion.training.finetune.finetune_and_measure`: trained into
    ``{zoo.cache}/finetuned/{run}/{i}-{model}-{key}/{method}`` (local; keyed by the base weights
    and the spec, so a rebuilt zoo or a changed spec fine-tunes afresh; resumable) and measured
    before and after on its domain and the control."""
    from pathlib import Path

    from dispersion.measure.modeling import resolve_device, resolve_dtype, source_fingerprint
    from dispersion.measure.sources import ModelRevision
    from dispersion.training.finetune import FinetuneRun, base_source, finetune_and_measure, parse_finetune_spec

    cfg = ctx.config
    specs = list(ctx.options("finetune"))
    if not specs:
        zoo_models = [m for m in cfg.models if m.zoo is not None]
        if not zoo_models:
            raise ConfigError("analysis.finetune: give the models to fine-tune (no zoo model to default to)")
        specs = [parse_finetune_spec({"method": m, "zoo": zoo_models[0].zoo}) for m in ("lora", "full")]
    dtype = resolve_dtype("auto", resolve_device(cfg.extraction.device))  # what the measurement runs in
    units = []
    for i, spec in enumerate(specs):
        name = spec.zoo or Path(spec.id).name
        base = base_source(spec, cfg.zoo)
        fingerprint = source_fingerprint(base)
        stem = f"{i}-{name}"
        key = digest({"base": fingerprint, "spec": spec.model_dump(mode="json")})
        run = FinetuneRun(spec, str(Path(cfg.zoo.cache) / "finetuned" / cfg.name / f"{stem}-{key}"), stem, cfg.zoo,
                          num_segments=min(cfg.sampling.num_segments, 256),
                          segment_length=min(cfg.sampling.segment_length, 128), pool=cfg.analysis.pool,
                          seed=cfg.sampling.seed, batch_size=cfg.extraction.batch_size, device=cfg.extraction.device)
        mr = ModelRevision(name, base.revision or "main", base, dtype, f"analysis.finetune.{i}", fingerprint)
        units.append(TableUnit("finetune", mr, run, run.key(), finetune_and_measure, load_with=source_of,
                               dtype=dtype, device=cfg.extraction.device))
    return Planned(units=units)


def run(ctx: StepContext) -> Section:
    """Base vs fine-tuned perplexity and dispersion (paper 001 Fig. 6) from the published tables
    of :func:`plan_step`."""
    from dispersion.training.finetune import figure_finetune

    table = pa.concat_tables([u.read(ctx.store) for u in ctx.planned["finetune"].units])
    return STEP.section(tables={"finetune": table}, figures={"finetune": figure_finetune(table)},
                   markdown=md_table(table, ["model", "method", "domain", "role", "checkpoint", "ppl", "dispersion",
                                              "within"]))


STEP = Step(name="finetune", title="Fine-tuning effect on dispersion", paper="001 Sec. 2.2(3), A.2, Fig. 6",
            tables=("finetune",), run=run, options=list[FinetuneSpec], default=list, plan=plan_step,
            unit_name="runs")
