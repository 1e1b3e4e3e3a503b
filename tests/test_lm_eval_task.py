"""The embedded cloze as lm-evaluation-harness tasks (dispersion/measure/lm_eval_tasks): the shipped
queries are the draw of the embedded corpus, lm-eval 0.4.x answers them offline on a zoo model
(its answers checked against a naive float64 scoring loop), and its sample log feeds the
``hardness`` step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dispersion.measure.lm_eval_tasks import PATH, PYTHON, SETTINGS, TASKS, queries, read
from dispersion.measure.corpus import embedded_documents

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_shipped_queries_are_windows_of_their_document(task):
    shipped = read(task)
    s = SETTINGS
    assert len(shipped) == s["n"] and len({q["query_id"] for q in shipped}) == s["n"]
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON:  # the corpus is this Python's standard library
        assert shipped == queries(task)
    docs = {d.doc_id: d.text for d in embedded_documents(TASKS[task], str(s["split"]))}
    for q in shipped:
        doc = docs[q["query_id"].split("/", 1)[1].rsplit("@", 1)[0]]
        choices = q["choices"]
        assert len(choices) == s["choices"] == len(set(choices)) and 0 <= q["answer"] < s["choices"]
        assert q["context"] + choices[q["answer"]] in doc  # the true continuation follows the context
        assert all(c in doc for c in choices)  # every distractor is a span of the same document
        assert len(q["context"].split()) == s["context"]
        assert all(len(c.split()) == s["continuation"] for c in choices)


def _naive_choice(model, tok, context: str, choices: list[str]) -> int:
    """argmax over the choices of sum log p(choice tokens | context), float64 log-softmax, one
    forward pass per choice (lm-eval's ``acc``: context and continuation tokenized apart)."""
    import torch

    ctx = tok(context, add_special_tokens=False)["input_ids"]
    scores = []
    for c in choices:
        cont = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        scores.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
    return int(np.argmax(scores))


@pytest.mark.slow
def test_lm_eval_answers_the_shipped_task_offline_and_its_log_feeds_the_step(micro_zoo, tmp_path):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(micro_zoo.cache) / "gpt2-tiny" / "step20"
    out = tmp_path / "lm-eval-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    path = subprocess.run([sys.executable, "-m", "dispersion.measure.lm_eval_tasks"], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()
    assert Path(path) == PATH
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={folder},dtype=float32", "--include_path", path,
                          "--tasks", "dispersion_cloze_prose", "--limit", "24", "--batch_size", "8", "--device", "cpu",
                          "--log_samples", "--output_path", str(out)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (log,) = out.rglob("samples_dispersion_cloze_prose_*.jsonl")
    samples = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(samples) == 24
    shipped = read("dispersion_cloze_prose")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for s in samples:
        q = shipped[s["doc_id"]]
        assert s["doc"]["query_id"] == q["query_id"] and s["arguments"]["gen_args_0"]["arg_0"] == q["context"]
        assert s["acc"] == float(_naive_choice(model, tok, q["context"], q["choices"]) == q["answer"])

    store = tmp_path / "store"
    zoo = yaml.safe_dump(micro_zoo.model_dump(), default_flow_style=True).strip()
    step = subprocess.run([sys.executable, "-m", "dispersion.cli", "hardness", "--model", "tiny=zoo:gpt2-tiny@step20",
                           "--root", str(store), "-o", f"zoo={zoo}", "--samples", str(out),
                           "-o", "analysis.hardness.slice_size=4", "-o", "analysis.hardness.seeds=2",
                           "-o", "analysis.hardness.calibration_seeds=1", "-o", "analysis.hardness.regressors=[linear]"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert step.returncode == 0, step.stderr[-3000:]
    q = subprocess.run([sys.executable, "-m", "dispersion.cli", "query", "--root", str(store),
                        "SELECT queryset, count(*) AS n, sum(correct::int) AS right FROM hardness_queries "
                        "WHERE layer = 'final' AND scope = 'across' GROUP BY ALL", "--format", "json"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout) == [{"queryset": "dispersion_cloze_prose", "n": 24,
                                     "right": int(sum(s["acc"] for s in samples))}]
