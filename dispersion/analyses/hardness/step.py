"""The ``hardness`` step: its plan (the query-set shards every model@revision measures,
:class:`dispersion.measure.queries.QueryUnit`) and its run (read the shards back; slice,
calibrate, rank; tables, figures, section).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dispersion.analyses.hardness.figures import plot_calibration, plot_hardness, summary_markdown
from dispersion.analyses.hardness.options import FIELD, ClozeSet, HardnessOptions, LmEvalSet
from dispersion.analyses.hardness.tables import hardness_tables
from dispersion.analyses.registry import Planned, Section, Step, StepContext
from dispersion.core.errors import ConfigError, DataError


def _revisions(mrs: list, choice: Any) -> list:
    from dispersion.core.ids import revision_order

    by: dict[str, list] = {}
    for mr in mrs:
        by.setdefault(mr.model, []).append(mr)
    out = []
    for rs in by.values():
        rs = sorted(rs, key=lambda m: revision_order(m.revision))
        if choice == "last":
            out.append(rs[-1])
        elif choice == "all":
            out += rs
        else:
            out += [m for m in rs if m.revision in choice]
    return out


def _named(mrs: list, model: str, revision: str | None, where: str):
    from dispersion.core.ids import revision_order

    rs = sorted((m for m in mrs if m.model == model), key=lambda m: revision_order(m.revision))
    if not rs:
        raise ConfigError(f"{where}.model: {model!r} is not a configured model "
                          f"(models: {', '.join(dict.fromkeys(m.model for m in mrs))})")
    if revision is None:
        return rs[-1]
    hit = [m for m in rs if m.revision == revision]
    if not hit:
        raise ConfigError(f"{where}.revision: {model!r} has no revision {revision!r} "
                          f"(configured: {', '.join(m.revision for m in rs)})")
    return hit[0]


def file_query_sets(opts: HardnessOptions, mrs: list) -> list:
    """The lm-eval and table query sets of ``opts``, each bound to the model@revision it names."""
    from dispersion.measure.queries import QuerySet
    from dispersion.measure.query_sources import read_lm_eval_samples, read_query_table

    out = []
    for i, spec in enumerate(opts.query_sets):
        where = f"{FIELD}.query_sets.{i}"
        if isinstance(spec, ClozeSet):
            continue
        mr = _named(mrs, spec.model, spec.revision, where)
        try:
            if isinstance(spec, LmEvalSet):
                table = read_lm_eval_samples(spec.paths, metric=spec.metric, filter=spec.filter)
                if spec.name:
                    groups = {spec.name: table}
                else:
                    tasks = table.column("task").to_pylist()
                    groups = {t: table.filter(pc.equal(table["task"], t)) for t in dict.fromkeys(tasks)}
            else:
                table = read_query_table(spec.path)
                groups = {spec.name or spec.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]: table}
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        for name, t in groups.items():
            out.append(QuerySet.of_table(name, t, model=mr.model, revision=mr.revision))
    names = [q.name for q in out] + [s.set_name for s in opts.query_sets if isinstance(s, ClozeSet)]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{FIELD}.query_sets: two query sets named {dup!r} (give each a name)")
    return out


@dataclass(frozen=True)
class QueryJob:
    """One model@revision's share of the step: the query sets it answers (the embedded cloze) or
    embeds (lm-eval and table sets naming it), all measured with one spec, as shards
    (:class:`dispersion.measure.queries.QueryUnit`, :meth:`set_units`)."""

    mr: Any                      # dispersion.measure.scan.ModelRevision
    sets: tuple                  # dispersion.measure.queries.QuerySet, ...
    spec: Any                    # dispersion.measure.queries.QuerySpec
    device: str

    def set_units(self) -> list[list]:
        """Each query set's shards (:class:`dispersion.measure.queries.QueryUnit`)."""
        from dispersion.measure.queries import query_units

        return [query_units(self.mr, qs, self.spec, self.device) for qs in self.sets]

    @property
    def units(self) -> list:
        return [u for us in self.set_units() for u in us]


