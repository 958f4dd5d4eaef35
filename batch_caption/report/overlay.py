"""The report's attention overlay: where the model looked for each word of a caption.

A caption record written with --attention_maps holds "attention" {grid [rows, cols], words,
percent [word][cell]} (see :mod:`batch_caption.records`). Its card gets a rows x cols grid of
cells laid over the whole thumbnail (the encoder saw the image squashed into a square, so
its grid spans the full picture whatever the aspect), and the caption's words become
focusable spans. Hovering or focusing word i shows word i's map: each cell's opacity is its
percent scaled so that the word's strongest cell is at MAX_OPACITY. With no word hovered or
focused the cells are transparent: the thumbnail shows as it is.

The page runs no script (its Content-Security-Policy allows none), so this is CSS alone:
each cell carries every word's percent as custom properties (--p0, --p1, ...), the grid
carries each word's scale (--s0, ...), and one rule per word position switches the cells'
opacity to var(--pI) * var(--sI) while `.card:has(.wI:hover, .wI:focus)`.

A record whose "attention" does not hold together (wrong lengths, non-numbers, words that
are not its caption's) gets no overlay: its card renders as one without attention.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

MAX_OPACITY = 0.8  # the strongest cell of a word's map; the thumbnail stays visible under it

CSS = """
.attn{position:relative;width:fit-content;max-width:100%;margin:0 auto .5em}
.attn .thumb{margin:0}
.attn-grid{position:absolute;inset:0;display:grid;pointer-events:none}
.attn-grid .cell{background:#ffd400;opacity:0}
.word{border-bottom:1px dotted #999;cursor:default}.word:hover,.word:focus{background:#ffe680}
"""


@dataclasses.dataclass(frozen=True)
class Attention:
    """A record's attention, checked: `percent[w]` has rows * cols numbers for each word w;
    `pieces` is the caption cut into [gap, word, gap, word, ..., tail]."""

    rows: int
    cols: int
    words: tuple[str, ...]
    percent: tuple[tuple[float, ...], ...]
    pieces: tuple[str, ...]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _percent(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= 100)


def parse(record: dict) -> Attention | None:
    """The record's "attention" as an Attention, or None when it is absent or malformed."""
    value = record.get("attention")
    if not isinstance(value, dict):
        return None
    grid, words, percent = value.get("grid"), value.get("words"), value.get("percent")
    if not (isinstance(grid, list) and len(grid) == 2 and all(_count(n) for n in grid)):
        return None
    if not (isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)):
        return None
    cells = grid[0] * grid[1]
    if not (isinstance(percent, list) and len(percent) == len(words) and all(
            isinstance(row, list) and len(row) == cells and all(_percent(p) for p in row) for row in percent)):
        return None
    pieces = _pieces(record.get("caption"), words)
    if pieces is None:
        return None
    return Attention(grid[0], grid[1], tuple(words), tuple(tuple(row) for row in percent), tuple(pieces))


def _pieces(caption: Any, words: list[str]) -> list[str] | None:
    """The caption cut into [gap, word, gap, word, ..., tail], each word found in turn after
    nothing but whitespace; None when the words are not the caption's."""
    if not isinstance(caption, str):
        return None
    pieces, at = [], 0
    for word in words:
        found = caption.find(word, at)
        if found < 0 or caption[at:found].strip():
            return None
        pieces += [caption[at:found], word]
        at = found + len(word)
    if caption[at:].strip():
        return None
    return pieces + [caption[at:]]


def _number(value: float) -> str:
    return f"{value:.4g}"


def overlay(attention: Attention) -> str:
    """The grid of cells to lay over the thumbnail (inside the `.attn` wrapper)."""
    scales = ";".join(f"--s{w}:{_number(MAX_OPACITY / max(row)) if max(row) > 0 else 0}"
                      for w, row in enumerate(attention.percent))
    style = f"grid-template:repeat({attention.rows},1fr)/repeat({attention.cols},1fr);{scales}"
    cells = [";".join(f"--p{w}:{_number(row[c])}" for w, row in enumerate(attention.percent))
             for c in range(attention.rows * attention.cols)]
    return (f'<div class="attn-grid" aria-hidden="true" style="{style}">'
            + "".join(f'<i class="cell" style="{s}"></i>' for s in cells) + "</div>")


def caption_words(attention: Attention) -> str:
    """The caption's HTML, each word a focusable span."""
    out = []
    for i, text in enumerate(attention.pieces):
        text = html.escape(text, quote=True)
        out.append(f'<span class="word w{i // 2}" tabindex="0">{text}</span>' if i % 2 else text)
    return "".join(out)


def css(max_words: int) -> str:
    """The overlay's style sheet, with a rule for each word position up to `max_words`."""
    rules = [f".card:has(.w{w}:hover,.w{w}:focus) .attn-grid .cell{{opacity:calc(var(--p{w})*var(--s{w}))}}"
             for w in range(max_words)]
    return CSS + "\n".join(rules) + "\n"
