"""Encoder pretraining on synthetic scene facts (batch_caption.training.scene_encoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batch_caption.data import scenes
from batch_caption.training import scene_encoder as SE


def _facts(objects, tone="dark grey", pattern="texture", size=120):
    return {
        "image_size": size,
        "objects": [
            {"colour": c, "shape": s, "size": z, "center": list(xy)} for c, s, z, xy in objects
        ],
        "background": {"tone": tone, "pattern": pattern},
    }


def _on(y, group):
    offset, width = SE.label_layout()[group]
    return list(np.flatnonzero(y[offset : offset + width]))


def test_labels_put_each_object_in_its_grid_cell_with_its_parts():
    # Cells are row-major: (x=10, y=10) is cell 0; (x=110, y=70) is row 1, column 2 -> cell 5.
    y = SE.scene_labels(_facts([("blue", "star", "large", (10, 10)), ("white", "circle", "small", (110, 70))]))
    colour, shape, size = scenes.COLOURS, scenes.SHAPES, scenes.SIZES
    assert _on(y, "cell_occupied") == [0, 5]
    assert _on(y, "cell_colour") == [0 * 7 + colour.index("blue"), 5 * 7 + colour.index("white")]
    assert _on(y, "cell_shape") == [0 * 5 + shape.index("star"), 5 * 5 + shape.index("circle")]
    assert _on(y, "cell_size") == [0 * 2 + size.index("large"), 5 * 2 + size.index("small")]
    assert _on(y, "colours") == sorted([colour.index("blue"), colour.index("white")])
    assert _on(y, "shapes") == sorted([shape.index("star"), shape.index("circle")])
    assert _on(y, "count") == [1]
    assert _on(y, "tone") == [list(scenes.BACKGROUND_TONES).index("dark grey")]
    assert _on(y, "pattern") == [scenes.PATTERNS.index("texture")]
    assert y.sum() == 2 * 6 + 3


def test_labels_of_real_scenes_match_their_facts():
    config = scenes.SceneConfig(image_size=96, max_objects=3)
    for scene in scenes.generate_scenes("train", 30, seed=3, config=config):
        facts = scene.to_facts()
        y = SE.scene_labels(facts)
        n = len(facts["objects"])
        assert len(_on(y, "cell_occupied")) == n  # objects never share a cell
        assert _on(y, "count") == [n - 1]
        assert len(_on(y, "cell_colour")) == len(_on(y, "cell_shape")) == n


def test_group_accuracy_counts_an_image_right_only_when_every_label_is():
    labels = np.stack([SE.scene_labels(_facts([("red", "square", "large", (60, 60))]))] * 4)
    logits = np.where(labels > 0.5, 5.0, -5.0)
    assert SE.group_accuracy(labels, logits)["all"] == 1.0
    offset, _ = SE.label_layout()["tone"]
    logits[0, offset : offset + 3] = -logits[0, offset : offset + 3]  # image 0: wrong tone
    acc = SE.group_accuracy(labels, logits)
    assert acc["tone"] == acc["all"] == 0.75
    assert acc["cell_colour"] == 1.0


def test_rendered_split_is_the_prepared_datasets_pixels(tmp_path):
    config = scenes.SceneConfig(image_size=64)
    scenes.write_dataset(tmp_path, {"train": 3}, seed=5, config=config)
    from batch_caption.images import decoding as I

    pixels, labels = SE.render_split("train", 3, seed=5, image_size=64, processes=1)
    facts = json.loads((tmp_path / "scenes_train.json").read_text())
    for i, key in enumerate(sorted(facts, key=int)):
        data = (tmp_path / facts[key]["file_name"]).read_bytes()
        np.testing.assert_array_equal(I.decode_image(data, I.ImageConfig(image_size=64)).pixels, pixels[i])
        np.testing.assert_array_equal(SE.scene_labels(facts[key]), labels[i])


def test_pretraining_writes_weights_the_encoder_factory_loads(tmp_path):
    from batch_caption.model.config import ModelConfig
    from batch_caption.model.encoder import build_backbone

    out = tmp_path / "enc"
    rc = SE.main(["--output", str(out), "--image_size", "64", "--train_scenes", "16", "--val_scenes", "8",
                  "--epochs", "1", "--batch_size", "8", "--small_cnn_grid", "3"])
    assert rc == 0
    report = json.loads((out / SE.REPORT_FILE).read_text())
    assert report["train_images"] == 16 and report["val_images"] == 8 and report["small_cnn_grid"] == 3
    assert set(report["val_group_accuracy"]) == set(SE.label_layout()) | {"all"}
    config = ModelConfig(vocab_size=5, image_size=64, encoder_weights=str(out / SE.WEIGHTS_FILE))
    trained, fresh = build_backbone(config), build_backbone(config, load_weights=False)
    assert any(not np.allclose(a, b) for a, b in zip(trained.get_weights(), fresh.get_weights()))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--train_scenes", "0"], "--train_scenes must be >= 1"),
        (["--encoder", "vgg"], "invalid choice"),
        (["--small_cnn_grid", "0"], "small_cnn_grid must be in [1, 8]"),
        (["--encoder", "resnet50", "--small_cnn_grid", "3"], "only applies to small_cnn"),
    ],
)
def test_bad_flags_fail_fast_in_one_line(tmp_path, capsys, argv, message):
    assert SE.main(["--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()
