"""Fact checker: does a caption state a synthetic scene's content correctly?

A small deterministic scanner over the closed scene vocabulary
(:mod:`batch_caption.data.scenes`) parses a caption into *phrases* and the
*relation words* between them:

* object phrase: ``[count] [size] [colour] head``, head a shape or a generic
  noun ("shape(s)", "object(s)", ...). "a"/"an"/"the" mean at least one,
  "one".."five"/"both"/"no" an exact count, a bare plural at least two.
* background phrase: ``[tone words] background``; "dark"/"light" must match
  the scene's tone, plain "grey" fits every tone, an object colour never does.
* a relation word ("left", "right", "above", "below", "under", ...) links the
  phrases right before and after it; it holds when *some* matching subject
  stands in it to *some* other matching object.

Other words are ignored, but words that attach to no object (a colour with no
shape, a relation with nothing on one side, conflicting colours) are errors,
and negation ("not", "without") is rejected as unsupported.

A caption is correct when it has no errors and at least one object phrase
with a colour *and* a concrete shape is true of the scene. Captions need not
be complete; ``coverage`` in :class:`FactCheck` is the fraction of the scene's
objects the caption correctly named by colour and shape.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from batch_caption.data.scenes import COLOURS, SHAPES
from batch_caption.storage import files

__all__ = ["FactCheck", "check_caption", "content_accuracy", "load_facts"]

_COUNTS: Mapping[str, tuple[str, int]] = MappingProxyType(
    {
        "a": (">=", 1),
        "an": (">=", 1),
        "the": (">=", 1),
        "one": ("==", 1),
        "single": ("==", 1),
        "1": ("==", 1),
        "two": ("==", 2),
        "both": ("==", 2),
        "2": ("==", 2),
        "three": ("==", 3),
        "3": ("==", 3),
        "four": ("==", 4),
        "4": ("==", 4),
        "five": ("==", 5),
        "5": ("==", 5),
        "no": ("==", 0),
        "zero": ("==", 0),
    }
)
_SIZES: Mapping[str, str] = MappingProxyType(
    {
        **{w: "small" for w in ("small", "little", "tiny")},
        **{w: "large" for w in ("large", "big", "huge")},
    }
)
_SHAPE_WORDS: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {**{s: (s, False) for s in SHAPES}, **{s + "s": (s, True) for s in SHAPES}}
)
_GENERIC_WORDS: Mapping[str, bool] = MappingProxyType(
    {
        **{w: False for w in ("shape", "object", "thing", "item", "figure")},
        **{w: True for w in ("shapes", "objects", "things", "items", "figures")},
    }
)
_BACKGROUND_WORDS = frozenset({"background", "backgrounds", "backdrop"})
_TONE_WORDS: Mapping[str, str] = MappingProxyType(
    {"dark": "dark", "light": "light", "grey": "grey", "gray": "grey"}
)
_RELATION_WORDS: Mapping[str, str] = MappingProxyType(
    {
        "left": "left of",
        "right": "right of",
        "above": "above",
        "over": "above",
        "top": "above",
        "below": "below",
        "under": "below",
        "beneath": "below",
        "underneath": "below",
        "bottom": "below",
    }
)
_OPPOSITE = MappingProxyType(
    {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
)
# Words that end a phrase: an adjective still waiting for its noun is dangling.
_BREAK_WORDS = frozenset({"and", "or", "with", ",", ";", ".", ":"})
_NEGATIONS = frozenset({"not", "without", "nor", "never", "neither"})
_TOKEN = re.compile(r"<[^>\s]*>|[a-z]+|\d+|[,;.:]")


@dataclass(frozen=True)
class FactCheck:
    """Verdict for one caption.

    ``errors`` are human-readable reasons (e.g. "colour: caption says blue
    square, scene has red square"); ``coverage`` is the fraction of scene
    objects correctly named by colour and shape (0 when incorrect).
    """

    correct: bool
    errors: tuple[str, ...] = ()
    coverage: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "errors", tuple(str(e) for e in self.errors))
        if self.correct and self.errors:
            raise ValueError("a correct FactCheck cannot carry errors")
        if not 0.0 <= float(self.coverage) <= 1.0:
            raise ValueError(f"coverage must be in [0, 1], got {self.coverage}")


@dataclass
class _Pending:
    """Modifiers seen since the last head noun (local, mutable parse state)."""

    count: tuple[str, int] | None = None
    size: str | None = None
    colour: str | None = None
    tones: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)

    def has_adjectives(self) -> bool:
        return bool(self.size or self.colour or self.tones)


@dataclass(frozen=True)
class _Phrase:
    kind: str  # "object" or "background"
    text: str
    count: tuple[str, int] | None = None
    size: str | None = None
    colour: str | None = None
    shape: str | None = None  # None: generic noun ("shape", "objects")
    plural: bool = False
    tones: tuple[str, ...] = ()


def _tokenize(caption: str) -> list[str]:
    return _TOKEN.findall(str(caption).lower())


def _parse(tokens: Iterable[str]) -> tuple[list[_Phrase], list[list[str]], list[str]]:
    """Split tokens into phrases and the relation words in each gap between them.

    ``gaps[k]`` holds relation words before phrase ``k``; ``gaps[-1]`` those
    after the last phrase.
    """
    phrases: list[_Phrase] = []
    gaps: list[list[str]] = [[]]
    errors: list[str] = []
    pending = _Pending()

    def flush() -> None:
        nonlocal pending
        if pending.has_adjectives():
            errors.append(f"parse: '{' '.join(pending.words)}' does not name a shape")
        pending = _Pending()

    for tok in tokens:
        if tok in _NEGATIONS:
            errors.append(f"parse: negation '{tok}' is not supported")
        elif tok in _COUNTS:
            flush()
            # "a single" -> the later, more specific count wins.
            pending.count = _COUNTS[tok]
            pending.words.append(tok)
        elif tok in _SIZES:
            if pending.size and pending.size != _SIZES[tok]:
                errors.append(f"parse: conflicting sizes in '{' '.join(pending.words + [tok])}'")
            pending.size = _SIZES[tok]
            pending.words.append(tok)
        elif tok in COLOURS:
            if pending.colour and pending.colour != tok:
                errors.append(f"parse: conflicting colours in '{' '.join(pending.words + [tok])}'")
            pending.colour = tok
            pending.words.append(tok)
        elif tok in _TONE_WORDS:
            pending.tones.append(_TONE_WORDS[tok])
            pending.words.append(tok)
        elif tok in _SHAPE_WORDS or tok in _GENERIC_WORDS:
            shape, plural = _SHAPE_WORDS.get(tok, (None, _GENERIC_WORDS.get(tok, False)))
            text = " ".join(pending.words + [tok])
            if pending.tones:
                errors.append(f"colour: caption says {text}, but objects are never grey/dark/light")
            phrases.append(
                _Phrase("object", text, pending.count, pending.size, pending.colour, shape, plural)
            )
            gaps.append([])
            pending = _Pending()
        elif tok in _BACKGROUND_WORDS:
            text = " ".join(pending.words + [tok])
            phrases.append(
                _Phrase("background", text, colour=pending.colour, tones=tuple(pending.tones))
            )
            gaps.append([])
            pending = _Pending()
        elif tok in _RELATION_WORDS:
            flush()
            gaps[-1].append(_RELATION_WORDS[tok])
        elif tok in _BREAK_WORDS:
            flush()
        # Any other token (filler, "<unk>", "<end>", ...) is ignored.
    flush()
    return phrases, gaps, errors


def _describe(colour: str | None, shape: str | None, size: str | None = None) -> str:
    return " ".join(w for w in (size, colour, shape or "shape") if w)


def _matches(phrase: _Phrase, objects: list[Mapping[str, Any]]) -> list[int]:
    return [
        i
        for i, o in enumerate(objects)
        if (phrase.colour is None or o.get("colour") == phrase.colour)
        and (phrase.size is None or o.get("size") == phrase.size)
        and (phrase.shape is None or o.get("shape") == phrase.shape)
    ]


def _scene_list(objects: Iterable[Mapping[str, Any]]) -> str:
    names = {_describe(o.get("colour"), o.get("shape"), o.get("size")) for o in objects}
    return ", ".join(sorted(names)) if names else "nothing"


def _check_object(
    phrase: _Phrase, objects: list[Mapping[str, Any]]
) -> tuple[list[int], str | None]:
    """Matching object indices and an error message (None when the phrase is true)."""
    matched = _matches(phrase, objects)
    op, k = phrase.count or ((">=", 2) if phrase.plural else (">=", 1))
    if (op == "==" and len(matched) == k) or (op == ">=" and len(matched) >= k):
        return matched, None
    said = _describe(phrase.colour, phrase.shape, phrase.size)
    if matched or (phrase.shape is None and phrase.colour is None):
        plural = "" if len(matched) == 1 else "(s)"
        return matched, (
            f"count: caption says {phrase.text}, scene has {len(matched)} {said}{plural}"
        )
    # Nothing matches: name the attribute that is most likely wrong.
    same_shape = [o for o in objects if o.get("shape") == phrase.shape]
    same_colour = [o for o in objects if o.get("colour") == phrase.colour]
    if phrase.colour and phrase.shape:
        pair = _describe(phrase.colour, phrase.shape)
        same_pair = [o for o in same_shape if o.get("colour") == phrase.colour]
        if same_pair:
            return matched, f"size: caption says {said}, scene has {_scene_list(same_pair)}"
        if same_shape:
            return matched, f"colour: caption says {pair}, scene has {_scene_list(same_shape)}"
        if same_colour:
            return matched, f"shape: caption says {pair}, scene has {_scene_list(same_colour)}"
        kind = "object"
    else:
        kind = "shape" if phrase.shape else "colour" if phrase.colour else "object"
    return matched, f"{kind}: caption says {said}, scene has {_scene_list(objects)}"


def _check_background(phrase: _Phrase, facts: Mapping[str, Any]) -> str | None:
    background = facts.get("background")
    if not isinstance(background, Mapping) or "tone" not in background:
        return None  # nothing recorded to contradict
    tone = str(background["tone"])
    wants = {t for t in phrase.tones if t in ("dark", "light")}
    # Plain "grey" fits every tone; "dark"/"light" must match; objects'
    # colours never describe a background.
    if phrase.colour or len(wants) > 1 or (wants and not tone.startswith(next(iter(wants)))):
        return f"background: caption says {phrase.text}, scene has {tone} background"
    return None


def _check_relation(
    a: _Phrase,
    b: _Phrase,
    rel: str,
    pairs: list[tuple[int, int]],
    relations: set[tuple[int, str, int]],
    objects: list[Mapping[str, Any]],
) -> str | None:
    """Existential check: some matching pair (i, j), i != j, has ``i rel j``."""
    if any((i, rel, j) in relations for i, j in pairs):
        return None
    actual = []
    for i, j in pairs:
        rels = sorted(r for s, r, o in relations if (s, o) == (i, j)) or ["aligned with"]
        subject, other = _scene_list([objects[i]]), _scene_list([objects[j]])
        actual.append(f"{subject} {' and '.join(rels)} {other}")
    return f"relation: caption says {a.text} {rel} {b.text}, scene has {'; '.join(actual)}"


def check_caption(caption: str, facts: Mapping[str, Any]) -> FactCheck:
    """Check every statement of ``caption`` against scene ``facts``.

    ``facts`` is :meth:`batch_caption.data.scenes.Scene.to_facts` output (or
    its JSON round trip): needs ``objects`` (colour/shape/size), ``relations``
    (subject/relation/object indices) and optionally ``background.tone``.
    """
    objects = list(facts.get("objects", []))
    relations = {
        (int(r["subject"]), str(r["relation"]), int(r["object"]))
        for r in facts.get("relations", [])
    }
    phrases, gaps, errors = _parse(_tokenize(caption))
    matches: list[list[int]] = []
    covered: set[int] = set()
    mentioned = False
    for phrase in phrases:
        if phrase.kind == "background":
            matched, error = [], _check_background(phrase, facts)
        else:
            matched, error = _check_object(phrase, objects)
            if not error and phrase.colour and phrase.shape and (phrase.count or ("", 1))[1] > 0:
                mentioned = True
                covered.update(matched)
        matches.append(matched)
        if error:
            errors.append(error)
    if gaps[0]:
        errors.append(f"relation: '{gaps[0][0]}' has no subject")
    if len(gaps) > 1 and gaps[-1]:
        errors.append(f"relation: '{gaps[-1][0]}' has no object")
    for k in range(1, len(phrases)):
        rels = set(gaps[k])
        a, b = phrases[k - 1], phrases[k]
        if not rels:
            continue
        if any(_OPPOSITE[r] in rels for r in rels):
            both = " and ".join(sorted(rels))
            errors.append(f"relation: caption says {a.text} is both {both} {b.text}")
        elif "background" in (a.kind, b.kind) or any(p.count and p.count[1] == 0 for p in (a, b)):
            errors.append(f"relation: cannot check a relation between '{a.text}' and '{b.text}'")
        elif matches[k - 1] and matches[k]:  # else the missing object is already reported
            pairs = [(i, j) for i in matches[k - 1] for j in matches[k] if i != j]
            for rel in sorted(rels):
                error = _check_relation(a, b, rel, pairs, relations, objects)
                if error:
                    errors.append(error)
    if not errors and not mentioned:
        errors.append("content: caption names no object by colour and shape")
    if errors:
        return FactCheck(False, tuple(errors), 0.0)
    return FactCheck(True, (), len(covered) / len(objects) if objects else 0.0)


def load_facts(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a ``scenes_<split>.json`` written by :func:`scenes.write_dataset`."""
    data = json.loads(files.read_text(os.fspath(path)))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by image id")
    return data


def content_accuracy(
    predictions: Mapping[Any, Any], facts_by_id: Mapping[Any, Mapping[str, Any]]
) -> dict[str, Any]:
    """Fraction of scenes whose predicted caption is correct.

    ``facts_by_id`` maps image id -> facts (e.g. :func:`load_facts`).
    ``predictions`` maps image id (int or str) *or* the facts' ``file_name``
    -> caption (a string, or a sequence of tokens joined with spaces). A
    scene without a prediction counts as incorrect; predictions for unknown
    ids are ignored. Returns ``{"content_accuracy", "n", "n_correct",
    "n_missing", "mean_coverage"}`` (accuracy 0.0 when there are no scenes).
    """
    by_key = {str(k): v for k, v in predictions.items()}
    n_correct = n_missing = 0
    coverage = 0.0
    for key, facts in facts_by_id.items():
        candidates = (str(key), str(facts.get("image_id", key)), str(facts.get("file_name", "")))
        caption = next((by_key[c] for c in candidates if c in by_key), None)
        if caption is None:
            n_missing += 1
            continue
        if not isinstance(caption, str):
            caption = " ".join(str(t) for t in caption)
        verdict = check_caption(caption, facts)
        n_correct += verdict.correct
        coverage += verdict.coverage
    n = len(facts_by_id)
    return {
        "content_accuracy": n_correct / n if n else 0.0,
        "n": n,
        "n_correct": n_correct,
        "n_missing": n_missing,
        "mean_coverage": coverage / n if n else 0.0,
    }
