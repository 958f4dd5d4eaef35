import keras
import numpy as np
import pytest
import tensorflow as tf

from batch_caption.model import vocab as V
from batch_caption.model.config import ENCODERS, ModelConfig
from batch_caption.model.encoder import build_backbone
from batch_caption.model.show_and_tell import ShowAndTell, caption_loss


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("which", ["tiny_model", "every_step_model"])
def test_step_by_step_decoding_matches_teacher_forcing(which, request):
    """The inference path (initial_state + step) computes the training path's distribution."""
    tiny_model = request.getfixturevalue(which)
    images = _images(2, 64)
    tokens = np.array([[V.START_ID, 4, 5, 6], [V.START_ID, 7, 4, 0]], np.int32)
    logits = tiny_model({"images": images, "tokens": tokens}).numpy()
    forbidden = tiny_model._forbidden.numpy()
    expected = tf.nn.log_softmax(logits + forbidden).numpy()

    state = tiny_model.initial_state(tiny_model.encode(images))
    for t in range(tokens.shape[1]):
        log_probs, state = tiny_model.step(tf.constant(tokens[:, t]), state)
        np.testing.assert_allclose(log_probs.numpy(), expected[:, t], atol=1e-4)
        assert np.all(np.isneginf(log_probs.numpy()[:, [V.PAD_ID, V.START_ID]]))


def test_every_step_reads_the_image_at_every_step(every_step_model):
    """Its LSTM takes [word ; image] (2E inputs) and starts from zeros, so the image can
    change the prediction after a word as much as at <start>."""
    model = every_step_model
    assert model.lstm.cell.kernel.shape[0] == 2 * model.config.embedding_size
    features = model.encode(_images(2, 64, seed=3))
    h, c, image_gates = model.initial_state(features)
    assert not np.any(h.numpy()) and not np.any(c.numpy())
    assert image_gates.shape == (2, 4 * model.config.lstm_units)
    # Same words, same (zero) LSTM state, two images: different next-word distributions.
    zeros = tf.zeros_like(h)
    first, _ = model.step(tf.constant([4, 4]), (zeros, zeros, image_gates))
    swapped, _ = model.step(tf.constant([4, 4]), (zeros, zeros, image_gates[::-1]))
    np.testing.assert_allclose(first.numpy()[::-1], swapped.numpy(), atol=1e-5)
    probs = np.exp(first.numpy())
    assert np.abs(probs[0] - probs[1]).max() > 1e-3


def test_image_input_is_validated():
    with pytest.raises(ValueError, match="image_input must be one of first, every_step"):
        ModelConfig(vocab_size=10, image_input="sometimes")


def test_precomputed_features_give_the_same_logits(tiny_model):
    images = _images(3, 64, seed=1)
    tokens = np.array([[V.START_ID, 4, 5]] * 3, np.int32)
    from_images = tiny_model({"images": images, "tokens": tokens})
    from_features = tiny_model({"features": tiny_model.encode(images), "tokens": tokens})
    np.testing.assert_allclose(from_images.numpy(), from_features.numpy(), atol=1e-5)


def test_loss_is_masked_over_padding():
    targets = tf.constant([[4, 5, V.END_ID, 0, 0], [4, V.END_ID, 0, 0, 0]])
    logits = tf.random.stateless_normal([2, 5, 9], seed=[1, 2])
    total, count = caption_loss(targets, logits)
    assert float(count) == 5.0
    # Garbage at padded positions must not change the loss.
    noisy = tf.where(tf.equal(targets, 0)[:, :, None], logits * 100.0, logits)
    np.testing.assert_allclose(float(caption_loss(targets, noisy)[0]), float(total), rtol=1e-6)
    manual = -sum(
        tf.nn.log_softmax(logits[b, t])[targets[b, t]].numpy() for b in range(2) for t in range(5) if targets[b, t] != 0
    )
    np.testing.assert_allclose(float(total), manual, rtol=1e-5)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_takes_uint8_and_pools(encoder):
    size = 75 if encoder == "inception_v3" else 64
    config = ModelConfig(vocab_size=10, encoder=encoder, image_size=size, train_encoder=False)
    backbone = build_backbone(config)
    features = backbone(_images(2, size))
    assert features.shape[0] == 2 and features.shape.rank == 2
    assert np.all(np.isfinite(features.numpy()))
    assert not backbone.trainable


def test_encoder_weights_from_a_file(tmp_path):
    config = ModelConfig(vocab_size=10, image_size=64)
    first = build_backbone(config)
    path = str(tmp_path / "cnn.weights.h5")
    first.save_weights(path)
    second = build_backbone(ModelConfig(vocab_size=10, image_size=64, encoder_weights=path))
    images = _images(2, 64)
    np.testing.assert_allclose(first(images).numpy(), second(images).numpy(), atol=1e-6)
    with pytest.raises(Exception, match="cnn.weights.h5|No such file|cannot"):
        build_backbone(ModelConfig(vocab_size=10, image_size=64, encoder_weights=str(tmp_path / "missing.h5")))


def test_small_cnn_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="imagenet"):
        ShowAndTell(ModelConfig(vocab_size=10, encoder_weights="imagenet"))


def test_small_cnn_grid_pools_the_same_conv_weights_to_a_coarser_grid(tmp_path):
    # 96 px -> a 6x6 map after four stride-2 blocks: a 3x3 grid averages exact 2x2 blocks.
    four = build_backbone(ModelConfig(vocab_size=10, image_size=96))
    path = str(tmp_path / "cnn.weights.h5")
    four.save_weights(path)
    three = build_backbone(ModelConfig(vocab_size=10, image_size=96, small_cnn_grid=3, encoder_weights=path))
    assert four.output_shape[-1] == 16 * 128 and three.output_shape[-1] == 9 * 128
    images = _images(2, 96)
    fmap = keras.Model(three.input, three.get_layer("block3_relu").output)(images).numpy()  # [2, 6, 6, 128]
    want = fmap.reshape(2, 3, 2, 3, 2, 128).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(three(images).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["tiny_model", "every_step_model"])
def test_build_all_creates_the_variables_a_call_creates(which, request):
    """build_all (shapes only, no forward pass) must give the same variables, paths
    included, as building by a call: bundles and training's weights digest rely on them."""
    config = request.getfixturevalue(which).config
    called = ShowAndTell(config, initial_encoder_weights=False)
    s = config.image_size
    called({"images": tf.zeros([1, s, s, 3], tf.uint8), "tokens": tf.zeros([1, 2], tf.int32)})
    built = ShowAndTell(config, initial_encoder_weights=False)
    built.build_all()
    assert sorted((w.path, tuple(w.shape)) for w in built.weights) == sorted(
        (w.path, tuple(w.shape)) for w in called.weights)
