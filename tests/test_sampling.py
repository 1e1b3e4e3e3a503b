import pytest

from dispersion.measure.corpus import Document, embedded_documents, split_of
from dispersion.core.errors import DataError
from dispersion.measure.sampling import sample_segments, segment_id, shard_slices, tokenizer_fingerprint


class CharTokenizer:
    """An independent toy tokenizer: one id per character code (mod 500)."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 500 for c in t] for t in texts]}

    def batch_decode(self, seqs):
        return ["".join(chr(i) for i in s) for s in seqs]

    def get_vocab(self):
        return {chr(i): i for i in range(500)}


DOCS = [Document(f"d{i}", "".join(chr(97 + (i * 7 + j) % 26) for j in range(50 + 13 * i))) for i in range(20)]


def _sample(seed=0, n=30, length=16, docs=DOCS):
    return sample_segments(docs, CharTokenizer(), length=length, num_segments=n, seed=seed,
                           dataset_key="toy", dataset_name="toy")


def test_same_seed_same_segments_other_seed_other_segments():
    a, b, c = _sample(0), _sample(0), _sample(1)
    assert a.equals(b)
    assert a.column("segment_id").to_pylist() != c.column("segment_id").to_pylist()


def test_segments_are_non_overlapping_windows_of_their_documents():
    t = _sample(n=60)
    docs = {d.doc_id: d.text for d in DOCS}
    seen = set()
    for row in t.to_pylist():
        assert row["offset"] % 16 == 0 and row["n_tokens"] == 16
        text = docs[row["doc_id"]][row["offset"]:row["offset"] + 16]
        assert row["text"] == text
        assert row["token_ids"] == [ord(ch) % 500 for ch in text]
        assert (row["doc_id"], row["offset"]) not in seen
        seen.add((row["doc_id"], row["offset"]))
        assert row["segment_id"] == segment_id("toy", row["doc_id"], row["offset"], 16)
    assert len(set(t.column("segment_id").to_pylist())) == 60


def test_every_window_can_be_drawn():
    total = sum(len(d.text) // 16 for d in DOCS)
    t = _sample(n=total)
    assert t.num_rows == total
    with pytest.raises(DataError, match=f"only {total}"):
        _sample(n=total + 1)


def test_segment_ids_are_stable_across_sample_sizes():
    small = set(_sample(n=10).column("segment_id").to_pylist())
    ids = {segment_id("toy", d.doc_id, o, 16) for d in DOCS for o in range(0, len(d.text) - 15, 16)}
    assert small <= ids


def test_shard_slices():
    assert shard_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_embedded_corpus_has_two_domains_and_disjoint_splits():
    for domain in ("prose", "code"):
        train = {d.doc_id for d in embedded_documents(domain, "train")}
        val = {d.doc_id for d in embedded_documents(domain, "validation")}
        test = {d.doc_id for d in embedded_documents(domain, "test")}
        assert train and val and test and not train & val and not train & test and not val & test
        assert train | val | test == {d.doc_id for d in embedded_documents(domain, "all")}
        assert all(split_of(i) == "validation" for i in val) and all(split_of(i) == "test" for i in test)
    code = embedded_documents("code", "all")
    assert any(d.doc_id == "code/json/__init__.py" for d in code)
    assert any("def " in d.text for d in code)
    prose = embedded_documents("prose", "all")
    assert any(d.doc_id.startswith("topics/") for d in prose)
    assert any(d.doc_id.startswith("docstrings/") for d in prose)


def test_tokenizer_fingerprint_changes_with_vocab():
    class Other(CharTokenizer):
        def get_vocab(self):
            return {chr(i): i for i in range(400)}
    assert tokenizer_fingerprint(CharTokenizer()) != tokenizer_fingerprint(Other())
