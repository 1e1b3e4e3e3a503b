"""The ``dispersion`` command line: ``zoo build``, ``scan``, ``analyze``, ``hardness``, ``query``,
``report``, ``verify``, ``train-sweep``, ``losses``.

Heavy imports (torch, transformers) happen inside the commands that need them, so
``--help`` and ``query`` start fast. Every :class:`DispersionError` ends the command with
a one-line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, Optional

import typer

from dispersion.core.errors import DispersionError
from dispersion.core.threads import set_torch_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEFAULT_CONFIG = "configs/default.yaml"
app = typer.Typer(help="Representation dispersion of language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
zoo_app = typer.Typer(help="The embedded model zoo (tiny models trained locally).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", "-c", help=f"Run config (YAML; path or fsspec URL). Default: {DEFAULT_CONFIG}, or none when "
                           "--model is given (the embedded prose and code datasets, default settings).")]
ModelOpt = Annotated[Optional[list[str]], typer.Option(
    "--model", "-m", help="Scan this model instead of the config's models (repeatable): org/name@rev[,rev2], "
                          "NAME=org/name@rev, a local folder, zoo:NAME@all, packaged:smollm2-135m, gguf:FILE.")]
DatasetOpt = Annotated[Optional[list[str]], typer.Option(
    "--dataset", "-d", help="Use this dataset instead of the config's datasets (repeatable): "
                            "embedded:prose|code[:split], hf:PATH[:NAME[:SPLIT[:FIELD]]], NAME=... .")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "-o", "--set", help="Set one config field, value read as YAML (repeatable): -o sampling.num_segments=200 "
                        "-o models.0.dtype=bfloat16 -o 'extraction.layers=[1, final]'.")]
RootOpt = Annotated[Optional[str], typer.Option("--root", help="Artifact root (overrides the config's root).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the config's `trust_remote_code: true` "
                                        "(runs code from a model's or dataset's repository).")]


def _load(config: str | None, models: list[str] | None = None, datasets: list[str] | None = None,
          overrides: list[str] | None = None):
    """The run config: the file (or, with --model and no --config, the command-line base) with
    the command line's models, datasets and ``-o`` assignments applied."""
    from dispersion.config import load_config

    if config is None and not models:
        config = DEFAULT_CONFIG
    return load_config(config, models=models or (), datasets=datasets or (), overrides=overrides or ())


def _console():
    """rich on a terminal; elsewhere (a pipe, a log file, a worker) plain unwrapped lines:
    no colour, no 80-column wrapping of log lines or tables."""
    from rich.console import Console

    from dispersion.core.progress import interactive

    if interactive(sys.stdout):
        return Console(markup=False)  # model names, revisions and paths print as written
    return Console(width=10_000, soft_wrap=True, no_color=True, highlight=False, markup=False)


def _preflight(root: str, cfg=None, *, write: bool = True, trust_remote_code: bool = False):
    """The checks of :mod:`dispersion.core.preflight` (consent for remote code, a usable root),
    before a command samples, loads or writes anything; returns the root's Store."""
    from dispersion.core.preflight import preflight

    return preflight(root, cfg, write=write, trust_remote_code=trust_remote_code)


@zoo_app.command("build")
def zoo_build(config: ConfigOpt = None, progress: ProgressOpt = True,
              model: Annotated[Optional[list[str]], typer.Option(help="Only these zoo models.")] = None,
              overrides: SetOpt = None) -> None:
    """Train the tokenizer and the tiny zoo models (skips what is built)."""
    from dispersion.measure.zoo_cache import zoo_train_log
    from dispersion.training.zoo import build_zoo

    cfg = _load(config, overrides=overrides)
    names = model or sorted({m.zoo for m in cfg.models if m.zoo}) or None
    built = build_zoo(cfg.zoo, names=names, progress=progress)
    for name, path in built.items():
        log = zoo_train_log(cfg.zoo.cache, name)
        losses = ", ".join(f"step{c['step']}={c['val_loss']:.3f}" for c in log.get("checkpoints", []))
        typer.echo(f"{name}: {path}  validation loss {losses}")


