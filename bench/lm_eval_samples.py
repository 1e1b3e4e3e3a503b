"""Write real lm-evaluation-harness sample logs for the tests of the hardness step.

Runs lm-eval itself (``pip install -e ".[bench]"``), offline, on a local model folder (default:
the embedded zoo's gpt2-tiny at its last checkpoint) over two tiny tasks defined here:

* ``py_cloze`` -- multiple choice (``acc`` and ``acc_norm``), twelve Python/prose questions;
* ``py_gen``   -- generation (``exact_match``) under two filters (``strict``, ``first_word``),
  so the log holds one line per document and filter.

``simple_evaluate(..., log_samples=True)``, then ``EvaluationTracker.save_results_aggregated`` and
``save_results_samples`` in the order ``lm_eval --log_samples --output_path P`` calls them,
write ``samples_<task>_<date>.jsonl``; the files are copied to ``tests/data/lm_eval/`` (``--out``). Usage::

    python bench/lm_eval_samples.py [--model .cache/zoo/gpt2-tiny/step300] [--out tests/data/lm_eval]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

CLOZE = [
    ("import numpy as", [" np", " pd", " plt", " tf"], 0),
    ("def add(a, b):\n    return", [" a + b", " None", " 42", " self"], 0),
    ("for i in", [" range(10):", " True", " 3.14", " class"], 0),
    ("if __name__ ==", [" \"__main__\":", " 0", " []", " lambda"], 0),
    ("The capital of France is", [" Paris", " Rome", " Berlin", " Madrid"], 0),
    ("class Foo(", ["object):", "1 + 1", "while", "\"\""], 0),
    ("with open(path) as", [" fh:", " 12", " None", " def"], 0),
    ("raise ValueError(", ["\"bad value\")", "import", "]]", "else"], 0),
    ("Water boils at 100 degrees", [" Celsius", " Fahrenheit", " Kelvin", " metres"], 0),
    ("print(", ["\"hello\")", "return", "yield", "pass"], 0),
    ("The opposite of hot is", [" cold", " warm", " fast", " blue"], 0),
    ("return self.", ["value", "123", "((", "::"], 0),
]
GEN = [("Say yes:", "yes"), ("Say no:", "no"), ("Name a colour:", "red"), ("Count: one, two,", "three"),
       ("Python keyword for a function:", "def"), ("Opposite of up:", "down")]

CLOZE_YAML = """task: py_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
GEN_YAML = """task: py_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "^ ?([a-z]+)$"
      - function: take_first
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([a-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=".cache/zoo/gpt2-tiny/step300")
    p.add_argument("--out", default="tests/data/lm_eval")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        with open(t / "cloze.jsonl", "w") as fh:
            for q, choices, a in CLOZE:
                fh.write(json.dumps({"question": q, "choices": choices, "answer": a}) + "\n")
        with open(t / "gen.jsonl", "w") as fh:
            for q, a in GEN:
                fh.write(json.dumps({"question": q, "answer": a}) + "\n")
        (t / "tasks").mkdir()
        (t / "tasks" / "py_cloze.yaml").write_text(CLOZE_YAML.format(data=t / "cloze.jsonl"))
        (t / "tasks" / "py_gen.yaml").write_text(GEN_YAML.format(data=t / "gen.jsonl"))
        lm = HFLM(pretrained=args.model, batch_size=4, device="cpu")
        tracker = EvaluationTracker(output_path=str(t / "out"))
        res = lm_eval.simple_evaluate(model=lm, tasks=["py_cloze", "py_gen"], task_manager=TaskManager(
            include_path=str(t / "tasks")), log_samples=True, evaluation_tracker=tracker)
        assert res is not None
        # as lm_eval's CLI (lm_eval/_cli/run.py) does: the aggregate first (it sets the date id), then the samples
        samples = res.pop("samples")
        tracker.save_results_aggregated(results=res, samples=samples)
        for task in res["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted((t / "out").rglob("samples_*.jsonl")):
            shutil.copyfile(f, out / f.name)
            print(f"{out / f.name}: {sum(1 for _ in open(f))} lines (lm-eval {lm_eval.__version__})")
        for task, r in res["results"].items():
            print(task, {k: v for k, v in r.items() if "stderr" not in k and k not in ("alias", "name")})


if __name__ == "__main__":
    main()
