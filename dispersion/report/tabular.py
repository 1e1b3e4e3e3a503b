"""A query result written for a terminal, a pipe or a file: ``table``, ``csv``, ``json``,
``jsonl``, ``markdown`` or ``parquet``.

``table`` is for eyes on a terminal (rich, fitted to its width, long values shortened); every
other format is complete and unwrapped, for pipes and files: ``csv`` (RFC 4180, header row),
``json`` (one array of objects, as DuckDB's ``-json``), ``jsonl`` (one object per line),
``markdown`` (a GitHub table), ``parquet`` (the Arrow table itself). Lists (pooled vectors)
are JSON arrays in csv and markdown cells.
"""

from __future__ import annotations

import csv
import decimal
import io
import json
import math
from typing import Any, Literal

import pyarrow as pa

Format = Literal["table", "csv", "json", "jsonl", "markdown", "parquet"]
FORMATS: tuple[str, ...] = ("table", "csv", "json", "jsonl", "markdown", "parquet")
SUFFIXES: dict[str, str] = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".md": "markdown",
                            ".markdown": "markdown", ".parquet": "parquet", ".txt": "table"}


def format_for(path: str | None, given: str | None, tty: bool) -> str:
    """The format to write: the one given; else the output file's suffix; else ``table`` on a
    terminal and ``csv`` in a pipe."""
    if given:
        return given
    if path:
        for suffix, fmt in SUFFIXES.items():
            if path.lower().endswith(suffix):
                return fmt
        return "csv"
    return "table" if tty else "csv"


def _plain(v: Any) -> Any:
    """A JSON-ready value: floats that are not finite become null; bytes become hex; decimals
    (DuckDB's ``sum`` of integers is a HUGEINT, read as a decimal) become ints or floats."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, decimal.Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def _cell(v: Any) -> str:
    """A csv / markdown cell: lists and mappings as JSON, None as empty, floats in full."""
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(_plain(v))
    if isinstance(v, float):
        return repr(v)
    return str(_plain(v))


def to_csv(table: pa.Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    for row in table.to_pylist():
        w.writerow([_cell(v) for v in row.values()])
    return buf.getvalue()


def to_json(table: pa.Table) -> str:
    return json.dumps([_plain(r) for r in table.to_pylist()], ensure_ascii=False) + "\n"


def to_jsonl(table: pa.Table) -> str:
    return "".join(json.dumps(_plain(r), ensure_ascii=False) + "\n" for r in table.to_pylist())


def to_markdown(table: pa.Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(c) for c in table.column_names) + " |", "|" + "---|" * table.num_columns]
    out += ["| " + " | ".join(esc(_cell(v)) for v in r.values()) + " |" for r in table.to_pylist()]
    return "\n".join(out) + "\n"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_short(x) for x in v[:4]) + f", … ({len(v)})]"
    return "" if v is None else str(v)


def print_table(table: pa.Table, limit: int, console=None) -> None:
    """Up to ``limit`` rows as a rich table on the console (a terminal); a line says how many
    were left out."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    out = Table(show_lines=False)
    for name in table.column_names:
        out.add_column(name, overflow="fold")
    for row in table.slice(0, limit).to_pylist():
        out.add_row(*[_short(v) for v in row.values()])
    console.print(out)
    if table.num_rows > limit:
        console.print(f"({table.num_rows} rows, {limit} shown; --limit N or --format csv for more)")


def render(table: pa.Table, fmt: str) -> str | bytes:
    """The whole table in a file format (every format but ``table``)."""
    if fmt == "csv":
        return to_csv(table)
    if fmt == "json":
        return to_json(table)
    if fmt == "jsonl":
        return to_jsonl(table)
    if fmt == "markdown":
        return to_markdown(table)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        return buf.getvalue().to_pybytes()
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
