"""Tests for batch_caption.data.scenes: validation, determinism, splits, captions, files."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from batch_caption.data.scenes import (
    COLOUR_RGB,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SPLIT_ID_STRIDE,
    SPLITS,
    Background,
    Scene,
    SceneConfig,
    SceneObject,
    caption_candidates,
    generate_scenes,
    is_held_out,
    reference_captions,
    render_scene,
    write_dataset,
)

RELATION_WORDS = ("left of", "right of", "above", "below", "under")


def _image_digest(scene: Scene, config: SceneConfig | None = None) -> str:
    return hashlib.sha256(render_scene(scene, config).tobytes()).hexdigest()


def _two_object_scene(split: str = "train") -> Scene:
    """Large red circle top-left, small orange square bottom-right, on dark grey."""
    return Scene(
        id=7,
        split=split,
        image_size=128,
        objects=(
            SceneObject("circle", "red", "large", (23.0, 23.0), 16.0),
            SceneObject("square", "orange", "small", (105.0, 105.0), 8.0),
        ),
        background=Background("dark grey"),
    )


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 16},
        {"image_size": 128.0},
        {"min_objects": 0},
        {"min_objects": 3, "max_objects": 2},
        {"max_objects": 5},
        {"small_radius": (0.1, 0.12)},  # overlaps the large range
        {"large_radius": (0.2, 0.2)},  # neighbours would touch
        {"position_jitter": 0.1},
        {"supersample": 0},
        {"captions_per_image": 7},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SceneConfig(**kwargs)


def test_config_defaults():
    config = SceneConfig()
    assert config.image_size == 128 and config.max_objects == 3
    lo, hi = config.radius_range("large")
    assert lo >= 1.5 * config.radius_range("small")[1] and hi < 128


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": "hexagon"},
        {"colour": "pink"},
        {"size": "medium"},
        {"radius": 0.0},
        {"center": (1.0,)},
        {"rotation": 30.0},
        {"rgb": (0, 0, 255)},  # not red
    ],
)
def test_object_rejects_bad_values(kwargs):
    base = {"shape": "circle", "colour": "red", "size": "large", "center": (50, 50), "radius": 10}
    with pytest.raises(ValueError):
        SceneObject(**{**base, **kwargs})


def test_square_cannot_rotate():
    with pytest.raises(ValueError, match="rotated"):
        SceneObject("square", "red", "large", (50, 50), 10, rotation=5.0)


def test_background_rejects_bad_values():
    with pytest.raises(ValueError):
        Background("pink")
    with pytest.raises(ValueError):
        Background("grey", pattern="stripes")
    with pytest.raises(ValueError):
        Background("dark grey", level=160.0)  # that is light grey


def test_scene_validation():
    bg = Background("grey")
    red = SceneObject("circle", "red", "large", (30.0, 30.0), 15.0)
    orange = SceneObject("square", "orange", "small", (40.0, 40.0), 8.0)
    orange_near = SceneObject("square", "orange", "small", (45.0, 100.0), 8.0)
    with pytest.raises(ValueError, match="overlap"):
        Scene(1, "train", 128, (red, orange), bg)
    with pytest.raises(ValueError, match="ambiguous"):
        # 15 px apart horizontally: neither aligned nor clearly left/right.
        Scene(1, "train", 128, (red, orange_near), bg)
    with pytest.raises(ValueError, match="sticks out"):
        Scene(1, "train", 128, (SceneObject("circle", "red", "large", (5.0, 60.0), 15.0),), bg)
    with pytest.raises(ValueError, match="held out"):
        Scene(1, "test", 128, (SceneObject("triangle", "red", "large", (60.0, 60.0), 15.0),), bg)
    with pytest.raises(ValueError, match="compositional"):
        Scene(1, "compositional", 128, (red,), bg)
    with pytest.raises(ValueError, match="split"):
        Scene(1, "holdout", 128, (red,), bg)
    with pytest.raises(ValueError, match="objects"):
        Scene(1, "train", 128, (), bg)


def test_facts_of_hand_built_scene():
    scene = _two_object_scene()
    facts = scene.to_facts()
    assert json.loads(json.dumps(facts)) == facts
    assert facts["count"] == 2 and facts["image_id"] == 7
    assert [(o["colour"], o["shape"], o["size"]) for o in facts["objects"]] == [
        ("red", "circle", "large"),
        ("orange", "square", "small"),
    ]
    rels = {(r["subject"], r["relation"], r["object"]) for r in facts["relations"]}
    assert rels == {(0, "left of", 1), (0, "above", 1), (1, "right of", 0), (1, "below", 0)}
    assert facts["objects"][0]["bbox"] == [7.0, 7.0, 39.0, 39.0]
    assert facts["background"]["tone"] == "dark grey" and facts["held_out"] is False


def test_aligned_objects_have_no_axis_relation():
    scene = Scene(
        1,
        "train",
        128,
        (
            SceneObject("circle", "red", "large", (64.0, 23.0), 16.0),
            SceneObject("star", "white", "small", (66.0, 105.0), 8.0),
        ),
        Background("grey"),
    )
    assert set(scene.relations()) == {(0, "above", 1), (1, "below", 0)}


# ----------------------------------------------------------------------------- generation


def test_generation_is_deterministic():
    for split in SPLITS:
        a = generate_scenes(split, 12, seed=3)
        b = generate_scenes(split, 12, seed=3)
        assert a == b
        assert [s.to_facts() for s in a] == [s.to_facts() for s in b]
        assert [reference_captions(s) for s in a] == [reference_captions(s) for s in b]
        assert [reference_captions(s, 5) for s in a] == [reference_captions(s, 5) for s in b]
        for sa, sb in zip(a[:4], b[:4]):
            assert render_scene(sa).tobytes() == render_scene(sb).tobytes()


def test_different_seed_differs():
    a = generate_scenes("train", 10, seed=0)
    b = generate_scenes("train", 10, seed=1)
    assert [s.to_facts() for s in a] != [s.to_facts() for s in b]
    assert sum(_image_digest(x) != _image_digest(y) for x, y in zip(a, b)) >= 9


def test_prefix_stability_and_ids():
    short = generate_scenes("val", 5, seed=9)
    long = generate_scenes("val", 20, seed=9)
    assert long[:5] == short
    assert [s.id for s in long] == [2 * SPLIT_ID_STRIDE + i for i in range(20)]
    assert len({s.name for s in long}) == 20


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError):
        generate_scenes("holdout", 1)
    with pytest.raises(ValueError):
        generate_scenes("train", -1)
    with pytest.raises(ValueError):
        generate_scenes("train", 1, seed=-5)


def test_splits_do_not_overlap():
    by_split = {split: generate_scenes(split, 40, seed=0) for split in SPLITS}
    ids = [s.id for scenes in by_split.values() for s in scenes]
    assert len(ids) == len(set(ids))
    digests = {split: {_image_digest(s) for s in scenes} for split, scenes in by_split.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not digests[a] & digests[b], (a, b)
    # Geometry differs too, not just ids: object layouts are never repeated.
    layouts = [
        tuple((o.center, o.radius) for o in s.objects)
        for scenes in by_split.values()
        for s in scenes
    ]
    assert len(layouts) == len(set(layouts))


def test_held_out_pairs():
    assert len(HELD_OUT_PAIRS) == 5
    assert len({c for c, _ in HELD_OUT_PAIRS}) == 5 and len({s for _, s in HELD_OUT_PAIRS}) == 5
    for split in ("train", "val", "test"):
        for scene in generate_scenes(split, 300, seed=0):
            assert not any(is_held_out(o.colour, o.shape) for o in scene.objects)
            assert not scene.to_facts()["held_out"]
    compositional = generate_scenes("compositional", 200, seed=0)
    seen = set()
    for scene in compositional:
        held = {(o.colour, o.shape) for o in scene.objects if is_held_out(o.colour, o.shape)}
        assert held and scene.to_facts()["held_out"]
        seen |= held
    assert seen == set(HELD_OUT_PAIRS)


def test_training_covers_vocabulary():
    train = generate_scenes("train", 300, seed=0)
    objects = [o for s in train for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == {"small", "large"}
    assert {len(s.objects) for s in train} == {1, 2, 3}
    assert {s.background.tone for s in train} == {"dark grey", "grey", "light grey"}
    assert {s.background.pattern for s in train} == {"plain", "gradient", "texture"}
    pairs = Counter((o.colour, o.shape) for o in objects)
    assert len(pairs) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)


def test_layout_is_unambiguous():
    for scene in generate_scenes("train", 200, seed=5):
        size = scene.image_size
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                dx = abs(a.center[0] - b.center[0])
                dy = abs(a.center[1] - b.center[1])
                assert dx <= 0.05 * size or dx >= 0.25 * size
                assert dy <= 0.05 * size or dy >= 0.25 * size
                assert dx >= 0.25 * size or dy >= 0.25 * size
        small = [o.radius for o in scene.objects if o.size == "small"]
        large = [o.radius for o in scene.objects if o.size == "large"]
        assert all(r <= 0.07 * size for r in small) and all(r >= 0.115 * size for r in large)


# ----------------------------------------------------------------------------- captions


def test_reference_captions_properties():
    for split in SPLITS:
        for scene in generate_scenes(split, 150, seed=2):
            captions = reference_captions(scene)
            assert len(captions) == 5 and len(set(captions)) == 5
            for caption in captions:
                assert caption == caption.lower() and caption == caption.strip()
                assert "  " not in caption
                named = [o for o in scene.objects if f"{o.colour} {o.shape}" in caption]
                assert named, caption
            plain, relational = caption_candidates(scene, 0)
            assert len(set(plain)) >= 6
            if len(scene.objects) > 1 and relational:
                assert any(any(w in c for w in RELATION_WORDS) for c in captions)
            if len(scene.objects) == 1:
                assert not any(any(w in c for w in RELATION_WORDS) for c in captions)


def test_relational_captions_are_common():
    multi = [s for s in generate_scenes("train", 200, seed=0) if len(s.objects) > 1]
    with_relation = [s for s in multi if caption_candidates(s, 0)[1]]
    assert len(with_relation) >= 0.9 * len(multi)


def test_caption_examples_for_hand_built_scene():
    scene = _two_object_scene()
    plain, relational = caption_candidates(scene, 0)
    assert "a large red circle and a small orange square" in plain
    assert "two shapes: a large red circle and a small orange square" in plain
    assert "there are two shapes: a red circle and an orange square" in plain
    assert "a large red circle and a small orange square on a dark grey background" in plain
    assert relational and all("red circle" in c and "orange square" in c for c in relational)
    assert len(reference_captions(scene, 0, n=6)) == 6
    with pytest.raises(ValueError):
        reference_captions(scene, 0, n=7)


def test_duplicate_objects_are_counted():
    scene = Scene(
        1,
        "train",
        128,
        (
            SceneObject("circle", "red", "large", (23.0, 23.0), 16.0),
            SceneObject("circle", "red", "large", (105.0, 23.0), 16.0),
            SceneObject("square", "white", "small", (64.0, 105.0), 8.0),
        ),
        Background("light grey"),
    )
    plain, relational = caption_candidates(scene, 0)
    assert "two large red circles and a small white square" in plain
    assert "three shapes: two large red circles and a small white square" in plain
    # Only the white square has a unique description, so no relation pair exists.
    assert relational == []
    assert not any("one red circle" in c for c in plain)


# ----------------------------------------------------------------------------- rendering


def test_render_image_content():
    scene = _two_object_scene()
    image = render_scene(scene)
    assert image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image).astype(int)
    # Object centre shows the object's colour, a far corner the dark grey.
    assert np.abs(pixels[23, 23] - np.array(COLOUR_RGB["red"])).max() <= 15
    assert np.abs(pixels[105, 105] - np.array(COLOUR_RGB["orange"])).max() <= 15
    assert np.abs(pixels[2, 126] - 62).max() <= 15
    # Anti-aliasing: the circle's rim blends into the background.
    rim = pixels[23, 5:10, 0]
    assert len(set(rim.tolist())) >= 3


def test_render_rejects_mismatched_config():
    with pytest.raises(ValueError, match="image_size"):
        render_scene(_two_object_scene(), SceneConfig(image_size=64))


def test_small_image_size_config():
    config = SceneConfig(image_size=64)
    scenes = generate_scenes("test", 20, seed=0, config=config)
    assert all(render_scene(s, config).size == (64, 64) for s in scenes[:5])


# ----------------------------------------------------------------------------- files


def test_write_dataset(tmp_path):
    counts = {"train": 4, "val": 2, "test": 2, "compositional": 3}
    config = SceneConfig(image_size=64)
    summary = write_dataset(tmp_path / "ds", counts, seed=1, config=config)
    root = tmp_path / "ds"
    assert summary["out_dir"] == str(root) and summary["image_size"] == 64
    assert summary["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS]
    image_ids, ann_ids = [], []
    for split, count in counts.items():
        info = summary["splits"][split]
        assert info["count"] == count and info["n_captions"] == 5 * count
        coco = json.loads((root / f"captions_{split}.json").read_text())
        assert set(coco) >= {"info", "images", "annotations"}
        assert len(coco["images"]) == count and len(coco["annotations"]) == 5 * count
        facts = json.loads((root / f"scenes_{split}.json").read_text())
        assert set(facts) == {str(im["id"]) for im in coco["images"]}
        for im in coco["images"]:
            assert im["file_name"] == f"images/{split}/{split}_{im['id'] % SPLIT_ID_STRIDE:07d}.png"
            assert (im["width"], im["height"]) == (64, 64)
            with Image.open(root / im["file_name"]) as img:
                img.load()
                assert img.size == (64, 64) and img.mode == "RGB"
            assert facts[str(im["id"])]["file_name"] == im["file_name"]
            assert facts[str(im["id"])]["split"] == split
        per_image = Counter(a["image_id"] for a in coco["annotations"])
        assert set(per_image) == {im["id"] for im in coco["images"]}
        assert set(per_image.values()) == {5}
        assert all(isinstance(a["caption"], str) and a["caption"] for a in coco["annotations"])
        image_ids += [im["id"] for im in coco["images"]]
        ann_ids += [a["id"] for a in coco["annotations"]]
    assert len(image_ids) == len(set(image_ids))
    assert len(ann_ids) == len(set(ann_ids))
    assert not list(root.glob("*.tmp"))


def test_write_dataset_is_reproducible(tmp_path):
    config = SceneConfig(image_size=48)
    write_dataset(tmp_path / "a", {"train": 3, "compositional": 2}, seed=4, config=config)
    write_dataset(tmp_path / "b", {"train": 3, "compositional": 2}, seed=4, config=config)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b and len(files_a) == 5 + 4
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_write_dataset_jpeg_and_bad_arguments(tmp_path):
    config = SceneConfig(image_size=48)
    summary = write_dataset(tmp_path, {"test": 2}, config=config, image_format="jpeg")
    coco = json.loads((tmp_path / "captions_test.json").read_text())
    assert all(im["file_name"].endswith(".jpg") for im in coco["images"])
    assert summary["image_format"] == "jpg"
    with Image.open(tmp_path / coco["images"][0]["file_name"]) as img:
        assert img.format == "JPEG" and img.size == (48, 48)
    with pytest.raises(ValueError):
        write_dataset(tmp_path, {"holdout": 1})
    with pytest.raises(ValueError):
        write_dataset(tmp_path, {"train": -1})
    with pytest.raises(ValueError):
        write_dataset(tmp_path, {"train": 1}, image_format="gif")
