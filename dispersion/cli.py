"""The ``dispersion`` command line: ``zoo build``, ``scan``, ``analyze``, ``query``, ``report``,
``train-sweep``, ``losses``.

Heavy imports (torch, transformers) happen inside the commands that need them, so
``--help`` and ``query`` start fast. Every :class:`DispersionError` ends the command with
a one-line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from dispersion.core.errors import DispersionError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DEFAULT_CONFIG = "configs/default.yaml"
app = typer.Typer(help="Representation dispersion of language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
zoo_app = typer.Typer(help="The embedded model zoo (tiny models trained locally).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Run config (YAML; path or fsspec URL).")]
RootOpt = Annotated[Optional[str], typer.Option("--root", help="Artifact root (overrides the config's root).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _load(config: str):
    from dispersion.config import load_config

    return load_config(config)


@zoo_app.command("build")
def zoo_build(config: ConfigOpt = DEFAULT_CONFIG, progress: ProgressOpt = True,
              model: Annotated[Optional[list[str]], typer.Option(help="Only these zoo models.")] = None) -> None:
    """Train the tokenizer and the tiny zoo models (skips what is built)."""
    from dispersion.measure.zoo_cache import zoo_train_log
    from dispersion.training.zoo import build_zoo

    cfg = _load(config)
    names = model or sorted({m.zoo for m in cfg.models if m.zoo}) or None
    built = build_zoo(cfg.zoo, names=names, progress=progress)
    for name, path in built.items():
        log = zoo_train_log(cfg.zoo.cache, name)
        losses = ", ".join(f"step{c['step']}={c['val_loss']:.3f}" for c in log.get("checkpoints", []))
        typer.echo(f"{name}: {path}  validation loss {losses}")


@app.command()
def scan(config: ConfigOpt = DEFAULT_CONFIG, root: RootOpt = None, progress: ProgressOpt = True) -> None:
    """Sample segments, extract every model@revision (resuming), analyse and report."""
    from rich.console import Console

    from dispersion.report.markdown import print_tables
    from dispersion.run import run_scan

    cfg = _load(config)
    console = Console()
    result = run_scan(cfg, root=root, progress=progress, log=console.print)
    a = cfg.analysis
    print_tables(result.tables["bins"], result.tables["correlations"], layer=str(a.layer), site=a.site,
                 pool=a.pool, console=console, model_order=[m.name for m in cfg.models])
    s = result.stats
    console.print(f"work units: {s.planned} planned, {s.ran} ran ({s.segments} segments, {s.seconds:.1f}s), "
                  f"{s.skipped} already done")
    console.print(f"plot: {result.report['plot']}\nsummary: {result.report['summary']}\ncatalog: {result.catalog}")


@app.command()
def report(config: ConfigOpt = DEFAULT_CONFIG, root: RootOpt = None) -> None:
    """Recompute bins, correlations, plot and catalog from the stored shards."""
    from rich.console import Console

    from dispersion.core.storage import Store
    from dispersion.measure.scan import plan
    from dispersion.run import aggregate

    cfg = _load(config)
    store = Store(root or cfg.root)
    units = plan(cfg, store)
    tables, rep, catalog = aggregate(cfg, store, units)
    from dispersion.report.markdown import print_tables

    a = cfg.analysis
    print_tables(tables["bins"], tables["correlations"], layer=str(a.layer), site=a.site, pool=a.pool,
                 console=Console(), model_order=[m.name for m in cfg.models])
    typer.echo(f"plot: {rep['plot']}\nsummary: {rep['summary']}\ncatalog: {catalog}")


@app.command()
def analyze(steps: Annotated[Optional[list[str]], typer.Argument(
                help="Analysis steps to run (default: the config's analysis.steps; 'all' for every one); "
                     "`dispersion steps` lists them. Each runs after the steps it needs.")] = None,
            config: ConfigOpt = DEFAULT_CONFIG, root: RootOpt = None) -> None:
    """Run analysis steps over a finished scan: tables, figures, report, catalog views."""
    from dispersion.config import ANALYSIS_STEPS
    from dispersion.core.errors import ConfigError
    from dispersion.core.storage import Store
    from dispersion.measure.scan import plan
    from dispersion.run import aggregate

    cfg = _load(config)
    only = None
    if steps:
        only = list(ANALYSIS_STEPS) if steps == ["all"] else steps
        bad = [s for s in only if s not in ANALYSIS_STEPS]
        if bad:
            raise ConfigError(f"steps: unknown step {bad[0]!r} (known: {', '.join(ANALYSIS_STEPS)}, all)")
    store = Store(root or cfg.root)
    units = plan(cfg, store, log=lambda m: None)
    _, rep, catalog = aggregate(cfg, store, units, log=typer.echo, only=only)
    typer.echo(f"report: {rep['summary']}\ncatalog: {catalog}")


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

    out = run_sweep(load_sweep_config(config), log=typer.echo)
    typer.echo(f"report: {out['report']}\ncatalog: {out['catalog']}")


@app.command("losses")
def losses() -> None:
    """List the auxiliary losses a training config or sweep grid accepts (``loss.name``,
    ``grid.losses``; ``none`` for none) as the markdown table of docs/TRAINING.md."""
    from dispersion.training.losses import losses_markdown

    typer.echo(losses_markdown(), nl=False)


@app.command()
def query(sql: Annotated[str, typer.Argument(help="SQL over the catalog views (segments, features, "
                                                    "vectors, bins, correlations).")],
          config: ConfigOpt = DEFAULT_CONFIG, root: RootOpt = None,
          limit: Annotated[int, typer.Option(help="Rows to print at most.")] = 50) -> None:
    """Run one SELECT on the catalog and print the result as a table. Sandboxed: no writes,
    no files outside the root, no SET/INSTALL/LOAD (docs/GUARANTEES.md)."""
    from rich.console import Console
    from rich.table import Table

    from dispersion.core.catalog import query as run_query
    from dispersion.core.storage import Store

    if root is None:
        root = _load(config).root
    result = run_query(Store(root), sql)
    if result is None:
        return
    table = Table(show_lines=False)
    for name in result.column_names:
        table.add_column(name)
    for row in result.slice(0, limit).to_pylist():
        table.add_row(*[_cell(v) for v in row.values()])
    Console().print(table)
    if result.num_rows > limit:
        typer.echo(f"({result.num_rows} rows, {limit} shown)")


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_cell(x) for x in v[:4]) + f", … ({len(v)})]"
    return str(v)


def main() -> None:
    try:
        app()
    except DispersionError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
