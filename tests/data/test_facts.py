"""Tests for batch_caption.data.facts: references pass, mutations and garbage fail."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from batch_caption.data.facts import FactCheck, check_caption, content_accuracy, load_facts
from batch_caption.data.scenes import (
    COLOURS,
    SHAPES,
    SPLITS,
    Scene,
    caption_candidates,
    generate_scenes,
    reference_captions,
    write_dataset,
    SceneConfig,
)

NUMBERS = ("one", "two", "three", "four")
FLIP = {"left": "right", "right": "left", "above": "below", "below": "above", "under": "above"}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    # 4 splits x 100 = 400 scenes, round-tripped through JSON like the real files.
    return [s for split in SPLITS for s in generate_scenes(split, 100, seed=11)]


def _facts(scene: Scene) -> dict:
    return json.loads(json.dumps(scene.to_facts()))


def _all_captions(scene: Scene) -> list[str]:
    out: list[str] = []
    for seed in range(3):
        plain, relational = caption_candidates(scene, seed)
        out += plain + relational
    out += reference_captions(scene)
    return list(dict.fromkeys(out))


def _unique_pairs(scene: Scene) -> bool:
    pairs = [(o.colour, o.shape) for o in scene.objects]
    return len(pairs) == len(set(pairs))


# ----------------------------------------------------------------------------- references


def test_accepts_every_reference_caption(scenes):
    checked = 0
    for scene in scenes:
        facts = _facts(scene)
        for caption in _all_captions(scene):
            verdict = check_caption(caption, facts)
            assert verdict.correct, (caption, verdict.errors, facts)
            assert verdict.errors == () and 0.0 < verdict.coverage <= 1.0
            checked += 1
    assert checked > 3000


def test_full_list_captions_cover_every_object(scenes):
    for scene in scenes[:50]:
        plain, _ = caption_candidates(scene, 0)
        assert check_caption(plain[0], _facts(scene)).coverage == 1.0


# ----------------------------------------------------------------------------- mutations


def _mutations(caption: str, scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(kind, mutated caption) pairs that are false by construction."""
    tokens = caption.split(" ")
    out = []
    present = {(o.colour, o.shape) for o in scene.objects}
    for k in range(len(tokens) - 1):
        colour = tokens[k]
        shape = tokens[k + 1].rstrip(",").removesuffix("s")
        if colour in COLOURS and shape in SHAPES:
            # Swap in a colour / shape that no object of this shape / colour has.
            colours = [c for c in COLOURS if (c, shape) not in present]
            if colours:
                new = tokens[:k] + [colours[int(rng.integers(len(colours)))]] + tokens[k + 1 :]
                out.append(("colour", " ".join(new)))
            shapes = [s for s in SHAPES if (colour, s) not in present]
            if shapes:
                plural = tokens[k + 1].rstrip(",").endswith("s")
                tail = "," if tokens[k + 1].endswith(",") else ""
                word = shapes[int(rng.integers(len(shapes)))] + ("s" if plural else "") + tail
                out.append(("shape", " ".join(tokens[: k + 1] + [word] + tokens[k + 2 :])))
    for k, tok in enumerate(tokens):
        if tok in NUMBERS:
            # Explicit numbers in references are exact, so any other number is false.
            other = [n for n in NUMBERS if n != tok and n != "one"]
            new = tokens[:k] + [other[int(rng.integers(len(other)))]] + tokens[k + 1 :]
            out.append(("count", " ".join(new)))
        if tok == "single":
            out.append(("count", " ".join(tokens[: k - 1] + ["two"] + tokens[k + 1 :])))
    if _unique_pairs(scene):
        # With unique descriptions a reversed relation is always false.
        for k, tok in enumerate(tokens):
            if tok in FLIP:
                out.append(("relation", " ".join(tokens[:k] + [FLIP[tok]] + tokens[k + 1 :])))
    return out


