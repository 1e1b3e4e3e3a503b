"""The analysis-step registry: what a step is, how steps are ordered, run and published.

A step is one module of :mod:`dispersion.analyses` that ends with::

    STEP = Step(name="vendi", title="Vendi score vs cosine dispersion", paper="001 A.5",
                tables=("vendi",), run=run)

and is listed once in ``dispersion/analyses/__init__.py``. From that list come the
config's ``analysis.steps`` values, the option models on ``analysis.<step>``, the CLI help,
the run order (every step after the steps it ``needs`` or ``uses``, whatever order the
user typed) and the step table of docs/ANALYSES.md.

``run(ctx)`` reads the scan's stored shards or the main tables (``bins``, ``correlations``)
and returns a :class:`Section`: tables (published as ``results/{table}/{run}.parquet``, one
DuckDB view each), figures (``results/report/{run}/{name}.png``, the same figure as ``.svg``
beside it) and a markdown section for the report.

A step that needs new measurements (model forward passes: kNN-LM shards, query sets) also
declares ``plan(ctx) -> Planned``: the units of :mod:`dispersion.measure.units` it needs.
The runner computes them before the step runs (in process here, on Ray actors in the flows,
leased and resumable either way), and its ``run`` only reads their published shards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import pyarrow as pa
from pydantic import Field

from dispersion.core.config import LayerRef, Pool, ScanConfig, Site, Strict
from dispersion.core.errors import ConfigError, DataError
from dispersion.core.layout import figure_path, result_path, section_path
from dispersion.core.storage import Store
from dispersion.report.figures import figure_files


class BootstrapSpec(Strict):
    """Percentile bootstrap intervals of every binned correlation
    (:mod:`dispersion.measure.bootstrap`): ``n`` resamples of a partition's segments (0: no
    intervals), each re-binned and re-correlated; ``level`` the interval's coverage; ``seed``
    with the partition's key seeds its resamples (every layer and pool of one partition shares
    them, so their intervals are paired)."""

    n: Annotated[int, Field(ge=0)] = 1000
    level: Annotated[float, Field(gt=0, lt=1)] = 0.95
    seed: int = 0


class AnalysisOptions(Strict):
    """Paper 001 A.1.2 steps 3-7: bins of B segments, Algorithm 1 picks K of them; then the
    steps named in ``steps`` (or ``all``). Each step with options has a field of its name.

    ``compare_revisions``: the untrained and trained checkpoints of the ``layers`` and
    ``condensation`` steps (default: each model's first and last by step). ``scores``: a
    CSV/Parquet table (model, revision, task, score; a local path or any fsspec URL) for the
    ``gap`` and ``trajectory`` steps; zoo models also bring their validation loss.
    ``bootstrap``: the intervals of every correlation (:class:`BootstrapSpec`).
    """

    bin_size: Annotated[int, Field(ge=2)] = 100
    select_bins: Annotated[int, Field(ge=2)] | None = None
    layer: LayerRef = "final"
    site: Site = "block"
    pool: Pool = "last"
    steps: list[str] | str = []
    compare_revisions: list[str] | None = None
    scores: str | None = None
    bootstrap: BootstrapSpec = BootstrapSpec()

    def enabled(self, step: str) -> bool:
        return self.steps == "all" or step in self.steps


@dataclass
class Planned:
    """What a step that measures (``Step.plan``) needs computed before it runs: its units
    (:mod:`dispersion.measure.units`; run by the scan's runner, in process or on Ray) and
    whatever else its ``run`` reads of the plan (``detail``). The step's ``run`` only reads the
    units' published shards."""

    units: list
    detail: Any = None


@dataclass
class StepContext:
    config: Any                      # dispersion.config.RunConfig
    store: Store
    units: list                      # dispersion.measure.scan.WorkUnit, all done
    tables: dict[str, pa.Table]      # main tables (bins, correlations) and earlier steps' tables
    log: Callable[[str], None] = print
    planned: dict[str, Planned] = field(default_factory=dict)  # steps' plans, their units published
    progress: bool = False           # progress lines while a step's units are measured in process
    runner: Callable[..., Any] | None = None  # computes pending units (dispersion.measure.units.run_units);
    #                                   None: a step's units must be published already

    @property
    def scan(self) -> ScanConfig:
        return self.config

    @property
    def analysis(self) -> AnalysisOptions:
        return self.config.analysis

    def options(self, step: str) -> Any:
        """The validated ``analysis.<step>`` options of a step that declares an options model."""
        return getattr(self.config.analysis, step)

    def main(self) -> tuple[pa.Table, pa.Table, str, str, str]:
        """The main tables and the analysed (layer, site, pool)."""
        a = self.analysis
        return self.tables["bins"], self.tables["correlations"], str(a.layer), a.site, a.pool


@dataclass
class Section:
    name: str
    title: str
    paper: str
    tables: dict[str, pa.Table] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)  # PNG bytes (FigureBytes: with .svg)
    markdown: str = ""


@dataclass(frozen=True)
class Step:
    """One analysis step: its name, what it writes, what must run first, its options."""

    name: str
    title: str
    paper: str
    tables: tuple[str, ...]
    run: Callable[[StepContext], Section]
    needs: tuple[str, ...] = ()          # always run before this one (added when not selected)
    uses: tuple[str, ...] = ()           # read when selected: run before this one
    options: Any = None                  # type of ``analysis.<name>`` (a pydantic model, a list of one)
    default: Callable[[], Any] | None = None  # its default value
    plan: Callable[[StepContext], Planned] | None = None  # the units it measures (none: reads shards only)
    unit_name: str = "rows"              # what its units' sizes count, for progress

    def section(self, **parts: Any) -> Section:
        return Section(self.name, self.title, self.paper, **parts)


def collect(steps: Iterable[Step]) -> dict[str, Step]:
    """The registry: name -> step, in report order; rejects duplicate names and unknown needs."""
    out: dict[str, Step] = {}
    for s in steps:
        if s.name in out:
            raise ValueError(f"analysis step {s.name!r} registered twice")
        out[s.name] = s
    for s in out.values():
        for dep in (*s.needs, *s.uses):
            if dep not in out:
                raise ValueError(f"analysis step {s.name!r} depends on unknown step {dep!r}")
    return out


def run_order(registry: Mapping[str, Step], selected: Iterable[str]) -> list[str]:
    """The selected steps plus their ``needs``, each after its ``needs`` and selected ``uses``;
    otherwise in registry (report) order."""
    want: set[str] = set()

    def add(name: str) -> None:
        if name not in registry:
            raise ConfigError(f"analysis.steps: unknown step {name!r} (known: {', '.join(registry)})")
        if name not in want:
            want.add(name)
            for dep in registry[name].needs:
                add(dep)

    for name in selected:
        add(name)
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"analysis.steps: dependency cycle through {name!r}")
        visiting.add(name)
        for dep in (*registry[name].needs, *registry[name].uses):
            if dep in want:
                visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in registry:
        if name in want:
            visit(name)
    return order


