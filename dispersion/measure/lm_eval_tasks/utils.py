"""lm-eval's entry to the shipped queries (``custom_dataset: !function utils.load_prose``):
one ``test`` split per task, read from the ``.jsonl`` beside this file."""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(task: str, **_settings):
    import datasets

    with open(os.path.join(HERE, f"{task}.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_prose(**settings):
    return _load("dispersion_cloze_prose", **settings)


def load_code(**settings):
    return _load("dispersion_cloze_code", **settings)