def test_rejects_mutated_references(scenes):
    rng = np.random.default_rng(0)
    kinds: dict[str, int] = {}
    for scene in scenes:
        facts = _facts(scene)
        for caption in _all_captions(scene):
            for kind, mutated in _mutations(caption, scene, rng):
                verdict = check_caption(mutated, facts)
                assert not verdict.correct, (kind, caption, mutated, facts)
                assert verdict.errors
                kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"colour", "shape", "count", "relation"}
    assert min(kinds.values()) > 200, kinds


def test_error_messages_name_the_problem(scenes):
    rng = np.random.default_rng(1)
    for scene in scenes[:100]:
        facts = _facts(scene)
        for caption in _all_captions(scene):
            for kind, mutated in _mutations(caption, scene, rng):
                errors = check_caption(mutated, facts).errors
                if kind in ("colour", "shape"):
                    assert any(re.match(r"(colour|shape|object|count):", e) for e in errors), errors
                else:
                    assert any(e.startswith(f"{kind}:") for e in errors), (mutated, errors)


# ----------------------------------------------------------------------------- hand-written

# Layout on a 3x3 grid, dark grey background:
#   large red circle (0) top-left, small blue square (1) middle-right,
#   small red circle (2) bottom-left (same column as 0).
HAND_FACTS = {
    "count": 3,
    "objects": [
        {"index": 0, "shape": "circle", "colour": "red", "size": "large"},
        {"index": 1, "shape": "square", "colour": "blue", "size": "small"},
        {"index": 2, "shape": "circle", "colour": "red", "size": "small"},
    ],
    "relations": [
        {"subject": 0, "relation": "left of", "object": 1},
        {"subject": 1, "relation": "right of", "object": 0},
        {"subject": 0, "relation": "above", "object": 1},
        {"subject": 1, "relation": "below", "object": 0},
        {"subject": 0, "relation": "above", "object": 2},
        {"subject": 2, "relation": "below", "object": 0},
        {"subject": 2, "relation": "left of", "object": 1},
        {"subject": 1, "relation": "right of", "object": 2},
        {"subject": 2, "relation": "below", "object": 1},
        {"subject": 1, "relation": "above", "object": 2},
    ],
    "background": {"tone": "dark grey", "pattern": "plain"},
}

HAND_CASES = [
    ("a large red circle to the left of a small blue square", True),
    ("a red circle on the left of a blue square", True),
    ("a blue square to the right of a red circle", True),
    ("a red circle above a blue square", True),  # circle 0
    ("a red circle below a blue square", True),  # circle 2
    ("a small red circle under a small blue square", True),
    ("a large red circle below a small blue square", False),
    ("a blue square to the left of a red circle", False),
    ("a large red circle on top of a small red circle", True),
    ("a small red circle on top of a large red circle", False),
    ("a red circle right of a red circle", False),  # same column
    ("two red circles and a blue square", True),
    ("three shapes: two red circles and a small blue square", True),
    ("two shapes: a red circle and a blue square", False),
    ("one red circle", False),
    ("one large red circle", True),
    ("a single small red circle and one blue square", True),
    ("three red circles", False),
    ("a green circle", False),
    ("a red triangle", False),
    ("a large blue square", False),
    ("red circles", True),
    ("blue squares", False),
    ("a red circle on a dark grey background", True),
    ("a red circle on a gray background", True),
    ("a red circle on a light grey background", False),
    ("a red circle on a blue background", False),
    ("a <unk> red circle <end>", True),
    ("<start> there is a red <unk> circle", True),
    ("a red circle and a blue <unk>", False),
    ("a red circle to the left of", False),
    ("to the left of a red circle", False),
    ("a red circle left and right of a blue square", False),
    ("a grey circle", False),
    ("a red circle is not a blue square", False),
    ("a red blue circle", False),
    ("no green stars and a red circle", True),
    ("no red circles", False),
    ("a red shape", False),  # colour without a concrete shape is no mention
    ("a circle", False),
    ("two shapes", False),
    ("", False),
    ("a", False),
    ("<unk> <unk>", False),
    ("the the the", False),
]


@pytest.mark.parametrize(("caption", "expected"), HAND_CASES)
def test_hand_written_cases(caption, expected):
    verdict = check_caption(caption, HAND_FACTS)
    assert verdict.correct is expected, verdict.errors
    assert bool(verdict.errors) is not expected


