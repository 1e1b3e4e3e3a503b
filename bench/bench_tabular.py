"""The tabular side of the analysis at 100k segments: numpy over pyarrow (what the analysis
steps do: read a partition's shards, sort by perplexity, cut equal-count bins, per-bin means)
against a Polars lazy scan and a DuckDB query of the same Parquet shards (issue 22, item 4).

The shards are written here at the scan's shape: 20 shards x 5,000 segments, the columns of
``features`` (segment_id, ppl, nll_sum, n_scored). Each method reads the shards and returns the
per-bin mean perplexity of 100 bins of 1,000 (sorted by perplexity, ties by segment id) and the
corpus perplexity; the results are checked equal; best of 5. Usage: python bench/bench_tabular.py
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARDS, ROWS, BIN = 20, 5000, 1000


def write(folder: str) -> None:
    rng = np.random.default_rng(0)
    for k in range(SHARDS):
        n_scored = np.full(ROWS, 128, np.int32)
        nll = rng.gamma(4.0, 40.0, ROWS)
        pq.write_table(pa.table({"segment_id": [f"s{k:02d}-{i:05d}" for i in range(ROWS)],
                                 "ppl": np.exp(nll / n_scored), "nll_sum": nll, "n_scored": n_scored}),
                       f"{folder}/shard-{k:05d}.parquet")


def with_numpy(folder: str) -> tuple[np.ndarray, float]:
    t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{folder}/*.parquet"))])
    ppl = t.column("ppl").to_numpy()
    ids = np.asarray(t.column("segment_id").to_pylist())
    order = np.lexsort((ids, ppl))
    means = ppl[order][: len(ppl) // BIN * BIN].reshape(-1, BIN).mean(1)
    corpus = float(np.exp(t.column("nll_sum").to_numpy().sum() / t.column("n_scored").to_numpy().sum()))
    return means, corpus


def with_polars(folder: str) -> tuple[np.ndarray, float]:
    import polars as pl

    lf = pl.scan_parquet(f"{folder}/*.parquet")
    binned = (lf.sort(["ppl", "segment_id"]).with_row_index("i")
              .with_columns((pl.col("i") // BIN).alias("bin"))
              .group_by("bin").agg(pl.col("ppl").mean(), pl.len().alias("n")).filter(pl.col("n") == BIN)
              .sort("bin"))
    corpus = lf.select((pl.col("nll_sum").sum() / pl.col("n_scored").sum()).exp()).collect().item()
    return binned.collect()["ppl"].to_numpy(), float(corpus)


def with_duckdb(folder: str) -> tuple[np.ndarray, float]:
    con = duckdb.connect()
    src = f"read_parquet('{folder}/*.parquet')"
    means = con.sql(f"""SELECT avg(ppl) AS ppl FROM (SELECT ppl, (row_number() OVER (ORDER BY ppl, segment_id) - 1)
                        // {BIN} AS bin FROM {src}) GROUP BY bin HAVING count(*) = {BIN} ORDER BY bin""").fetchnumpy()
    corpus = con.sql(f"SELECT exp(sum(nll_sum) / sum(n_scored)) FROM {src}").fetchall()[0][0]
    con.close()
    return means["ppl"], float(corpus)


def main() -> None:
    folder = tempfile.mkdtemp(prefix="bench-tabular-")
    write(folder)
    print(f"{SHARDS} shards x {ROWS} rows; load average {os.getloadavg()[0]:.2f}")
    ref = with_numpy(folder)
    times = {}
    for name, fn in (("numpy over pyarrow", with_numpy), ("polars lazy scan", with_polars),
                     ("duckdb query", with_duckdb)):
        got = fn(folder)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
        assert abs(got[1] - ref[1]) <= 1e-9 * ref[1]
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            fn(folder)
            best = min(best, time.perf_counter() - t)
        times[name] = best
    base = times["numpy over pyarrow"]
    for name, t in times.items():
        print(f"{name:20s} {t * 1000:8.1f} ms  ({base / t:.2f}x numpy)")


if __name__ == "__main__":
    main()