@app.command()
def scan(config: ConfigOpt = None, model: ModelOpt = None, dataset: DatasetOpt = None, overrides: SetOpt = None,
         root: RootOpt = None, progress: ProgressOpt = True, trust_remote_code: TrustOpt = False) -> None:
    """Sample segments, extract every model@revision (resuming), analyse and report.

    \b
    dispersion scan                                    # configs/default.yaml
    dispersion scan -m EleutherAI/pythia-70m@step1000 -d embedded:prose -o sampling.num_segments=500
    dispersion scan -c configs/analyses.yaml -o analysis.bin_size=50
    """
    from dispersion.report.markdown import print_tables
    from dispersion.run import run_scan

    cfg = _load(config, model, dataset, overrides)
    _preflight(root or cfg.root, cfg, trust_remote_code=trust_remote_code)
    console = _console()
    if config is None and model and not any(o.startswith("analysis.bin_size=") for o in overrides or ()):
        n = min(m.num_segments or cfg.sampling.num_segments for m in cfg.models)
        console.print(f"bins: {n // cfg.analysis.bin_size} of {cfg.analysis.bin_size} segments per sample of {n} "
                      f"(-o analysis.bin_size=B to choose)")
    result = run_scan(cfg, root=root, progress=progress, log=console.print)
    a = cfg.analysis
    print_tables(result.tables["bins"], result.tables["correlations"], layer=str(a.layer), site=a.site,
                 pool=a.pool, console=console, model_order=[m.name for m in cfg.models])
    s = result.stats
    console.print(f"work units: {s.planned} planned, {s.ran} ran ({s.segments} segments, {s.seconds:.1f}s), "
                  f"{s.skipped} already done")
    console.print(f"plot: {result.report['plot']}\nsummary: {result.report['summary']}\ncatalog: {result.catalog}")


@app.command()
def report(config: ConfigOpt = None, model: ModelOpt = None, dataset: DatasetOpt = None, overrides: SetOpt = None,
           root: RootOpt = None, trust_remote_code: TrustOpt = False) -> None:
    """Recompute bins, correlations, plot and catalog from the stored shards (the same
    --config / --model / --dataset / -o as the scan find its shards)."""
    from dispersion.measure.scan import plan
    from dispersion.run import aggregate, prepare_models

    cfg = _load(config, model, dataset, overrides)
    store = _preflight(root or cfg.root, cfg, trust_remote_code=trust_remote_code)
    set_torch_threads(log=typer.echo)
    prepare_models(cfg, log=typer.echo)
    units = plan(cfg, store, sample=False, bin_size=cfg.analysis.bin_size)
    done = aggregate(cfg, store, units)
    tables, rep, catalog = done.tables, done.report, done.catalog
    from dispersion.report.markdown import print_tables

    a = cfg.analysis
    print_tables(tables["bins"], tables["correlations"], layer=str(a.layer), site=a.site, pool=a.pool,
                 console=_console(), model_order=[m.name for m in cfg.models])
    typer.echo(f"plot: {rep['plot']}\nsummary: {rep['summary']}\ncatalog: {catalog}")


@app.command()
def analyze(steps: Annotated[Optional[list[str]], typer.Argument(
                help="Analysis steps to run (default: the config's analysis.steps; 'all' for every one); "
                     "`dispersion steps` lists them. Each runs after the steps it needs.")] = None,
            config: ConfigOpt = None, model: ModelOpt = None, dataset: DatasetOpt = None, overrides: SetOpt = None,
            root: RootOpt = None, trust_remote_code: TrustOpt = False) -> None:
    """Run analysis steps over a finished scan: tables, figures, report, catalog views."""
    from dispersion.config import ANALYSIS_STEPS
    from dispersion.core.errors import ConfigError
    from dispersion.measure.scan import plan
    from dispersion.run import aggregate, prepare_models

    cfg = _load(config, model, dataset, overrides)
    only = None
    if steps:
        only = list(ANALYSIS_STEPS) if steps == ["all"] else steps
        bad = [s for s in only if s not in ANALYSIS_STEPS]
        if bad:
            raise ConfigError(f"steps: unknown step {bad[0]!r} (known: {', '.join(ANALYSIS_STEPS)}, all)")
    store = _preflight(root or cfg.root, cfg, trust_remote_code=trust_remote_code)
    set_torch_threads(log=typer.echo)
    prepare_models(cfg, only=only, log=typer.echo)
    units = plan(cfg, store, log=lambda m: None, sample=False, bin_size=cfg.analysis.bin_size)
    done = aggregate(cfg, store, units, log=typer.echo, only=only)
    rep, catalog = done.report, done.catalog
    typer.echo(f"report: {rep['summary']}\ncatalog: {catalog}")


