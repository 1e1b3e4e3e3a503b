"""Scores per model@revision (model, revision, task, score) for the ``gap`` and ``trajectory``
steps: the zoo's validation loss at each checkpoint (task ``val_loss``) plus the user's
``analysis.scores`` table (CSV or Parquet, a local path or any fsspec URL)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from dispersion.core.errors import DataError
from dispersion.core.storage import arrow_bytes, parse_parquet
from dispersion.measure.zoo_cache import zoo_train_log

SCORE_SCHEMA = pa.schema([("model", pa.string()), ("revision", pa.string()), ("task", pa.string()),
                          ("score", pa.float64())])


def read_scores(scores: str | os.PathLike | pa.Table) -> pa.Table:
    """A scores table (columns model, revision, task, score) from a CSV or Parquet file (a local
    path or any fsspec URL, e.g. ``s3://bucket/scores.parquet``) or a table.

    Raises:
        DataError: one line naming the file and the column (missing file, unreadable or
            unsupported file, missing column, non-numeric score).
    """
    if isinstance(scores, pa.Table):
        name, table = "<table>", scores
    else:
        import fsspec

        name = str(scores)
        suffix = Path(name.split("?", 1)[0]).suffix.lower()
        try:
            fs, path = fsspec.core.url_to_fs(name)
            found = fs.isfile(path)
        except Exception as err:  # noqa: BLE001 - unknown protocol, no credentials, unreachable endpoint
            text = str(err).strip()
            raise DataError(f"scores: cannot open {name!r}: {text.splitlines()[0] if text else type(err).__name__}") \
                from None
        if not found:
            raise DataError(f"scores: no such file {name!r}")
        try:
            if suffix not in (".csv", ".parquet", ".pq"):
                raise DataError(f"scores: {name!r}: unsupported format {suffix or '(none)'!r} (csv or parquet)")
            with fs.open(path, "rb") as fh:
                data = fh.read()
            if suffix == ".csv":
                import pyarrow.csv as pacsv

                table = pacsv.read_csv(pa.BufferReader(arrow_bytes(data)), convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in ("model", "revision", "task")}))
            else:
                table = parse_parquet(data)
        except DataError:
            raise
        except Exception as err:
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            raise DataError(f"scores: cannot read {name!r}: {first}") from None
    for col in SCORE_SCHEMA.names:
        if col not in table.column_names:
            raise DataError(f"scores: {name!r} has no column {col!r} (columns: {', '.join(table.column_names)})")
    try:
        score = table.column("score").cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"scores: {name!r}: column 'score' is not numeric") from None
    cols = {c: table.column(c).cast(pa.string()) for c in ("model", "revision", "task")}
    return pa.table({**cols, "score": score})


def zoo_scores(config) -> pa.Table:
    """Validation loss per checkpoint of the config's zoo models (task ``val_loss``)."""
    rows = []
    for m in config.models:
        if m.zoo is None:
            continue
        for ck in zoo_train_log(config.zoo.cache, m.zoo)["checkpoints"]:
            rows.append({"model": m.name, "revision": f"step{ck['step']}", "task": "val_loss",
                         "score": float(ck["val_loss"])})
    return pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)


def scores_table(config) -> pa.Table:
    """Zoo models' validation loss per checkpoint plus the user's scores table, if any."""
    scores = zoo_scores(config)
    if config.analysis.scores:
        user = read_scores(config.analysis.scores)
        scores = pa.concat_tables([scores, user.select(scores.column_names).cast(scores.schema)])
    return scores
