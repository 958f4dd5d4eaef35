"""CIDEr-D as a training reward: the metric evaluate reports, with a fixed idf.

    score(hypothesis) = 10 / (4 * m) * sum over n = 1..4, references r = 1..m of
        sum_g min(h_g, r_g) * r_g / (|h_n| |r_n|) * exp(-(len_h - len_r)^2 / (2 * 6^2))

where h_g, r_g are an n-gram's counts times its idf, log(images) - log(max(1, images
whose references hold it)), |.| the norm of the n-gram vector, and len the count of
bigrams (the length pycocoevalcap's CIDEr-D uses; kept so the two agree exactly).

pycocoevalcap computes the idf from the references of the set being scored, which is
right for a test set and wrong for a training batch. This scorer takes its idf once, from
the references of the whole training split, and caches every reference's vector, so that
one hypothesis costs a few dictionary lookups. Given the same references as idf source
it returns pycocoevalcap's score (tests/training/test_cider.py checks that).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable, Mapping, Sequence

_SIGMA = 6.0
_N = 4


def ngram_counts(words: Sequence[str], n: int = _N) -> collections.Counter:
    """Counts of every 1..n-gram (as word tuples) of `words`."""
    return collections.Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D of hypotheses against each image's references, idf from all references.

    Args:
      references: image key -> that image's reference captions, each a list of words
        (tokenised and cleaned the way hypotheses will be).
    """

    def __init__(self, references: Mapping[Hashable, Sequence[Sequence[str]]]):
        if not references:
            raise ValueError("CIDEr-D needs references")
        frequency: collections.Counter = collections.Counter()
        counted = {key: [ngram_counts(words) for words in refs] for key, refs in references.items()}
        for refs in counted.values():
            frequency.update(set().union(*refs) if refs else ())
        self._log_images = math.log(float(len(counted)))
        self._log_frequency = {g: math.log(max(1.0, c)) for g, c in frequency.items()}
        self._references = {key: [self._vector(c) for c in refs] for key, refs in counted.items()}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._references

    def _vector(self, counts: collections.Counter):
        """-> (per-order {ngram: tf-idf} dicts, per-order norms, length in bigrams)."""
        vec: list[dict] = [{} for _ in range(_N)]
        sq = [0.0] * _N
        for gram, count in counts.items():
            n = len(gram) - 1
            weight = count * (self._log_images - self._log_frequency.get(gram, 0.0))
            vec[n][gram] = weight
            sq[n] += weight * weight
        bigrams = sum(count for gram, count in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(s) for s in sq], bigrams

    def score(self, key: Hashable, words: Sequence[str]) -> float:
        """CIDEr-D of one hypothesis (a list of words) against image `key`'s references."""
        refs = self._references[key]
        if not refs:
            return 0.0
        vec, norm, length = self._vector(ngram_counts(words))
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * _SIGMA**2))
            for n in range(_N):
                ref_n = ref_vec[n]
                overlap = sum(min(w, ref_n[g]) * ref_n[g] for g, w in vec[n].items() if g in ref_n)
                if norm[n] and ref_norm[n]:
                    overlap /= norm[n] * ref_norm[n]
                total += overlap * penalty
        return 10.0 * total / (_N * len(refs))


def is_word(token: str) -> bool:
    """Whether a vocabulary token counts as a word (punctuation does not)."""
    return any(ch.isalnum() for ch in token)


def caption_words(text: str) -> list[str]:
    """The words CIDEr-D compares: the vocabulary's tokens without punctuation (evaluate's
    PTB tokenisation drops it too)."""
    from batch_caption.model.vocab import tokenize

    return [t for t in tokenize(text) if is_word(t)]


def read_references(path: str) -> dict[int, list[list[str]]]:
    """references_<split>.json (COCO format, read as evaluate reads it) -> image id -> its
    captions' words."""
    from batch_caption.evaluate import read_references as read_captions

    return {image: [caption_words(c) for c in captions] for image, captions in read_captions(path)[1].items()}