@app.command()
def hardness(samples: Annotated[Optional[list[str]], typer.Option(
                 "--samples", help="lm-evaluation-harness sample logs of the model (`samples_<task>_*.jsonl` from "
                                   "`lm_eval --log_samples`): files, folders or globs (repeatable).")] = None,
             table: Annotated[Optional[list[str]], typer.Option(
                 "--table", help="A query table (CSV/Parquet: query_id, text, correct[, task, slice]) of the "
                                 "model (repeatable).")] = None,
             metric: Annotated[str, typer.Option(help="The per-document 0/1 metric of the logs read as the label.")]
             = "acc",
             cloze: Annotated[Optional[bool], typer.Option(
                 "--cloze/--no-cloze", help="Also the embedded cloze, answered by every model (default: only "
                                            "when neither --samples nor --table is given).")] = None,
             config: ConfigOpt = None, model: ModelOpt = None, overrides: SetOpt = None, root: RootOpt = None,
             trust_remote_code: TrustOpt = False) -> None:
    """Rank examples by hardness and calibrate accuracy by dispersion (paper 001 Sec. 3.1, B.1).

    The logs and tables belong to the first model (its last revision); the embedded cloze is
    answered by every model. Runs the ``hardness`` step alone: tables, figures, report section
    and catalog views; no scan needed. The ``hardness`` flow does the same on Ray.

    \b
    dispersion hardness -m meta-llama/Llama-3.2-1B-Instruct --samples out/samples_mmlu_*.jsonl
    dispersion hardness -m packaged:smollm2-135m              # the embedded cloze
    """
    import json

    from dispersion.analyses import STEPS, StepContext
    from dispersion.analyses.hardness import ClozeSet
    from dispersion.analyses.registry import run_steps
    from dispersion.core.catalog import build_catalog
    from dispersion.core.layout import section_path
    from dispersion.run import prepare_models

    base = _load(config, model, None, overrides)
    owner = base.models[0].name
    sets: list[dict] = []
    if samples:
        sets.append({"kind": "lm_eval", "paths": list(samples), "model": owner, "metric": metric})
    sets += [{"kind": "table", "path": t, "model": owner} for t in table or []]
    if cloze or (cloze is None and not sets):
        sets += [s.model_dump() for s in base.analysis.hardness.query_sets if isinstance(s, ClozeSet)] or [
            {"kind": "embedded_cloze", "domain": "prose"}, {"kind": "embedded_cloze", "domain": "code"}]
    cfg = _load(config, model, None, [*(overrides or []), f"analysis.hardness.query_sets={json.dumps(sets)}"])
    store = _preflight(root or cfg.root, cfg, trust_remote_code=trust_remote_code)
    set_torch_threads(log=typer.echo)
    prepare_models(cfg, only=["hardness"], log=typer.echo)
    from dispersion.measure.units import run_units

    run_steps(STEPS, StepContext(cfg, store, [], {}, log=typer.echo, runner=run_units), only=["hardness"])
    catalog = build_catalog(store)
    typer.echo(f"report section: {store.path(section_path(cfg.name, 'hardness'))}\ncatalog: {catalog}")


@app.command()
def steps() -> None:
    """List the registered analysis steps: paper section, tables, what runs first, options."""
    from dispersion.analyses import STEPS
    from dispersion.analyses.registry import steps_markdown

    typer.echo(steps_markdown(STEPS), nl=False)


@app.command("train-sweep")
def train_sweep(config: Annotated[str, typer.Option("--config", "-c", help="Sweep config (YAML).")]
                = "configs/train-sweep.yaml") -> None:
    """Train every arm of a dispersion-loss sweep in process (finished arms are skipped) and
    write the sweep tables, condensation maps and report. The train-sweep flow runs the arms
    as Ray tasks instead."""
    from dispersion.training.sweep import load_sweep_config, run_sweep

    cfg = load_sweep_config(config)
    _preflight(cfg.root, cfg)
    set_torch_threads(log=typer.echo)
    out = run_sweep(cfg, log=typer.echo)
    typer.echo(f"report: {out['report']}\ncatalog: {out['catalog']}")


@app.command("losses")
def losses() -> None:
    """List the auxiliary losses a training config or sweep grid accepts (``loss.name``,
    ``grid.losses``; ``none`` for none) as the markdown table of docs/TRAINING.md."""
    from dispersion.training.losses import losses_markdown

    typer.echo(losses_markdown(), nl=False)


