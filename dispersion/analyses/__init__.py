"""The paper's analyses, one module per step (see :mod:`dispersion.analyses.registry`).

Adding a step: write ``dispersion/analyses/<name>.py`` ending with ``STEP = Step(...)`` and
add the module to the list below, in the order its section should appear in the report.
"""

from __future__ import annotations

from dispersion.analyses import (
                                 clusters,
                                 condensation,
                                 context,
                                 domains,
                                 finetune,
                                 gap,
                                 heldout,
                                 layers,
                                 trajectory,
                                 vendi,
)
from dispersion.analyses.registry import AnalysisOptions, Section, Step, StepContext, collect, run_order

STEPS: dict[str, Step] = collect([
    domains.STEP,
    context.STEP,
    layers.STEP,
    finetune.STEP,
    clusters.STEP,
    heldout.STEP,
    vendi.STEP,
    gap.STEP,
    trajectory.STEP,
    condensation.STEP,
])

__all__ = ["STEPS", "AnalysisOptions", "Section", "Step", "StepContext", "collect", "run_order"]
