"""Query results written for pipes and files (dispersion.report.tabular): every format
carries every row and column, unwrapped, and reads back to the same values."""

from __future__ import annotations

import csv
import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dispersion.report.tabular import format_for, render, to_csv, to_markdown

TABLE = pa.table({
    "model": ["gpt2-tiny", "llama-small|x"],
    "step": pa.array([0, 300], pa.int64()),
    "ppl": [12.5, float("nan")],
    "text": ["a long segment text, with a comma and\na newline " * 20, None],
    "vec": [[0.25, -1.0], [1.5, 2.0]],
})


def test_format_choice():
    assert format_for(None, None, tty=True) == "table"
    assert format_for(None, None, tty=False) == "csv"
    assert format_for("out.JSON", None, tty=True) == "json"
    assert format_for("out.md", None, tty=False) == "markdown"
    assert format_for("out.parquet", None, tty=False) == "parquet"
    assert format_for("out.tsv", None, tty=True) == "tsv"
    assert format_for("out.txt", None, tty=False) == "table"
    assert format_for("out.csv", "jsonl", tty=True) == "jsonl"
    with pytest.raises(ValueError, match=r"\.csv \(csv\), \.tsv \(tsv\)"):  # not silently csv
        format_for("out.unknown", None, tty=True)


def test_tsv_is_tab_separated_one_line_per_row():
    lines = render(TABLE, "tsv").splitlines()
    assert lines[0].split("\t") == TABLE.column_names and len(lines) == 1 + TABLE.num_rows
    assert lines[1].split("\t")[2] == "12.5" and "\n" not in lines[1].split("\t")[3]


def _wide(n_cols: int = 15, n_rows: int = 20) -> pa.Table:
    return pa.table({f"column_{i}": [1234.56789012 * (r + 1) / (i + 1) for r in range(n_rows)]
                     for i in range(n_cols)})


def test_a_terminal_table_keeps_numbers_whole_and_names_the_columns_left_out():
    from rich.console import Console

    from dispersion.report.tabular import print_table

    buf = io.StringIO()
    table = _wide()
    print_table(table, 50, console=Console(file=buf, width=120, markup=False, no_color=True))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 120
    assert len(lines) == table.num_rows + 4 + 1  # one line per row: no cell wraps; borders, header, the note
    assert "1234.57" in lines[3] and "2469.14" in lines[4]  # 6 significant digits, whole
    shown = [c for c in table.column_names if c in lines[1]]
    assert lines[-1].startswith(f"({table.num_columns - len(shown)} columns not shown: column_{len(shown)}, ")
    wide = io.StringIO()  # a console without a width limit (a pipe) shows every column
    print_table(table, 50, console=Console(file=wide, width=10_000, markup=False, no_color=True))
    assert all(c in wide.getvalue() for c in table.column_names) and "not shown" not in wide.getvalue()


def test_a_txt_file_holds_every_row_and_column():
    text = render(_wide(), "table")
    lines = text.splitlines()
    assert len(lines) == 20 + 4 and all(f"column_{i}" in lines[1] for i in range(15))


def test_csv_reads_back_whole_cells():
    rows = list(csv.reader(io.StringIO(to_csv(TABLE))))
    assert rows[0] == TABLE.column_names and len(rows) == 3
    assert rows[1][3] == TABLE["text"][0].as_py()  # quoted, newline and commas kept, not cut
    assert json.loads(rows[1][4]) == [0.25, -1.0] and rows[2][3] == ""
    assert float(rows[1][2]) == 12.5 and math.isnan(float(rows[2][2]))


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_formats(fmt):
    text = render(TABLE, fmt)
    assert isinstance(text, str)
    rows = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    assert [r["model"] for r in rows] == ["gpt2-tiny", "llama-small|x"]
    assert rows[1]["ppl"] is None and rows[0]["vec"] == [0.25, -1.0] and rows[0]["step"] == 0


def test_markdown_escapes_pipes_and_newlines():
    lines = to_markdown(TABLE).splitlines()
    assert len(lines) == 2 + TABLE.num_rows
    assert "llama-small\\|x" in lines[3] and all(line.count(" | ") >= 4 for line in lines[:1] + lines[2:])


def test_parquet_round_trip():
    data = render(TABLE, "parquet")
    assert isinstance(data, bytes)
    back = pq.read_table(io.BytesIO(data))
    assert back.column_names == TABLE.column_names and back["vec"].to_pylist() == TABLE["vec"].to_pylist()


def test_json_takes_duckdb_decimals():
    import duckdb

    table = duckdb.sql("SELECT sum(x) AS s, avg(x)::DECIMAL(6, 2) AS a FROM range(5) t(x)").to_arrow_table()
    assert json.loads(render(table, "json")) == [{"s": 10, "a": 2.0}]
