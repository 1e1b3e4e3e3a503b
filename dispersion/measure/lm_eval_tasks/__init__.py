"""The embedded cloze as lm-evaluation-harness tasks: ``dispersion_cloze_prose`` and
``dispersion_cloze_code`` (paper 001 Sec. 3.1 with lm-eval answering; no hub).

The same task as the ``embedded_cloze`` query sets of the ``hardness`` step, in words instead
of one model's tokens (:func:`dispersion.measure.cloze.text_cloze`): from the held-out
(``validation``) split of the embedded corpus, a context of 16 words and its true continuation
of 4 words among 10 options, the 9 others the nearest 4-word spans of the same document.
The files here hold the queries (``{task}.jsonl``, written by ``python -m
dispersion.measure.lm_eval_tasks --write`` on Python :data:`PYTHON`, whose standard library is the
corpus) and one YAML per task, which lm-eval 0.4.x reads with ``--include_path``::

    lm_eval --model hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct \\
            --include_path "$(python -m dispersion.measure.lm_eval_tasks)" \\
            --tasks dispersion_cloze_prose,dispersion_cloze_code --log_samples --output_path lm-eval-out

The sample logs then feed the step (``kind: lm_eval``), or ``dispersion hardness --samples``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).resolve().parent
"""The folder to give lm-eval as ``--include_path``."""

TASKS = {"dispersion_cloze_prose": "prose", "dispersion_cloze_code": "code"}
"""Task name -> embedded domain."""

SETTINGS: dict[str, Any] = {"split": "validation", "context": 16, "continuation": 4, "choices": 10, "n": 1000,
                            "seed": 0, "distractors": "same_document"}
"""How the shipped queries were drawn (:func:`dispersion.measure.cloze.text_cloze`)."""

PYTHON = "3.11"
"""The Python version whose standard library the shipped queries come from."""


def queries(task: str) -> list[dict]:
    """The task's queries as drawn now from this Python's embedded corpus."""
    from dispersion.measure.cloze import text_cloze
    from dispersion.measure.corpus import embedded_documents

    s = SETTINGS
    return text_cloze(embedded_documents(TASKS[task], s["split"]), name=task, context=s["context"],
                      continuation=s["continuation"], choices=s["choices"], n=s["n"], seed=s["seed"],
                      distractors=s["distractors"])


def read(task: str) -> list[dict]:
    """The shipped queries of ``task`` (``{task}.jsonl``)."""
    with open(PATH / f"{task}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def write() -> None:
    """Write every task's ``{task}.jsonl`` from this Python's embedded corpus."""
    for task in TASKS:
        with open(PATH / f"{task}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries(task))