def selected_steps(registry: Mapping[str, Step], analysis: AnalysisOptions, only: list[str] | None = None) -> list[str]:
    """The steps a run does, in run order: the enabled ones (or ``only`` these) and their needs."""
    return run_order(registry, only if only is not None else [s for s in registry if analysis.enabled(s)])


def plan_steps(registry: Mapping[str, Step], ctx: StepContext, only: list[str] | None = None) -> dict[str, Planned]:
    """The plans of the selected steps that measure (``Step.plan``), also kept in ``ctx.planned``;
    a step planned already keeps its plan. Nothing is computed."""
    for name in selected_steps(registry, ctx.analysis, only):
        step = registry[name]
        if step.plan is not None and name not in ctx.planned:
            ctx.planned[name] = step.plan(ctx)
    return {n: p for n, p in ctx.planned.items() if n in registry}


def measure_step(step: Step, ctx: StepContext) -> None:
    """Compute the step's units not yet published with ``ctx.runner`` (the in-process runner,
    :func:`dispersion.measure.units.run_units`: leased, resumable); the flows run them on Ray
    first, so there it finds every unit done. Without a runner every unit must be published."""
    from dispersion.measure.units import is_done

    planned = ctx.planned[step.name]
    if ctx.runner is None:
        pending = [u for u in planned.units if not is_done(ctx.store, u, log=ctx.log)]
        if pending:
            raise DataError(f"analysis {step.name}: {len(pending)} of {len(planned.units)} units are not measured "
                            f"(first: {pending[0].describe()}); run `dispersion scan` on this root")
        return
    done = ctx.runner(planned.units, ctx.store, what=step.name, unit_name=step.unit_name, progress=ctx.progress,
                      log=ctx.log)
    if done.ran:
        ctx.log(f"analysis {step.name}: measured {done.ran} of {done.planned} units ({done.rows} {step.unit_name}) "
                f"in {done.seconds:.1f} s")


def run_steps(registry: Mapping[str, Step], ctx: StepContext, only: list[str] | None = None) -> list[Section]:
    """Run the enabled steps (or ``only`` these) in dependency order; publish their outputs.
    A step that measures is planned (unless ``ctx.planned`` holds its plan) and its pending
    units computed before its ``run``."""
    sections = []
    for name in selected_steps(registry, ctx.analysis, only):
        t0 = time.perf_counter()
        step = registry[name]
        if step.plan is not None:
            plan_steps(registry, ctx, only=[name])
            measure_step(step, ctx)
        section = step.run(ctx)
        publish_section(ctx.store, ctx.config.name, section)
        ctx.tables.update(section.tables)
        ctx.log(f"analysis {name}: {', '.join(section.tables) or 'figure only'} in {time.perf_counter() - t0:.1f} s")
        sections.append(section)
    return sections


def publish_section(store: Store, run: str, section: Section) -> None:
    """The section's tables, figures and rendered markdown (so a later ``analyze`` of other
    steps keeps this section in the report)."""
    from dispersion.report.markdown import sections_markdown

    store.write_text(section_path(run, section.name), sections_markdown(run, [section]))
    for table_name, table in section.tables.items():
        store.write_table(result_path(table_name, run), table)
    for fig_name, figure in section.figures.items():
        for ext, data in figure_files(figure).items():  # the PNG, and its SVG beside it
            store.write_bytes(figure_path(run, fig_name, ext), data)


def report_sections(registry: Mapping[str, Step], store: Store, run: str) -> str:
    """Every stored section of ``run`` (this call's steps and earlier ones), in report order."""
    parts = []
    for name in registry:
        rel = section_path(run, name)
        if store.exists(rel):
            parts.append(store.read_bytes(rel).decode("utf-8"))
    return "\n".join(parts)


def steps_markdown(registry: Mapping[str, Step]) -> str:
    """The generated step table of docs/ANALYSES.md."""
    out = ["| step | paper | tables | runs after | options |", "|---|---|---|---|---|"]
    for s in registry.values():
        after = ", ".join((*s.needs, *s.uses)) or "-"
        opts = f"`analysis.{s.name}`" if s.options is not None else "-"
        out.append(f"| `{s.name}` | {s.paper} | {', '.join(f'`{t}`' for t in s.tables)} | {after} | {opts} |")
    return "\n".join(out) + "\n"
