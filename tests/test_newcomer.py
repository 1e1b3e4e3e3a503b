"""What a new user trips on, through the command line as they would type it: a scan that
cannot give a correlation is refused before any extraction, local folders get readable
names and their checkpoints a step, a second run adds to a root, a mistyped path or an
offline hub id fails in one line within seconds, and labels print as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "dispersion.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=timeout)


def _small(zoo) -> list[str]:
    flat = yaml.safe_dump(zoo.model_dump(), default_flow_style=True).strip()
    return ["-o", f"zoo={flat}", "-o", "sampling.segment_length=32", "-o", "extraction.layers=[final]"]


def _json(root: Path, sql: str, cwd: Path) -> list[dict]:
    q = _cli("query", "--root", str(root), sql, "--format", "json", cwd=cwd)
    assert q.returncode == 0, q.stderr
    return json.loads(q.stdout)


def test_a_scan_too_small_to_correlate_is_refused_before_extraction(micro_zoo, tmp_path):
    """Before: 2 bins of 100 extracted for minutes and ended with an empty table, exit 0."""
    root = tmp_path / "r"
    out = _cli("scan", "-m", "zoo:gpt2-tiny@step20", "--root", str(root), *_small(micro_zoo),
               "-o", "sampling.num_segments=20", "-o", "analysis.bin_size=10", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and "analysis.bin_size" in lines[0] and "sampling.num_segments" in lines[0]
    assert "make 2 bin(s) of 10" in lines[0] and "at most 6" in lines[0] and "at least 30" in lines[0]
    assert not root.exists()  # nothing sampled, extracted or published


def test_without_a_bin_size_the_command_line_makes_ten_bins_and_says_so(micro_zoo, tmp_path):
    root = tmp_path / "r"
    out = _cli("scan", "-m", "zoo:gpt2-tiny@step20", "--root", str(root), *_small(micro_zoo),
               "-o", "sampling.num_segments=40", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bins: 10 of 4 segments per sample of 40 (-o analysis.bin_size=B to choose)" in out.stdout
    rows = _json(root, "SELECT dataset, n_bins FROM correlations WHERE bins = 'all' AND scope = 'across' "
                       "AND pool = 'last' ORDER BY dataset", tmp_path)
    assert rows == [{"dataset": "code", "n_bins": 10}, {"dataset": "prose", "n_bins": 10}]
    # labels print as written: rich would read "[gpt2-tiny@step20]" as markup and drop it
    assert "gpt2-tiny@step20" in out.stdout


def test_a_checkpoint_folder_is_its_model_at_that_step_and_runs_add_to_the_root(micro_zoo, tmp_path):
    """Before: model 'step20', revision 'main', step NULL; a second dataset hid the first."""
    folder = Path(micro_zoo.cache) / "gpt2-tiny" / "step20"
    root = tmp_path / "r"
    for ds in ("embedded:prose", "embedded:code"):
        out = _cli("scan", "-m", str(folder), "-d", ds, "--root", str(root), *_small(micro_zoo),
                   "-o", "sampling.num_segments=30", "-o", "analysis.bin_size=10", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    rows = _json(root, "SELECT DISTINCT model, revision, step, dataset, run FROM correlations ORDER BY dataset",
                 tmp_path)
    assert rows == [{"model": "gpt2-tiny", "revision": "step20", "step": 20, "dataset": "code",
                     "run": "gpt2-tiny-code"},
                    {"model": "gpt2-tiny", "revision": "step20", "step": 20, "dataset": "prose",
                     "run": "gpt2-tiny-prose"}]
    # without --root, a command-line run of one model lives in runs/<model>
    from dispersion.config import load_config

    assert load_config(None, models=[str(folder)], datasets=["embedded:code"]).root == "runs/gpt2-tiny"


def test_a_folder_converted_from_gguf_is_named_after_its_file(tmp_path):
    from dispersion.core.overrides import model_entry

    folder = tmp_path / "0ba7c6f9687296f4fc087aa1cc1a2428"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert model_entry(str(folder))["name"] == "0ba7c6f9687296f4fc087aa1cc1a2428"
    (folder / "gguf.json").write_text(json.dumps({"gguf": "SmolLM2-135M-Instruct-Q8_0.gguf"}))
    assert model_entry(str(folder)) == {"name": "SmolLM2-135M-Instruct-Q8_0", "id": str(folder)}
    assert model_entry(f"mine={folder}")["name"] == "mine"


@pytest.mark.parametrize("ref", [".cache/zoo/gpt2-tiny/step3000", "runs/nope/model", "./model"])
def test_a_mistyped_path_is_no_such_model_folder(tmp_path, ref):
    """Before: transformers' 'Repo id must be in the form ...', or a trip to the hub."""
    (tmp_path / "runs").mkdir()
    out = _cli("scan", "-m", ref, cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == f"error: --model {ref}: no such model folder {ref!r}"


@pytest.mark.parametrize("env, why", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}, "127.0.0.1:9 is not reachable"),
])
def test_a_hub_id_offline_fails_in_one_line_within_seconds(tmp_path, env, why):
    """Before: 26 s and 11 retry lines."""
    t0 = time.monotonic()
    out = _cli("scan", "-m", "EleutherAI/pythia-70m@step1000", cwd=tmp_path,
               env={**env, "HF_HOME": str(tmp_path / "hf")})
    took = time.monotonic() - t0
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: models.0.id: 'EleutherAI/pythia-70m@step1000' is not a local folder")
    assert why in lines[0] and "--model NAME=DIR" in lines[0]
    assert took < 30 and not (tmp_path / "runs").exists()  # interpreter start and imports; no retries


def test_help_keeps_its_examples_whole_in_a_pipe(tmp_path):
    out = _cli("scan", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "dispersion scan -m EleutherAI/pythia-70m@step1000 -d embedded:prose -o sampling.num_segments=500" \
        in out.stdout
