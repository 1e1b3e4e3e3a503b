"""The paper's analyses, one module per step (see :mod:`dispersion.analyses.registry`).

Adding a step: write ``dispersion/analyses/<name>.py`` ending with ``STEP = Step(...)`` and
add its name to :data:`STEP_MODULES`, at the place its section should take in the report.
"""

from __future__ import annotations

from importlib import import_module

from dispersion.analyses.registry import AnalysisOptions, Section, Step, StepContext, collect, run_order

STEP_MODULES: tuple[str, ...] = (
    "domains",
    "context",
    "layers",
    "finetune",
    "clusters",
    "heldout",
    "vendi",
    "hardness",
    "gap",
    "trajectory",
    "knnlm",
    "condensation",
)

STEPS: dict[str, Step] = collect(import_module(f"{__name__}.{name}").STEP for name in STEP_MODULES)

__all__ = ["STEPS", "STEP_MODULES", "AnalysisOptions", "Section", "Step", "StepContext", "collect", "run_order"]
