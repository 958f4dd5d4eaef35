"""The bundled models' registry (batch_caption.bundled)."""

from __future__ import annotations

import os

import pytest

import batch_caption
from batch_caption import bundled

PKG = os.path.dirname(os.path.abspath(batch_caption.__file__))


def test_every_bundled_model_is_installed_with_its_samples():
    assert bundled.DEFAULT_MODEL_NAME in bundled.BUNDLED
    for name, model in bundled.BUNDLED.items():
        assert model.name == name and model.installed(), name
        assert model.path == os.path.join(PKG, "models", name)
        assert model.sample_files() and all(os.path.dirname(p) == model.samples_dir for p in model.sample_files())
        assert len(model.bundle_id()) == 16


def test_a_model_value_names_a_bundled_model_or_a_path():
    scenes = bundled.BUNDLED["scenes"]
    for value in ("scenes", "bundled:scenes", scenes.path, os.path.relpath(scenes.path)):
        assert bundled.find(value) is scenes and bundled.resolve(value) == scenes.path
        assert bundled.portable(bundled.resolve(value)) == "bundled:scenes"
    for path in ("./scenes", "gs://b/scenes", "/models/m"):  # a path, even named like a bundled model
        assert bundled.find(path) is None and bundled.resolve(path) == path == bundled.portable(path)
    with pytest.raises(KeyError, match="no bundled model 'nope' \\(bundled: scenes"):
        bundled.resolve("bundled:nope")


def test_the_legacy_marker_and_the_threshold_follow_the_default(monkeypatch):
    """Flipping DEFAULT_MODEL_NAME moves the old "bundled:default_model" marker and the
    threshold of uncalibrated bundles with it; a named model keeps its own."""
    other = bundled.BundledModel("other", "models/scenes_copy", "samples/other", low_score=-1.25)
    monkeypatch.setitem(bundled.BUNDLED, "other", other)
    monkeypatch.setattr(bundled, "DEFAULT_MODEL_NAME", "other")
    assert bundled.resolve("bundled:default_model") == other.path
    assert bundled.low_score_threshold("0123456789abcdef") == -1.25
    scenes = bundled.BUNDLED["scenes"]
    assert bundled.low_score_threshold(scenes.bundle_id()) == scenes.low_score


@pytest.mark.parametrize("name", ["", "a/b", "bundled:x"])
def test_a_bundled_models_name_is_a_plain_word(name):
    with pytest.raises(ValueError, match="plain word"):
        bundled.BundledModel(name, "models/x", "samples/x", -1.0)
