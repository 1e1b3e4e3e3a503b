"""Query sets with correctness labels from files (paper 001 Sec. 3.1, B.1): the sample logs of
lm-evaluation-harness and plain tables, as rows of :data:`QUERY_SCHEMA` (``query_id``, ``text``,
``correct``, ``task``, optional ``slice``).

* :func:`read_lm_eval_samples` -- the ``samples_<task>_<date>.jsonl`` files that
  lm-evaluation-harness 0.4.x writes with ``--log_samples --output_path P`` (one JSON object
  per document and filter: ``doc_id``, ``doc``, ``target``, ``arguments`` =
  ``{"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}``, ``resps``,
  ``filtered_resps``, ``filter``, ``metrics`` (the metric names), the hashes, and every metric
  as a key, e.g. ``"acc": 1.0``). The query text is the request context the model saw,
  ``arguments.gen_args_0.arg_0`` (few-shot examples and chat template included, as lm-eval
  rendered them); ``correct`` is the chosen metric (``acc`` by default, ``acc_norm`` or any
  0/1 metric); the task comes from the file name.
* :func:`read_query_table` -- a CSV or Parquet table with ``query_id``, ``text``,
  ``correct`` and optionally ``task`` and ``slice``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from dispersion.core.errors import DataError
from dispersion.core.storage import arrow_bytes, parse_parquet

QUERY_SCHEMA = pa.schema([
    pa.field("query_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("correct", pa.bool_()),      # null for the embedded cloze until a model answers it
    pa.field("task", pa.string(), nullable=False),
    pa.field("slice", pa.string()),
])
"""A query set: one row per query, ``query_id`` unique within the set."""

# samples_<task>_<date>.jsonl, the date as lm-eval's EvaluationTracker writes it (2024-05-01T12-30-59.123456)
LM_EVAL_FILE = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.jsonl$")


# --------------------------------------------------------------------------- #
# query sets from files
# --------------------------------------------------------------------------- #
def _fs_paths(paths: Iterable[str], pattern: str) -> list[str]:
    """Files named by ``paths`` (files, folders searched recursively for ``pattern``, globs),
    local or fsspec URLs, sorted and without duplicates."""
    import fnmatch

    import fsspec

    out: list[str] = []
    for p in paths:
        fs, base = fsspec.core.url_to_fs(os.path.expanduser(str(p)))
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        unstrip = (lambda x: x) if proto in ("file", "local") else fs.unstrip_protocol
        if any(c in base for c in "*?["):
            found = [f for f in fs.glob(base) if fs.isfile(f)]
        elif fs.isdir(base):
            found = [f for f in fs.find(base) if fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern)]
        elif fs.isfile(base):
            found = [base]
        else:
            raise DataError(f"paths: {p!r} does not exist")
        if not found:
            raise DataError(f"paths: no {pattern} file under {p!r}")
        out.extend(unstrip(f) for f in found)
    return sorted(dict.fromkeys(out))


def lm_eval_sample_files(paths: Iterable[str]) -> dict[str, str]:
    """``{task: file}`` of the lm-eval sample files under ``paths`` (files, folders, globs).

    Raises:
        DataError: a file not named ``samples_<task>_<date>.jsonl``, or two files of one task
            (two runs in one output folder: name the one to read).
    """
    out: dict[str, str] = {}
    for f in _fs_paths(paths, "samples_*.jsonl"):
        m = LM_EVAL_FILE.match(f.rsplit("/", 1)[-1])
        if m is None:
            raise DataError(f"paths: {f!r} is not an lm-eval sample file (samples_<task>_<date>.jsonl)")
        task = m.group("task")
        if task in out:
            raise DataError(f"paths: two sample files of task {task!r} ({out[task]!r}, {f!r}); give one of them")
        out[task] = f
    return out


def _label(value: Any, where: str, metric: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: metric {metric!r} is {value!r}, not 0/1 (choose a per-document 0/1 metric "
                    "such as acc, acc_norm or exact_match)")


def read_lm_eval_samples(paths: Iterable[str], *, metric: str = "acc", filter: str | None = None) -> pa.Table:
    """A :data:`QUERY_SCHEMA` table from lm-eval 0.4.x sample logs (see the module doc).

    ``query_id`` is ``{task}/{doc_id}``; ``text`` is ``arguments.gen_args_0.arg_0``, the
    context of the document's first request (every request of a multiple-choice document
    shares it); ``correct`` is the document's ``metric`` value (0/1). Tasks scored under
    several filters (generation tasks: ``strict-match``, ``flexible-extract``) log one line
    per filter: ``filter`` picks one, and is required then.

    Raises:
        DataError: unreadable lines, a missing metric (the message lists those logged), a
            metric that is not 0/1, several filters without ``filter``, duplicate documents.
    """
    import fsspec

    files = lm_eval_sample_files(paths)
    ids: list[str] = []
    texts: list[str] = []
    labels: list[bool] = []
    tasks: list[str] = []
    for task, path in files.items():
        rows: dict[str, list[tuple[int, str, bool]]] = {}  # filter -> (doc_id, text, correct)
        with fsspec.open(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                    doc_id = int(rec["doc_id"])
                    text = rec["arguments"]["gen_args_0"]["arg_0"]
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(f"{where}: not an lm-eval sample line ({type(err).__name__}: {err})") from None
                if not isinstance(text, str):
                    raise DataError(f"{where}: arguments.gen_args_0.arg_0 is not a string")
                if metric not in rec:
                    logged = rec.get("metrics") or [k for k in rec if k not in (
                        "doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                        "doc_hash", "prompt_hash", "target_hash")]
                    raise DataError(f"{where}: no metric {metric!r} (logged: {', '.join(map(str, logged))})")
                rows.setdefault(str(rec.get("filter", "none")), []).append(
                    (doc_id, text, _label(rec[metric], where, metric)))
        if not rows:
            raise DataError(f"{path}: no samples")
        if filter is not None:
            if filter not in rows:
                raise DataError(f"{path}: no samples under filter {filter!r} (logged: {', '.join(rows)})")
            chosen = rows[filter]
        elif len(rows) > 1:
            raise DataError(f"{path}: samples under several filters ({', '.join(rows)}); choose one with filter")
        else:
            chosen = next(iter(rows.values()))
        seen: set[int] = set()
        for doc_id, text, ok in sorted(chosen, key=lambda r: r[0]):
            if doc_id in seen:
                raise DataError(f"{path}: document {doc_id} logged twice under one filter")
            seen.add(doc_id)
            ids.append(f"{task}/{doc_id}")
            texts.append(text)
            labels.append(ok)
            tasks.append(task)
    return pa.table({"query_id": ids, "text": texts, "correct": pa.array(labels, pa.bool_()), "task": tasks,
                     "slice": pa.nulls(len(ids), pa.string())}, schema=QUERY_SCHEMA)


def _bool_column(col: pa.ChunkedArray, where: str) -> pa.Array:
    values = col.to_pylist()
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            v = {"true": True, "false": False, "1": True, "0": False}.get(v.strip().lower(), v)
        if isinstance(v, bool):
            out.append(v)
        elif isinstance(v, (int, float)) and v in (0, 1):
            out.append(bool(v))
        else:
            raise DataError(f"{where}: row {i}: correct is {v!r}, not true/false or 0/1")
    return pa.array(out, pa.bool_())


def read_query_table(path: str, *, task: str | None = None) -> pa.Table:
    """A :data:`QUERY_SCHEMA` table from a CSV or Parquet file (local path or fsspec URL)
    with columns ``query_id``, ``text``, ``correct`` (true/false or 0/1) and optionally
    ``task`` (default ``task``, else the file's stem) and ``slice``.

    Raises:
        DataError: a missing column, an unreadable file, an empty text, a duplicate id.
    """
    import fsspec
    import pyarrow.csv as pcsv

    name = str(path).rsplit("/", 1)[-1]
    try:
        with fsspec.open(os.path.expanduser(str(path)), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"path: no such file {path!r}") from None
    try:
        if name.endswith((".parquet", ".pq")):
            table = parse_parquet(data)
        else:
            table = pcsv.read_csv(pa.BufferReader(arrow_bytes(data)), convert_options=pcsv.ConvertOptions(
                column_types={"query_id": pa.string(), "text": pa.string(), "task": pa.string(),
                              "slice": pa.string()}))
    except (pa.ArrowException, ValueError, OSError) as err:
        raise DataError(f"{path}: cannot read ({str(err).splitlines()[0] if str(err) else type(err).__name__})") \
            from None
    missing = [c for c in ("query_id", "text", "correct") if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (have: {', '.join(table.column_names)})")
    n = table.num_rows
    stem = task or name.rsplit(".", 1)[0]
    tasks = table.column("task").cast(pa.string()) if "task" in table.column_names else pa.array([stem] * n)
    slices = table.column("slice").cast(pa.string()) if "slice" in table.column_names else pa.nulls(n, pa.string())
    out = pa.table({"query_id": table.column("query_id").cast(pa.string()),
                    "text": table.column("text").cast(pa.string()),
                    "correct": _bool_column(table.column("correct"), str(path)),
                    "task": tasks, "slice": slices}, schema=QUERY_SCHEMA.remove_metadata())
    return checked_queries(out, str(path))


def checked_queries(table: pa.Table, where: str) -> pa.Table:
    ids = table.column("query_id").to_pylist()
    if any(i is None or i == "" for i in ids):
        raise DataError(f"{where}: a query_id is empty")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{where}: query_id {dup!r} appears twice")
    if any(t is None or not t.strip() for t in table.column("text").to_pylist()):
        raise DataError(f"{where}: a query text is empty")
    if table.num_rows == 0:
        raise DataError(f"{where}: no queries")
    return table.cast(QUERY_SCHEMA)
