"""Caption records of a search: the beam search's arrays -> `Caption`s (numpy only).

Shared by the TensorFlow `Captioner` and the LiteRT one (`model.lite`), which must not
import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from batch_caption.model import vocab as V


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """Where an attention decoder looked while it said a caption: per word (`words`, the
    vocabulary's tokens of the caption), its attention over the encoder's grid cells
    (`weights`, [len(words)][rows * cols], row-major, each row summing to 1)."""

    grid: tuple[int, int]
    words: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...]


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption hypothesis: text, ids (end token excluded), log-prob and score;
    `truncated` when the search cut it at max_length before it emitted the end token.
    `attention`: the best caption's `AttentionMap`, when asked for."""

    text: str
    tokens: tuple[int, ...]
    logprob: float
    score: float
    truncated: bool = False
    attention: AttentionMap | None = None


def grid_of(cells: int) -> tuple[int, int]:
    """An encoder's number of grid cells -> (rows, cols): square when it can be."""
    side = math.isqrt(cells)
    return (side, side) if side * side == cells else (1, cells)


def to_captions(result, vocabulary: V.Vocabulary, grid: tuple[int, int], maps: np.ndarray | None = None
                ) -> list[list[Caption]]:
    """A search's arrays -> for each image its n-best Captions, best first.

    result: tokens int32 [B, n, T], lengths int32 [B, n], logprobs and scores float32
      [B, n] (beam_search.BeamSearchResult's fields, as numpy); a hypothesis whose score is
      not finite was never finished and is dropped.
    maps: the best captions' attention maps [B, T, rows * cols], or None.
    """
    out = []
    for b, (toks, lens, logps, scores) in enumerate(zip(result.tokens, result.lengths, result.logprobs, result.scores)):
        row = []
        for seq, n, lp, sc in zip(toks, lens, logps, scores):
            if not np.isfinite(sc):  # fewer finished hypotheses than asked for
                continue
            ids = tuple(int(i) for i in seq[:n] if i != V.END_ID)
            cut = len(ids) == n  # no end token among its n tokens
            attention = None
            if maps is not None and not row:  # the maps follow hypothesis 0, the best
                words = tuple(vocabulary.words[i] for i in ids)
                weights = tuple(tuple(float(a) for a in step) for step in maps[b, : len(ids)])
                attention = AttentionMap(grid, words, weights)
            row.append(Caption(vocabulary.decode(ids), ids, float(lp), float(sc), cut, attention))
        out.append(row)
    return out
