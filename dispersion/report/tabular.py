"""A query result written for a terminal, a pipe or a file: ``table``, ``csv``, ``json``,
``jsonl``, ``markdown`` or ``parquet``.

``table`` is for eyes on a terminal (fitted to its width: cells never wrap, floats to 6
significant digits, long texts shortened, the columns that do not fit named in a note; to a
``.txt`` file every column); every other format is complete and unwrapped, for pipes and
files: ``csv`` (RFC 4180, header row), ``tsv`` (tab-separated),
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

Format = Literal["table", "csv", "tsv", "json", "jsonl", "markdown", "parquet"]
FORMATS: tuple[str, ...] = ("table", "csv", "tsv", "json", "jsonl", "markdown", "parquet")
SUFFIXES: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl",
                            ".ndjson": "jsonl", ".md": "markdown", ".markdown": "markdown", ".parquet": "parquet",
                            ".pq": "parquet", ".txt": "table"}


def format_for(path: str | None, given: str | None, tty: bool) -> str:
    """The format to write: the one given; else the output file's suffix (one of
    :data:`SUFFIXES`; another suffix is a ``ValueError``); else ``table`` on a terminal and
    ``csv`` in a pipe."""
    if given:
        return given
    if path:
        for suffix, fmt in SUFFIXES.items():
            if path.lower().endswith(suffix):
                return fmt
        raise ValueError(f"cannot tell the format from the suffix of {path!r}: give --format, or one of "
                         + ", ".join(f"{k} ({v})" for k, v in SUFFIXES.items()))
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


TEXT_CELL = 40  # characters of a text cell shown in a terminal table


def _short(v: Any) -> str:
    """A terminal cell: floats to 6 significant digits, long lists and texts shortened."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_short(x) for x in v[:4]) + f", … ({len(v)})]"
    text = "" if v is None else str(v).replace("\n", " ")
    return text if len(text) <= TEXT_CELL else text[:TEXT_CELL - 1] + "…"


def fitting_columns(names: list[str], cells: list[list[str]], width: int) -> int:
    """How many leading columns of a boxed table fit in ``width`` characters (at least one):
    each column takes its widest cell (or its name) plus a border and one space each side."""
    used = 1
    for i, name in enumerate(names):
        need = max([len(name)] + [len(row[i]) for row in cells]) + 3
        if i and used + need > width:
            return i
        used += need
    return len(names)


def text_table(table: pa.Table, limit: int, width: int | None) -> tuple[Any, list[str]]:
    """A rich table of the first ``limit`` rows whose cells never wrap: numbers stay whole, and
    the columns that do not fit in ``width`` (a terminal's; ``None``: no limit) are left out
    and named. Returns (table, names of the columns left out)."""
    from rich.table import Table

    names = table.column_names
    cells = [[_short(v) for v in row.values()] for row in table.slice(0, limit).to_pylist()]
    keep = fitting_columns(names, cells, width) if width else len(names)
    out = Table(show_lines=False)
    for name in names[:keep]:
        kind = table.schema.field(name).type
        number = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
        out.add_column(name, no_wrap=True, overflow="ellipsis", justify="right" if number else "left")
    for row in cells:
        out.add_row(*row[:keep])
    return out, names[keep:]


def print_table(table: pa.Table, limit: int, console=None) -> None:
    """Up to ``limit`` rows as a table fitted to the console's width (a terminal; a console of
    unlimited width prints every column); a line says which rows and columns were left out."""
    from rich.console import Console

    console = console or Console(markup=False)
    out, hidden = text_table(table, limit, None if console.width >= 10_000 else console.width)
    console.print(out)
    notes = []
    if table.num_rows > limit:
        notes.append(f"{table.num_rows} rows, {limit} shown (--limit N for more)")
    if hidden:
        notes.append(f"{len(hidden)} columns not shown: {', '.join(hidden)} (SELECT fewer, or --format csv)")
    if notes:
        console.print("(" + "; ".join(notes) + ")")


def to_text(table: pa.Table) -> str:
    """Every row and column as a plain-text table (``--output FILE.txt``)."""
    from rich.console import Console

    buf = io.StringIO()
    out, _ = text_table(table, table.num_rows, None)
    Console(file=buf, width=10_000, no_color=True, markup=False, highlight=False).print(out)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def to_tsv(table: pa.Table) -> str:
    """Tab-separated values, as DuckDB's ``-separator '\t'`` (tabs and newlines in a cell become spaces)."""
    def clean(v: Any) -> str:
        return _cell(v).replace("\t", " ").replace("\n", " ")

    lines = ["\t".join(table.column_names)] + ["\t".join(clean(v) for v in r.values()) for r in table.to_pylist()]
    return "\n".join(lines) + "\n"


def render(table: pa.Table, fmt: str) -> str | bytes:
    """The whole table in a file format (every format but ``table``)."""
    if fmt == "csv":
        return to_csv(table)
    if fmt == "tsv":
        return to_tsv(table)
    if fmt == "table":
        return to_text(table)
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
