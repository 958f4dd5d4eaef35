"""Caption vocabulary: tokenization, min-count cut, special tokens, JSON round trip.

Tokenization is deliberately simple and stable (it is part of the model bundle): lower
case, words are runs of letters/digits/apostrophes, every other non-space character is a
token of its own ("a dog, running." -> ["a", "dog", ",", "running", "."]).

Ids are fixed for the special tokens so that a padded batch is all zeros past the end:
  0 <pad>   1 <start>   2 <end>   3 <unk>
then words by descending count, ties broken alphabetically (deterministic).
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

_TOKEN_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def tokenize(text: str) -> list[str]:
    """Lower-cases `text` and splits it into word and punctuation tokens."""
    return _TOKEN_RE.findall(text.lower())


class Vocabulary:
    """Maps caption tokens to integer ids and back.

    Build one with `Vocabulary.build(captions, min_count)`; persist it with
    `to_json()` / `from_json()` (the bundle's `vocab.json`).
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate tokens")
        self._words = tuple(words)
        self._ids = {w: i for i, w in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """Keeps every token seen at least `min_count` times in `captions`."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = collections.Counter(t for c in captions for t in tokenize(c))
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIAL_TOKENS + tuple(kept))

    def __len__(self) -> int:
        return len(self._words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._words == other._words

    @property
    def words(self) -> tuple[str, ...]:
        return self._words

    def token_id(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """Token ids of `caption` without start/end, truncated to `max_length` tokens."""
        ids = [self.token_id(t) for t in tokenize(caption)]
        return ids if max_length is None else ids[:max_length]

    def decode(self, ids: Iterable[int]) -> str:
        """Joins ids into a sentence; stops at <end>, skips <pad> and <start>."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self._words[i] if 0 <= i < len(self._words) else UNK)
        return _detokenize(words)

    def to_json(self) -> str:
        return json.dumps({"format": "batch_caption.vocab/1", "words": list(self._words)}, indent=0)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != "batch_caption.vocab/1":
            raise ValueError("not a batch_caption vocabulary (missing format 'batch_caption.vocab/1')")
        return cls(data["words"])


def _detokenize(words: Sequence[str]) -> str:
    """Joins tokens with spaces, attaching punctuation to the preceding word."""
    out = ""
    for w in words:
        if out and not (len(w) == 1 and not w.isalnum() and w != "'"):
            out += " "
        out += w
    return out
