"""The load-test corpus: made-up words, one per rank, drawn from a Zipf law; documents made
alone and alike on every call; splits as the embedded corpus's; a scan samples it like text."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scan_config_dict

from dispersion.core.config import DatasetSpec, SyntheticSource
from dispersion.core.overrides import dataset_entry
from dispersion.measure.corpus import split_of
from dispersion.measure.corpus import document_source
from dispersion.measure.synthetic import word, zipf_weights


def test_every_rank_has_its_own_word_and_frequent_words_are_short():
    words = [word(r) for r in range(1, 9000)]
    assert len(set(words)) == len(words)
    # 20 words of one syllable, then 400 of two, 8,000 of three: ranks in order of length
    assert {len(w) for w in words[:20]} == {2} and {len(w) for w in words[20:420]} == {4}
    assert {len(w) for w in words[420:8420]} == {6} and len(words[8420]) == 8


def test_documents_follow_the_zipf_law_and_are_the_same_on_every_call():
    src = SyntheticSource(documents=30, words=4000, vocabulary=500, exponent=1.1, seed=7)
    every = document_source(DatasetSpec(name="z", split="all", synthetic=src))
    docs = list(every())
    assert [d.doc_id for d in docs] == [f"zipf-7-{i}" for i in range(30)]
    assert [d.text for d in every()] == [d.text for d in docs]
    counts: dict[str, int] = {}
    for d in docs:
        for w in d.text.split(" "):
            counts[w] = counts.get(w, 0) + 1
    total = 30 * 4000
    p = zipf_weights(500, 1.1)
    for rank in (1, 2, 5, 20):  # observed share within 5 standard errors of the law
        share = counts.get(word(rank), 0) / total
        assert abs(share - p[rank - 1]) < 5 * np.sqrt(p[rank - 1] * (1 - p[rank - 1]) / total)
    val = list(document_source(DatasetSpec(name="z", split="validation", synthetic=src))())
    assert [d.doc_id for d in val] == [d.doc_id for d in docs if split_of(d.doc_id) == "validation"]


def test_the_command_line_names_it():
    assert dataset_entry("synthetic:zipf") == {"name": "zipf", "synthetic": {"kind": "zipf"}}
    assert dataset_entry("load=synthetic:zipf:all") == {"name": "load", "synthetic": {"kind": "zipf"}, "split": "all"}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_scan_samples_and_measures_it(micro_zoo, tmp_path):
    from dispersion.config import parse_config
    from dispersion.run import run_scan

    cfg = parse_config(scan_config_dict(
        micro_zoo, tmp_path / "out", models=[{"name": "gpt2-tiny", "zoo": "gpt2-tiny", "revisions": ["step20"]}],
        datasets=[{"name": "zipf", "split": "all", "synthetic": {"documents": 40, "words": 400, "seed": 1}}],
        sampling={"num_segments": 60, "segment_length": 32, "shard_size": 30, "seed": 0},
        extraction={"layers": ["final"], "pools": ["last"]}, analysis={"bin_size": 10, "bootstrap": {"n": 20}}))
    result = run_scan(cfg, progress=False, log=lambda *_: None)
    assert result.stats.ran == 2
    corr = result.tables["correlations"].to_pylist()
    assert {r["dataset"] for r in corr} == {"zipf"} and all(r["ci_low"] is not None for r in corr)
