"""The run config: a scan (:class:`dispersion.core.config.ScanConfig`) plus its analyses.

``analysis.steps`` takes the names of the registered steps (:data:`dispersion.analyses.STEPS`)
or ``all``; every step that declares an options model has a field ``analysis.<step>`` of that
type. Both are generated from the registry, so a new step needs no edit here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, create_model, model_validator

from dispersion.analyses import STEPS, AnalysisOptions
from dispersion.core.config import ScanConfig, config_data, validate
from dispersion.core.errors import ConfigError
from dispersion.core.overrides import CheckpointSweep
from dispersion.measure.sites import SITES
from dispersion.report.tracking import TrackingSpec

ANALYSIS_STEPS: tuple[str, ...] = tuple(STEPS)

if TYPE_CHECKING:
    AnalysisSpec = AnalysisOptions
else:
    AnalysisSpec = create_model(
        "AnalysisSpec", __base__=AnalysisOptions, __doc__=AnalysisOptions.__doc__,
        steps=(list[Literal[ANALYSIS_STEPS]] | Literal["all"], []),
        **{s.name: (s.options, Field(default_factory=s.default)) for s in STEPS.values() if s.options is not None},
    )


class RunConfig(ScanConfig):
    """A scan and the analyses run on it (``dispersion scan --config``)."""

    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="after")
    def _known_sites(self) -> RunConfig:
        """Sites are the hook sites of :data:`dispersion.measure.sites.SITES`."""
        named = [(f"extraction.sites.{i}", s) for i, s in enumerate(self.extraction.sites)]
        named.append(("analysis.site", self.analysis.site))
        for where, site in named:
            if site not in SITES:
                raise ValueError(f"{where}: unknown site {site!r} (known: {', '.join(SITES)})")
        return self


def parse_config(data: object, source: str = "<config>") -> RunConfig:
    """Validate a mapping into a RunConfig; errors name the field path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return validate(RunConfig, data, source)


def load_config(path: str | Path | None, *, models: Sequence[str] = (), datasets: Sequence[str] = (),
                overrides: Sequence[str] = (), sweep: CheckpointSweep | None = None) -> RunConfig:
    """Read and validate a YAML run config from a local path or an fsspec URL, with the
    command line's ``--model``, ``--dataset`` and ``-o key.path=value`` applied first and then a
    checkpoint ``sweep`` (:func:`dispersion.core.config.config_data`)."""
    return validate(RunConfig, *config_data(path, models=models, datasets=datasets, overrides=overrides,
                                            sweep=sweep))