def plan_jobs(cfg: Any, opts: HardnessOptions) -> list[QueryJob]:
    """The measurements the step needs, one :class:`QueryJob` per model@revision, in the order
    the step reports them (answering revisions first). Builds the cloze sets (one per tokenizer)
    and reads the query files; loads no model."""
    from dispersion.measure.cloze import build_cloze
    from dispersion.measure.corpus import embedded_documents
    from dispersion.measure.modeling import load_tokenizer, resolve_device, resolve_dtype
    from dispersion.measure.queries import QuerySet, QuerySpec
    from dispersion.measure.sampling import tokenizer_fingerprint
    from dispersion.measure.sources import model_revisions

    all_mrs = model_revisions(cfg)
    cloze_specs = [s for s in opts.query_sets if isinstance(s, ClozeSet)]
    files = file_query_sets(opts, all_mrs)
    answering = _revisions(all_mrs, opts.revisions) if cloze_specs else []
    if cloze_specs and not answering:
        raise ConfigError(f"{FIELD}.revisions: none of {opts.revisions} is a configured revision")
    order = list(dict.fromkeys([*answering, *(m for m in all_mrs
                                             if any((q.model, q.revision) == (m.model, m.revision) for q in files))]))
    device = resolve_device(cfg.extraction.device)
    bos = cfg.extraction.prepend_bos if opts.prepend_bos is None else opts.prepend_bos
    cloze_cache: dict[str, list] = {}
    jobs = []
    for mr in order:
        sets = []
        if mr in answering:
            tok = load_tokenizer(mr.source, field=mr.field)
            fp = tokenizer_fingerprint(tok)
            if fp not in cloze_cache:
                built = []
                for s in cloze_specs:
                    cz = build_cloze(embedded_documents(s.domain, s.split), tok, name=s.set_name, context=s.context,
                                     continuation=s.continuation, choices=s.choices, n=s.n, seed=s.seed,
                                     distractors=s.distractors)
                    definition = [s.model_dump(), fp, f"py{sys.version_info[0]}.{sys.version_info[1]}"]
                    built.append(QuerySet.of_cloze(s.set_name, cz, definition))
                cloze_cache[fp] = built
            sets += cloze_cache[fp]
        sets += [q for q in files if (q.model, q.revision) == (mr.model, mr.revision)]
        spec = QuerySpec(layers=tuple(opts.layers), sites=(opts.site,), pools=tuple(opts.pools), prepend_bos=bos,
                         max_tokens=opts.max_tokens, dtype=resolve_dtype(mr.dtype, device),
                         batch_size=cfg.extraction.batch_size, shard_size=opts.shard_size)
        jobs.append(QueryJob(mr, tuple(sets), spec, device))
    return jobs


def read_job(store: Any, job: QueryJob) -> list[tuple[str, str, str, pa.Table]]:
    """Every query set of ``job`` as its published shards (measured by the runner first):
    ``(model, revision, set, table)`` with the queries' text appended."""
    from dispersion.measure.queries import read_measured

    mr = job.mr
    return [(mr.model, mr.revision, qs.name, read_measured(store, us).append_column("text", qs.queries.column("text")))
            for qs, us in zip(job.sets, job.set_units())]


def plan_step(ctx: StepContext) -> Planned:
    """The step's units (every query-set shard of every model@revision), measured by the runner
    before :func:`run`; the jobs are what ``run`` reads besides."""
    jobs = plan_jobs(ctx.config, ctx.options("hardness"))
    return Planned(units=[u for j in jobs for u in j.units], detail=jobs)


def run(ctx: StepContext) -> Section:
    """From the published query-set shards of :func:`plan_step`: slice, calibrate, rank; tables,
    two figures and the report section."""
    opts: HardnessOptions = ctx.options("hardness")
    measured = [m for job in ctx.planned["hardness"].detail for m in read_job(ctx.store, job)]
    tables, results = hardness_tables(measured, opts, log=ctx.log)
    main = next((r.variant for r in results), None)
    figures = {}
    markdown = "_(no query set could be sliced)_\n"
    if main is not None:
        figures["hardness"] = plot_hardness(results, main)
        if any(r.calibrations for r in results):
            figures["hardness_calibration"] = plot_calibration(results, main)
        markdown = summary_markdown(tables, main)
    return STEP.section(tables=tables, figures=figures, markdown=markdown)


STEP = Step(name="hardness", title="Ranking example hardness without labels; calibration by dispersion",
            paper="001 Sec. 3.1, Fig. 8, B.1.2-B.1.4, Tables 3-8",
            tables=("hardness_slices", "hardness_spearman", "hardness_calibration", "hardness_shift",
                    "hardness_ranking", "hardness_queries"),
            run=run, options=HardnessOptions, default=HardnessOptions, plan=plan_step, unit_name="queries")