def test_hand_written_messages():
    errors = check_caption("a blue circle", HAND_FACTS).errors
    assert errors == (
        "colour: caption says blue circle, scene has large red circle, small red circle",
    )
    assert check_caption("a red star", HAND_FACTS).errors[0].startswith("shape: caption says red")
    assert check_caption("a small red square", HAND_FACTS).errors[0].startswith("colour:")
    assert check_caption("a small blue circle", HAND_FACTS).errors[0].startswith("colour:")
    assert check_caption("a small red circle", HAND_FACTS).correct
    assert check_caption("a large blue square", HAND_FACTS).errors[0].startswith("size:")
    assert check_caption("one red circle", HAND_FACTS).errors[0].startswith("count:")
    reversed_errors = check_caption("a blue square left of a red circle", HAND_FACTS).errors
    assert reversed_errors == (
        "relation: caption says a blue square left of a red circle, scene has "
        "small blue square below and right of large red circle; "
        "small blue square above and right of small red circle",
    )
    assert check_caption("", HAND_FACTS).errors == (
        "content: caption names no object by colour and shape",
    )


def test_coverage():
    assert check_caption("a large red circle", HAND_FACTS).coverage == pytest.approx(1 / 3)
    assert check_caption("two red circles and a blue square", HAND_FACTS).coverage == 1.0
    assert check_caption("a green circle", HAND_FACTS).coverage == 0.0


def test_factcheck_validation():
    with pytest.raises(ValueError):
        FactCheck(True, ("oops",))
    with pytest.raises(ValueError):
        FactCheck(False, (), 2.0)


def test_reference_scene_garbage(scenes):
    for scene in scenes[:50]:
        facts = _facts(scene)
        for caption in ("", "a", "<unk> <unk>", "there is", "on a grey background"):
            assert not check_caption(caption, facts).correct


# ----------------------------------------------------------------------------- accuracy


def test_content_accuracy_keys_and_missing(scenes):
    subset = scenes[:4]
    facts_by_id = {
        str(s.id): {**_facts(s), "file_name": f"images/{s.split}/{s.name}.png"} for s in subset
    }
    good = [reference_captions(s)[0] for s in subset]
    predictions = {
        subset[0].id: good[0],  # int key
        str(subset[1].id): good[1],  # str key
        facts_by_id[str(subset[2].id)]["file_name"]: "a",  # file name key, wrong caption
        999: "a red circle",  # unknown id: ignored
    }
    result = content_accuracy(predictions, facts_by_id)
    assert result["n"] == 4 and result["n_correct"] == 2 and result["n_missing"] == 1
    assert result["content_accuracy"] == pytest.approx(0.5)
    assert 0.0 < result["mean_coverage"] <= 0.5
    tokens = {s.id: reference_captions(s)[1].split() for s in subset}
    assert content_accuracy(tokens, facts_by_id)["content_accuracy"] == 1.0
    assert content_accuracy({}, {}) == {
        "content_accuracy": 0.0,
        "n": 0,
        "n_correct": 0,
        "n_missing": 0,
        "mean_coverage": 0.0,
    }


def test_content_accuracy_on_written_dataset(tmp_path):
    config = SceneConfig(image_size=48)
    summary = write_dataset(tmp_path, {"test": 6, "compositional": 4}, seed=2, config=config)
    for split, info in summary["splits"].items():
        facts_by_id = load_facts(info["scenes_file"])
        coco = json.loads((tmp_path / f"captions_{split}.json").read_text())
        first = {}
        for ann in coco["annotations"]:
            first.setdefault(ann["image_id"], ann["caption"])
        assert content_accuracy(first, facts_by_id)["content_accuracy"] == 1.0
        by_file = {im["file_name"]: first[im["id"]] for im in coco["images"]}
        assert content_accuracy(by_file, facts_by_id)["n_correct"] == info["count"]
        # Wrong whatever the scene: a red background never exists.
        wrong = {k: f"{v} on a red background" for k, v in first.items()}
        assert content_accuracy(wrong, facts_by_id)["n_correct"] == 0
