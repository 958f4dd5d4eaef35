import hashlib
import json
import os
import re
import shutil

import pytest
from helpers import varied_images

from batch_caption.model import bundle as B
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig
from batch_caption.model.load import load_bundle

DECODE = DecodeConfig(beam_size=3, max_length=8, num_alternatives=2)


def _images():
    return varied_images(5, 64, seed=11)


def _texts(captioner):
    return [[(c.text, round(c.score, 4)) for c in row] for row in captioner.caption(_images())]


def test_local_round_trip_gives_identical_captions_and_id(tiny_model, tiny_vocab, tmp_path):
    bundle_id = B.save_bundle(tiny_model, tiny_vocab, str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == sorted(B.CONTENT_FILES + (B.MANIFEST,))
    loaded = load_bundle(str(tmp_path / "b"))
    assert loaded.bundle_id == bundle_id and loaded.config == tiny_model.config
    assert _texts(Captioner(loaded.model, loaded.vocabulary, DECODE)) == _texts(Captioner(tiny_model, tiny_vocab, DECODE))
    # Saving the loaded model again reproduces the id (the id is content, not history).
    assert B.save_bundle(loaded.model, loaded.vocabulary, str(tmp_path / "again")) == bundle_id


def test_every_step_model_round_trips_and_its_beams_agree_alone_and_batched(every_step_model, tiny_vocab, tmp_path):
    model = every_step_model
    B.save_bundle(model, tiny_vocab, str(tmp_path / "b"))
    loaded = load_bundle(str(tmp_path / "b"))
    assert loaded.config.image_input == "every_step"
    captioner = Captioner(loaded.model, loaded.vocabulary, DECODE)
    batched = _texts(captioner)
    assert batched == _texts(Captioner(model, tiny_vocab, DECODE))
    assert len({row[0][0] for row in batched}) > 1, "the images should get different captions"
    # The image embedding rides in the beam state: each image alone gets its batched beams.
    images = _images()
    for i, row in enumerate(batched):
        alone = captioner.caption(images[i : i + 1])[0]
        assert [c.text for c in alone] == [t for t, _ in row]


def test_gcs_round_trip_through_filesystems(tiny_model, tiny_vocab, tmp_path, gcs_emulator):
    path = f"gs://{gcs_emulator}/models/tiny"
    bundle_id = B.save_bundle(tiny_model, tiny_vocab, path)
    loaded = load_bundle(path)
    assert loaded.bundle_id == bundle_id
    assert _texts(Captioner(loaded.model, loaded.vocabulary, DECODE)) == _texts(Captioner(tiny_model, tiny_vocab, DECODE))
    assert B.save_bundle(tiny_model, tiny_vocab, str(tmp_path / "local")) == bundle_id


def test_different_weights_give_a_different_id(tiny_model, tiny_vocab, tmp_path):
    from batch_caption.model.show_and_tell import ShowAndTell

    other = ShowAndTell(tiny_model.config)
    other.build_all()
    assert B.save_bundle(other, tiny_vocab, str(tmp_path / "o")) != B.save_bundle(tiny_model, tiny_vocab, str(tmp_path / "t"))


@pytest.mark.parametrize("name", B.CONTENT_FILES + (B.MANIFEST,))
def test_missing_file_is_named(tiny_bundle, tmp_path, name):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle, path)
    os.remove(os.path.join(path, name))
    with pytest.raises(B.BundleError, match=f"{name}.*cannot be read"):
        load_bundle(path)


@pytest.mark.parametrize("name", B.CONTENT_FILES)
def test_corrupted_file_is_named(tiny_bundle, tmp_path, name):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle, path)
    target = os.path.join(path, name)
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    with pytest.raises(B.BundleError, match=f"{name} is corrupted"):
        load_bundle(path)


@pytest.fixture(scope="module")
def other_weights(tiny_model, tiny_vocab, tmp_path_factory):
    """A model.weights.h5 of tiny_model's architecture with other values."""
    from batch_caption.model.show_and_tell import ShowAndTell

    other = ShowAndTell(tiny_model.config)
    other.build_all()
    path = tmp_path_factory.mktemp("other")
    B.save_bundle(other, tiny_vocab, str(path))
    return str(path / B.WEIGHTS)


def _copy(tiny_bundle, tmp_path):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle, path)
    return path


def _relist(path, name):
    """bundle.json listing the sha256 of `name` as it is now, its bundle_id kept."""
    manifest = json.load(open(os.path.join(path, B.MANIFEST)))
    manifest["files"][name] = hashlib.sha256(open(os.path.join(path, name), "rb").read()).hexdigest()
    json.dump(manifest, open(os.path.join(path, B.MANIFEST), "w"))


def test_an_intact_bundle_verifies_with_its_recomputed_id(tiny_bundle):
    saved = json.load(open(os.path.join(tiny_bundle, B.MANIFEST)))["bundle_id"]
    manifest, config = B.verify_bundle(tiny_bundle)
    assert manifest["bundle_id"] == saved and config.image_size == 64
    assert B.read_bundle(tiny_bundle).bundle_id == saved


