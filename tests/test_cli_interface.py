"""The researcher's command line: ``scan --model/--dataset/-o`` without writing YAML, and
``query`` results that read well piped or written to a file."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dispersion.core.catalog import build_catalog
from dispersion.core.columns import columns_markdown, describe
from dispersion.core.storage import Store

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dispersion.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "store"
    store = Store(str(path))
    long_text = "a segment, with commas,\nand a newline " * 30
    store.write_table("results/texts/default.parquet", pa.table({"segment_id": [0, 1], "text": [long_text, "b"]}))
    store.write_table("results/bins/default.parquet",
                      pa.table({"model": ["m", "m"], "bin": [0, 1], "dispersion": [0.25, 0.5]}))
    build_catalog(store)
    return path


def test_query_in_a_pipe_is_csv_with_whole_cells(root, tmp_path):
    out = _cli("query", "--root", str(root), "SELECT segment_id, text FROM texts ORDER BY 1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0] == ["segment_id", "text"] and len(rows) == 3
    assert rows[1][1] == "a segment, with commas,\nand a newline " * 30  # not cut at 80 columns


@pytest.mark.parametrize("fmt", ["json", "jsonl", "markdown"])
def test_query_formats(root, tmp_path, fmt):
    out = _cli("query", "--root", str(root), "SELECT bin, dispersion FROM bins ORDER BY bin", "--format", fmt,
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    if fmt == "json":
        assert json.loads(out.stdout) == [{"bin": 0, "dispersion": 0.25}, {"bin": 1, "dispersion": 0.5}]
    elif fmt == "jsonl":
        assert [json.loads(x) for x in out.stdout.splitlines()][1] == {"bin": 1, "dispersion": 0.5}
    else:
        assert out.stdout.splitlines() == ["| bin | dispersion |", "|---|---|", "| 0 | 0.25 |", "| 1 | 0.5 |"]


def test_query_output_file_takes_its_format_from_the_suffix(root, tmp_path):
    target = tmp_path / "bins.parquet"
    out = _cli("query", "--root", str(root), "FROM bins", "--output", str(target), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert pq.read_table(target).column("dispersion").to_pylist() == [0.25, 0.5]
    assert out.stdout == "" and "2 rows" in out.stderr


def test_query_output_tsv_and_txt_and_a_table_in_a_pipe(root, tmp_path):
    tsv, txt = tmp_path / "c.tsv", tmp_path / "c.txt"
    for target in (tsv, txt):
        out = _cli("query", "--root", str(root), "SELECT bin, dispersion FROM bins ORDER BY bin", "--output",
                   str(target), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    assert tsv.read_text().splitlines() == ["bin\tdispersion", "0\t0.25", "1\t0.5"]
    assert "┃ bin ┃ dispersion ┃" in txt.read_text() and "│   1 │        0.5 │" in txt.read_text()
    piped = _cli("query", "--root", str(root), "SELECT segment_id, text FROM texts", "--format", "table",
                 cwd=tmp_path)  # a pipe is no terminal: one line per row, not 80 columns
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2 + 4, piped.stdout
    bad = _cli("query", "--root", str(root), "FROM bins", "--output", str(tmp_path / "c.xlsx"), cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --output: cannot tell the format") \
        and ".tsv (tsv)" in bad.stderr and not (tmp_path / "c.xlsx").exists()


@pytest.mark.parametrize("args, says", [
    (["--format", "xml"], "--format: unknown format 'xml'"),
    (["--format", "parquet"], "--format parquet: give --output FILE"),
    ([], 'Did you mean "bins"?'),
])
def test_query_errors_are_one_line(root, tmp_path, args, says):
    sql = "FROM bin" if not args else "FROM bins"
    out = _cli("query", "--root", str(root), sql, *args, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]


def test_scan_a_model_from_the_command_line(micro_zoo, tmp_path):
    """lm-eval's style: no config file, the model and dataset named on the command line."""
    store = tmp_path / "store"
    zoo = yaml.safe_dump(micro_zoo.model_dump(), default_flow_style=True).strip()
    out = _cli("scan", "--model", "tiny=zoo:gpt2-tiny@step20", "--dataset", "embedded:prose", "--root", str(store),
               "-o", f"zoo={zoo}", "-o", "sampling.num_segments=40", "-o", "sampling.segment_length=32",
               "-o", "analysis.bin_size=10", "-o", "extraction.layers=[final]",
               "-o", f"tracking.mlflow=file:{tmp_path}/mlruns", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stdout + out.stderr and "\x1b[" not in out.stdout + out.stderr  # no bars, no colours
    assert "…" not in out.stdout  # tables are not squeezed to 80 columns in a pipe
    assert "torch: 1 intra-op thread (OMP_NUM_THREADS)" in out.stdout  # threads follow the CPU budget
    # the report: metadata, the claims ledger and the findings (rho with its interval, p, n) first, then
    # appendices; a self-contained HTML page
    md = (store / "results" / "report" / "tiny-prose.md").read_text()
    assert (md.index("| run | `tiny-prose`") < md.index("## Claims of paper 001") < md.index("## Findings")
            < md.index("## Appendix A") < md.index("## Appendix B"))
    assert "| model | revision | dataset | scope | bins | Spearman ρ | interval | p | Pearson r | interval |" in md
    html = (store / "results" / "report" / "tiny-prose.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    assert 'src="data:image/png;base64,' in html and 'src="tiny-prose.png"' not in html
    q = _cli("query", "--root", str(store), "SELECT model, revision, dataset, count(*) AS n FROM features GROUP BY ALL",
             "--format", "json", cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout) == [{"model": "tiny", "revision": "step20", "dataset": "prose", "n": 40}]
    # every row carries its run and numeric step; the runs table says what each run was
    for view in ("features", "bins", "correlations"):
        q = _cli("query", "--root", str(store), f"SELECT DISTINCT step, run FROM {view}", "--format", "json",
                 cwd=tmp_path)
        assert json.loads(q.stdout) == [{"step": 20, "run": "tiny-prose"}], (view, q.stderr)
    q = _cli("query", "--root", str(store), "SELECT name, models, units, ran, run_id FROM runs", "--format", "json",
             cwd=tmp_path)
    (row,) = json.loads(q.stdout)
    assert {k: row[k] for k in ("name", "models", "units", "ran")} == {"name": "tiny-prose", "models": ["tiny"],
                                                                       "units": 1, "ran": 1}
    # the MLflow run (tracking.mlflow): the store's run id, the config, every correlation
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store is in maintenance mode
    client = MlflowClient(tracking_uri=f"file:{tmp_path}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("dispersion").experiment_id])
    assert run.data.tags["dispersion.run_id"] == row["run_id"]
    assert run.data.params["sampling.num_segments"] == "40" and run.data.params["models"].startswith('[{"name": "tiny"')
    (corr,) = [r for r in pq.read_table(store / "results/correlations/tiny-prose.parquet").to_pylist()
               if (r["layer"], r["site"], r["pool"], r["bins"]) == ("final", "block", "last", "all")]
    assert run.data.metrics["spearman_r/tiny/checkpoints/prose/final/block/last/all"] == pytest.approx(corr["spearman_r"])
    assert f"mlflow: run {run.info.run_id} in experiment 'dispersion'" in out.stdout
    again = _cli("report", "--model", "tiny=zoo:gpt2-tiny@step20", "--dataset", "embedded:prose", "--root", str(store),
                 "-o", f"zoo={zoo}", "-o", "sampling.num_segments=40", "-o", "sampling.segment_length=32",
                 "-o", "analysis.bin_size=10", "-o", "extraction.layers=[final]",
                 "-o", f"tracking.mlflow=file:{tmp_path}/mlruns", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"mlflow: resumed run {run.info.run_id} " in again.stdout  # one MLflow run per scan, not a duplicate
    assert len(client.search_runs([client.get_experiment_by_name("dispersion").experiment_id])) == 1
    # docs/CATALOG.md describes every column of the main views
    for view in ("features", "vectors", "segments", "bins", "correlations", "specs", "runs", "revisions"):
        q = _cli("query", "--root", str(store), f"DESCRIBE {view}", "--format", "json", cwd=tmp_path)
        undocumented = [r["column_name"] for r in json.loads(q.stdout) if describe(view, r["column_name"]) is None]
        assert not undocumented, (view, undocumented)


def test_the_column_reference_is_generated():
    assert (REPO / "docs" / "CATALOG.md").read_text() == columns_markdown()


def test_a_bad_override_is_one_line_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    bad = _cli("scan", "--model", "zoo:gpt2-tiny", "-o", "sampling.num_segmentz=3", "--root", str(store),
               cwd=tmp_path)
    assert not store.exists()
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and lines == ["error: <command line>: sampling.num_segmentz: Extra inputs are not "
                                             "permitted"]


def test_hardness_command_on_lm_eval_logs(micro_zoo, tmp_path):
    """`dispersion hardness`: an lm-eval sample log of one model, no scan and no config file."""
    log = next((REPO / "tests" / "data" / "lm_eval").glob("samples_py_cloze_*.jsonl"))
    store = tmp_path / "store"
    zoo = yaml.safe_dump(micro_zoo.model_dump(), default_flow_style=True).strip()
    common = ["--model", "tiny=zoo:gpt2-tiny@step20", "--root", str(store), "-o", f"zoo={zoo}"]
    bad = _cli("hardness", *common, "--samples", str(tmp_path / "nowhere" / "samples_x_1.jsonl"), cwd=tmp_path)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]
    assert not list(store.glob("queries/**/*.parquet"))
    out = _cli("hardness", *common, "--samples", str(log), "-o", "analysis.hardness.slice_size=4",
               "-o", "analysis.hardness.seeds=2", "-o", "analysis.hardness.calibration_seeds=1",
               "-o", "analysis.hardness.regressors=[linear]", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (store / "results" / "report" / "tiny" / "sections" / "hardness.md").exists()
    q = _cli("query", "--root", str(store), "SELECT queryset, count(*) AS n, sum(correct::int) AS right "
             "FROM hardness_queries WHERE layer = 'final' AND scope = 'across' GROUP BY ALL", "--format", "json",
             cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    labels = [json.loads(line)["acc"] for line in log.read_text().splitlines()]
    assert json.loads(q.stdout) == [{"queryset": "py_cloze", "n": len(labels), "right": int(sum(labels))}]
