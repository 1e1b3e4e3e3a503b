"""A generated corpus for load tests (``datasets: [{synthetic: {...}}]``): text of made-up
words drawn from a Zipf law, as much of it as a test of the mission's sizes needs (100k
segments of 512 tokens), with nothing downloaded. It measures the machinery (sampling,
extraction, storage, the catalog, the analyses) at size; its perplexities and dispersions say
nothing about language.

Word ``r`` (rank 1 = most frequent) is spelled from ``r``'s base-20 digits as consonant-vowel
syllables, so frequent words are short, as in text. Document ``i`` draws its ``words`` ranks
from :math:`P(r) \\propto r^{-a}`, r = 1..V, with ``numpy.random.default_rng([seed, i])``: any
document can be made alone, in any order, and the same settings make the same corpus. Splits
follow the embedded corpus's rule (a stable hash of the document id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS][:20]  # 20 syllables: base-20 digits


def word(rank: int) -> str:
    """The made-up word of ``rank`` (1-based): its base-20 digits as syllables."""
    out, n = [], rank - 1
    while True:
        n, d = divmod(n, 20)
        out.append(SYLLABLES[d])
        if n == 0:
            return "".join(reversed(out))
        n -= 1  # bijective: every length's words come before the next length's


def zipf_weights(vocabulary: int, exponent: float) -> np.ndarray:
    """(V,) probabilities of ranks 1..V, proportional to r^-exponent."""
    w = np.arange(1, vocabulary + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def synthetic_texts(source, keep: Callable[[str], bool] = lambda doc_id: True) -> Iterator[tuple[str, str]]:
    """``(doc_id, text)`` of the documents of a :class:`dispersion.core.config.SyntheticSource`
    whose id ``keep`` accepts (a split), made one at a time
    (:func:`dispersion.measure.corpus.document_source` makes them documents)."""
    words = np.array([word(r) for r in range(1, source.vocabulary + 1)], dtype=object)
    cdf = np.cumsum(zipf_weights(source.vocabulary, source.exponent))
    for i in range(source.documents):
        doc_id = f"zipf-{source.seed}-{i}"
        if not keep(doc_id):
            continue
        rng = np.random.default_rng([source.seed, i])
        ranks = np.minimum(np.searchsorted(cdf, rng.random(source.words)), source.vocabulary - 1)  # (words,)
        yield doc_id, " ".join(words[ranks])
