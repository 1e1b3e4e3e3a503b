"""The run config: a scan (:class:`dispersion.core.config.ScanConfig`) plus its analyses.

``analysis.steps`` takes the names of the registered steps (:data:`dispersion.analyses.STEPS`)
or ``all``; every step that declares an options model has a field ``analysis.<step>`` of that
type. Both are generated from the registry, so a new step needs no edit here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, create_model, model_validator

from dispersion.analyses import STEPS, AnalysisOptions
from dispersion.core.config import SamplingSpec, ScanConfig, read_yaml, validate
from dispersion.core.errors import ConfigError
from dispersion.core.overrides import apply_overrides
from dispersion.measure.binning import MIN_POINTS
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


    def check_sample_sizes(self) -> None:
        """Every (model, dataset) sample must give the correlations at least
        :data:`MIN_POINTS` bins of ``analysis.bin_size`` segments: checked before anything is
        sampled or extracted, once the models and datasets have passed their checks."""
        bin_size = self.analysis.bin_size
        for i, m in enumerate(self.models):
            n = m.num_segments or self.sampling.num_segments
            if n // bin_size < MIN_POINTS:
                field = f"models.{i}.num_segments" if m.num_segments else "sampling.num_segments"
                raise ConfigError(
                    f"analysis.bin_size: {n} segments ({field}) make {n // bin_size} bin(s) of {bin_size} "
                    f"and a correlation needs {MIN_POINTS}: set analysis.bin_size to at most "
                    f"{n // MIN_POINTS} or {field} to at least {MIN_POINTS * bin_size}")


def parse_config(data: object, source: str = "<config>") -> RunConfig:
    """Validate a mapping into a RunConfig; errors name the field path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return validate(RunConfig, data, source)


COMMAND_LINE_BINS = 10  # bins per sample of a command-line run that sets no analysis.bin_size

# The base of a command line that names models but no config: the embedded corpus's two
# held-out domains, every other setting at its default.
COMMAND_LINE_BASE: dict = {
    "datasets": [{"name": "prose", "embedded": "prose", "split": "validation"},
                 {"name": "code", "embedded": "code", "split": "validation"}],
}


def load_config(path: str | Path | None, *, models: Sequence[str] = (), datasets: Sequence[str] = (),
                overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a YAML run config from a local path or an fsspec URL, with the
    command line's ``--model``, ``--dataset`` and ``-o key.path=value`` applied first
    (:mod:`dispersion.core.overrides`). Without a path, ``models`` is required and the base is
    :data:`COMMAND_LINE_BASE`, rooted at ``runs/<first model>`` and named after it (and after
    the ``--dataset`` names when given, so that a second run into the same root with other
    datasets adds its results beside the first's)."""
    if path is None:
        if not models:
            raise ConfigError("give --config FILE or at least one --model")
        data = copy.deepcopy(COMMAND_LINE_BASE)
        source = "<command line>"
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
    return parse_config(data, source)


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