def test_swapped_weights_beside_the_old_manifest_are_refused_by_name(tiny_bundle, other_weights, tmp_path):
    path = _copy(tiny_bundle, tmp_path)
    shutil.copyfile(other_weights, os.path.join(path, B.WEIGHTS))
    for check in (B.verify_bundle, load_bundle):
        with pytest.raises(B.BundleError, match=re.escape(f"file {path}/{B.WEIGHTS} is corrupted or replaced")) as e:
            check(path)
        assert "\n" not in str(e.value)


def test_new_weights_under_a_stale_id_are_refused(tiny_bundle, other_weights, tmp_path):
    # bundle.json lists the new file's sha256 but keeps the id of the old weights.
    path = _copy(tiny_bundle, tmp_path)
    shutil.copyfile(other_weights, os.path.join(path, B.WEIGHTS))
    _relist(path, B.WEIGHTS)
    with pytest.raises(B.BundleError, match=re.escape(f"file {path}/{B.MANIFEST} does not fit the files it lists")):
        load_bundle(path)


def test_an_edited_config_is_refused(tiny_bundle, tmp_path):
    path = _copy(tiny_bundle, tmp_path)
    target = os.path.join(path, B.CONFIG)
    config = json.load(open(target))
    config["dropout"] = 0.5  # the same architecture: the weights would load
    json.dump(config, open(target, "w"))
    with pytest.raises(B.BundleError, match=re.escape(f"file {target} is corrupted or replaced")):
        B.verify_bundle(path)
    _relist(path, B.CONFIG)  # listed, but the id is of the other config
    with pytest.raises(B.BundleError, match=f"{B.MANIFEST} does not fit the files it lists"):
        load_bundle(path)


def test_unreadable_weights_are_named(tiny_bundle, tmp_path):
    path = _copy(tiny_bundle, tmp_path)
    target = os.path.join(path, B.WEIGHTS)
    data = open(target, "rb").read()
    open(target, "wb").write(data[: len(data) // 3])
    with pytest.raises(B.BundleError, match=re.escape(f"file {target} is corrupted (not a readable")):
        B.verify_bundle(path)


def test_invalid_manifest_is_named(tiny_bundle, tmp_path):
    path = str(tmp_path / "b")
    shutil.copytree(tiny_bundle, path)
    with open(os.path.join(path, B.MANIFEST), "w") as f:
        json.dump({"format": "something else"}, f)
    with pytest.raises(B.BundleError, match="bundle.json is invalid"):
        load_bundle(path)


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(B.BundleError, match="bundle.json cannot be read"):
        load_bundle(str(tmp_path / "nope"))


def test_vocab_size_must_match(tiny_model, tmp_path):
    from batch_caption.model.vocab import Vocabulary

    with pytest.raises(ValueError, match="vocabulary has"):
        B.save_bundle(tiny_model, Vocabulary.build(["x"]), str(tmp_path / "b"))


def test_float16_bundle_is_half_the_size_and_captions_alike(tiny_model, tiny_vocab, tmp_path):
    import h5py
    import numpy as np

    full = B.save_bundle(tiny_model, tiny_vocab, str(tmp_path / "f32"))
    half = B.save_bundle(tiny_model, tiny_vocab, str(tmp_path / "f16"), weights_dtype="float16")
    assert half != full  # other bytes, other id
    sizes = [os.path.getsize(tmp_path / d / B.WEIGHTS) for d in ("f32", "f16")]
    assert sizes[1] < 0.6 * sizes[0]
    with h5py.File(tmp_path / "f16" / B.WEIGHTS) as f:
        dtypes = set()
        f.visititems(lambda _, obj: dtypes.add(obj.dtype) if isinstance(obj, h5py.Dataset) else None)
    assert np.dtype("float16") in dtypes and np.dtype("float32") not in dtypes
    loaded = load_bundle(str(tmp_path / "f16"))
    assert loaded.bundle_id == half
    assert all(v.dtype == "float32" for v in loaded.model.weights)  # stored half, computed in float32
    for got, want in zip(loaded.model.weights, tiny_model.weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="weights_dtype"):
        B.save_bundle(tiny_model, tiny_vocab, str(tmp_path / "bad"), weights_dtype="int8")


def test_config_json_names_no_machine_path(tiny_vocab, tmp_path):
    import dataclasses

    from batch_caption.model.network import build_model

    model = build_model(dataclasses.replace(
        load_bundle_config_of_tiny(tiny_vocab), encoder_weights=str(tmp_path / "enc" / "backbone.weights.h5")),
        initial_encoder_weights=False)
    model.build_all()
    B.save_bundle(model, tiny_vocab, str(tmp_path / "b"))
    config = json.loads((tmp_path / "b" / B.CONFIG).read_text())
    assert config["encoder_weights"] == "backbone.weights.h5"
    assert str(tmp_path) not in (tmp_path / "b" / B.CONFIG).read_text()


def load_bundle_config_of_tiny(vocab):
    from batch_caption.model.config import ModelConfig

    return ModelConfig(vocab_size=len(vocab), image_size=64, embedding_size=16, lstm_units=16)
