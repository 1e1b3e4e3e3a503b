"""Fine-tuning effect on dispersion (paper 001 Sec. 2.2(3), A.2, Fig. 6): each
``analysis.finetune`` entry is trained and measured before and after on its domain and a
control (see :mod:`dispersion.training.finetune`)."""

from __future__ import annotations

import pyarrow as pa

from dispersion.analyses.registry import Section, Step, StepContext
from dispersion.core.errors import ConfigError
from dispersion.core.ids import digest
from dispersion.report.markdown import md_table
from dispersion.training.finetune import FinetuneSpec

# -- the step ------------------------------------------------------

def run(ctx: StepContext) -> Section:
    """Each ``analysis.finetune`` entry (default: LoRA and full fine-tuning of the first zoo
    model on prose) is trained into ``{zoo.cache}/finetuned/{run}/{i}-{model}-{base key}/{method}``
    (local; resumable, skipped when done) and measured before and after on its domain and the control."""
    import shutil
    from pathlib import Path

    from dispersion.measure.modeling import source_fingerprint
    from dispersion.training.finetune import (
        base_source,
        dispersion_before_after,
        figure_finetune,
        finetune,
        parse_finetune_spec,
    )

    cfg = ctx.config
    specs = list(ctx.options("finetune"))
    if not specs:
        zoo_models = [m for m in cfg.models if m.zoo is not None]
        if not zoo_models:
            raise ConfigError("analysis.finetune: give the models to fine-tune (no zoo model to default to)")
        specs = [parse_finetune_spec({"method": m, "zoo": zoo_models[0].zoo}) for m in ("lora", "full")]
    tables = []
    L = min(cfg.sampling.segment_length, 128)
    for i, spec in enumerate(specs):
        name = spec.zoo or Path(spec.id).name
        # keyed by the base weights and the spec: a rebuilt zoo or a changed spec fine-tunes afresh
        # (older folders are removed)
        base_key = digest({"base": source_fingerprint(base_source(spec, cfg.zoo)),
                           "spec": spec.model_dump(mode="json")})
        out = Path(cfg.zoo.cache) / "finetuned" / cfg.name / f"{i}-{name}-{base_key}"
        for old in [out.parent / f"{i}-{name}", *out.parent.glob(f"{i}-{name}-*")]:
            if old != out and old.is_dir() and len(old.name) - len(f"{i}-{name}") in (0, 13):
                shutil.rmtree(old, ignore_errors=True)
        final = finetune(spec, out, zoo=cfg.zoo)
        ctx.log(f"finetune: {name} {spec.method} on {spec.domain} -> {final}")
        tables.append(dispersion_before_after(spec, final, zoo=cfg.zoo,
                                              num_segments=min(cfg.sampling.num_segments, 256), segment_length=L,
                                              pool=cfg.analysis.pool, seed=cfg.sampling.seed,
                                              batch_size=cfg.extraction.batch_size, device=cfg.extraction.device))
    table = pa.concat_tables(tables)
    return STEP.section(tables={"finetune": table}, figures={"finetune": figure_finetune(table)},
                   markdown=md_table(table, ["model", "method", "domain", "role", "checkpoint", "ppl", "dispersion",
                                              "within"]))


STEP = Step(name="finetune", title="Fine-tuning effect on dispersion", paper="001 Sec. 2.2(3), A.2, Fig. 6",
            tables=("finetune",), run=run, options=list[FinetuneSpec], default=list,)