@app.command()
def query(sql: Annotated[str, typer.Argument(help="One SELECT over the catalog views (`SHOW TABLES` lists "
                                                    "them; docs/CATALOG.md describes every column).")],
          config: ConfigOpt = None, overrides: SetOpt = None, root: RootOpt = None,
          fmt: Annotated[Optional[str], typer.Option(
              "--format", "-f", help="table, csv, tsv, json, jsonl, markdown or parquet. Default: the --output "
                                     "file's suffix (.txt table, .csv, .tsv, .json, .jsonl, .md, .parquet), "
                                     "else table on a terminal and csv in a pipe.")] = None,
          output: Annotated[Optional[str], typer.Option(
              "--output", help="Write the whole result to this file (local path or fsspec URL) instead "
                               "of standard output.")] = None,
          limit: Annotated[Optional[int], typer.Option(
              help="Rows at most (default: 50 for a table on the terminal, all otherwise).")] = None) -> None:
    """Run one SELECT on the catalog. Sandboxed: no writes, no files outside the root, no
    SET/INSTALL/LOAD (docs/GUARANTEES.md).

    \b
    dispersion query "SELECT model, revision, step, avg(ppl) FROM features GROUP BY ALL ORDER BY model, step"
    dispersion query "FROM correlations" --format csv > correlations.csv
    dispersion query "FROM bins" --output bins.parquet
    """
    from dispersion.core.catalog import query as run_query
    from dispersion.core.errors import ConfigError
    from dispersion.report.tabular import FORMATS, format_for, print_table, render

    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    try:
        kind = format_for(output, fmt, tty=sys.stdout.isatty())
    except ValueError as err:
        raise ConfigError(f"--output: {err}") from None
    if kind == "parquet" and output is None:
        raise ConfigError("--format parquet: give --output FILE (Parquet is binary)")
    if root is None:
        root = _load(config, overrides=overrides).root
    result = run_query(_preflight(root, write=False), sql)
    if result is None:
        return
    if kind == "table" and output is None:
        print_table(result, 50 if limit is None else limit, console=_console())
        return
    if limit is not None:
        result = result.slice(0, limit)
    data = render(result, kind)
    if output is None:
        sys.stdout.write(data if isinstance(data, str) else data.decode())
        return
    _write_output(output, data)
    typer.echo(f"{result.num_rows} rows -> {output}", err=True)


def _write_output(path: str, data: str | bytes) -> None:
    """Write a query result to a local path or fsspec URL; one error line if that fails."""
    import fsspec

    from dispersion.core.errors import DataError, first_line

    try:
        with fsspec.open(path, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
    except Exception as err:  # noqa: BLE001 - permissions, a missing folder, a protocol: one line
        raise DataError(f"--output {path}: cannot write: {first_line(err)}") from None


@app.command()
def verify(config: ConfigOpt = None, root: RootOpt = None,
           repair: Annotated[bool, typer.Option("--repair", help="Remove the done markers of damaged "
                                                "files, so the next scan recomputes their units.")] = False
           ) -> None:
    """Check every file of every done marker in a root against the checksum it recorded:
    one line per damaged file, a summary, exit status 1 if any is damaged."""
    from dispersion.core.errors import DataError
    from dispersion.core.integrity import verify_root

    if root is None:
        root = _load(config).root
    store = _preflight(root, write=repair)
    if not store.fs.exists(store.base):
        raise DataError(f"root: {root} does not exist")
    result = verify_root(store, repair=repair, log=typer.echo)
    typer.echo(result.summary())
    if not result.ok:
        raise typer.Exit(1)


def _log_lines() -> None:
    """The library's own log lines (``dispersion.*`` loggers, e.g. a zoo build or a lock wait)
    as plain lines on stderr; other libraries keep their defaults."""
    import logging

    logger = logging.getLogger("dispersion")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _terminate(signum, frame) -> None:
    from dispersion.core.errors import Terminated

    raise Terminated()


def interrupted_line(err: BaseException) -> str:
    """One line on what an interrupted command leaves: the units it finished are published, the
    one in progress is dropped with its lease, and the same command resumes."""
    what = "terminated (SIGTERM)" if type(err).__name__ == "Terminated" else "interrupted"
    done = getattr(err, "units_done", None)
    finished = (f"{done[0]} of {done[1]} pending units finished and published" if done is not None
                else "no unit of this run was finished")
    return (f"{what}: {finished}; leases released, nothing half-written kept; "
            f"run the same command again to resume")


def _help_width() -> None:
    """``--help`` in a pipe (``| less``, a log) keeps the examples whole: 160 columns, not rich's
    80 (``TERMINAL_WIDTH`` still decides when set)."""
    import typer.rich_utils as rich_utils

    if not sys.stdout.isatty() and rich_utils.MAX_WIDTH is None:
        rich_utils.MAX_WIDTH = 160


def main() -> None:
    from dispersion.core.errors import Terminated

    _log_lines()
    _help_width()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except DispersionError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except OSError as err:  # a write outside the root (caches, temporary files) refused by the system
        from dispersion.core.errors import STORAGE_ERRNOS

        if err.errno not in STORAGE_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        typer.echo(f"error: {err.strerror or err}:{where}; make room (or fix the folder), then run the same "
                   f"command again: finished units are kept", err=True)
        sys.exit(1)
    except KeyboardInterrupt as err:
        typer.echo(interrupted_line(err), err=True)
        sys.exit(130)
    except SystemExit as exit_:  # typer turns Ctrl-C into exit status 130, the interrupt as its cause
        cause = exit_.__cause__ or exit_.__context__
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            typer.echo(interrupted_line(cause), err=True)
        raise
    except Terminated as err:
        typer.echo(interrupted_line(err), err=True)
        sys.exit(143)


if __name__ == "__main__":
    main()
