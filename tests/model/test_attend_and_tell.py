"""The attention decoder (Show, Attend and Tell): its two paths agree, its attention is a
distribution over the grid, and the beam search, bundles and Captioner work with it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from batch_caption.model import vocab as V
from batch_caption.model.attend_and_tell import AttendAndTell, attention_penalty
from batch_caption.model.bundle import save_bundle
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig, ModelConfig
from batch_caption.model.load import load_bundle, load_captioner
from batch_caption.model.network import build_model

TOKENS = np.array([[V.START_ID, 4, 5, 6, 7], [V.START_ID, 7, 4, 0, 0]], np.int32)


def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_step_by_step_decoding_matches_teacher_forcing(attention_model):
    model = attention_model
    images = _images(2)
    logits = model({"images": images, "tokens": TOKENS}).numpy()
    expected = tf.nn.log_softmax(logits + model._forbidden.numpy()).numpy()
    state = model.initial_state(model.encode(images))
    for t in range(TOKENS.shape[1]):
        log_probs, state = model.step(tf.constant(TOKENS[:, t]), state)
        finite = np.isfinite(expected[:, t])
        assert np.array_equal(np.isfinite(log_probs.numpy()), finite)
        np.testing.assert_allclose(log_probs.numpy()[finite], expected[:, t][finite], atol=1e-5)


def test_attention_is_a_distribution_over_the_grid_cells(attention_model):
    model = attention_model
    assert (model.cells, model.channels) == (4, 128)  # small_cnn pooled 2x2
    _, alphas = model.call_with_attention({"images": _images(3, seed=2), "tokens": np.repeat(TOKENS[:1], 3, 0)})
    alphas = alphas.numpy()
    assert alphas.shape == (3, TOKENS.shape[1], 4)
    assert np.all(alphas >= 0)
    np.testing.assert_allclose(alphas.sum(axis=2), 1.0, atol=1e-5)
    assert alphas.std(axis=2).max() > 1e-3  # not uniform: the cells are told apart


def test_attention_maps_are_the_weights_the_steps_used(attention_model):
    """attention_maps(features, caption) row t == the alpha of the step that chose token t."""
    model = attention_model
    features = model.encode(_images(2, seed=4))
    caption = tf.constant(TOKENS[:, 1:])  # w1 .. wn
    maps = model.attention_maps(features, caption).numpy()
    h, c, cells, keys = model.initial_state(features)
    previous = tf.fill([2], V.START_ID)
    for t in range(caption.shape[1]):
        _, alpha = model._attend(h, cells, keys)
        np.testing.assert_allclose(maps[:, t], alpha.numpy(), atol=1e-5)
        _, (h, c, cells, keys) = model.step(previous, (h, c, cells, keys))
        previous = caption[:, t]


def test_context_depends_on_the_image_at_every_step(attention_model):
    """Same word, same LSTM state, two images: different next-word distributions."""
    model = attention_model
    h, c, cells, keys = model.initial_state(model.encode(_images(2, seed=3)))
    first, _ = model.step(tf.constant([4, 4]), (h[:1].numpy().repeat(2, 0), c[:1].numpy().repeat(2, 0), cells, keys))
    assert np.abs(np.exp(first.numpy()[0]) - np.exp(first.numpy()[1])).max() > 1e-3


def _greedy(model, features, max_length):
    state = model.initial_state(features)
    tokens, previous, total = [], tf.constant([V.START_ID]), 0.0
    for t in range(max_length):
        log_probs, state = model.step(previous, state)
        log_probs = log_probs.numpy()[0]
        if t == 0:
            log_probs[V.END_ID] = -np.inf  # the Captioner never returns an empty caption
        token = int(np.argmax(log_probs))
        total += log_probs[token]
        tokens.append(token)
        if token == V.END_ID:
            break
        previous = tf.constant([token])
    return tuple(t for t in tokens if t != V.END_ID), total


def test_beam_of_one_is_greedy(attention_model, tiny_vocab):
    decode = DecodeConfig(beam_size=1, num_alternatives=1, max_length=12, length_normalization=0.0)
    images = _images(3, seed=5)
    captions = Captioner(attention_model, tiny_vocab, decode).caption(images)
    for b in range(3):
        tokens, total = _greedy(attention_model, attention_model.encode(images[b : b + 1]), 12)
        assert captions[b][0].tokens == tokens
        assert captions[b][0].logprob == pytest.approx(total, rel=1e-4)


def test_an_image_gets_the_same_captions_alone_and_in_a_batch(attention_model, tiny_vocab):
    captioner = Captioner(attention_model, tiny_vocab, DecodeConfig(beam_size=3, num_alternatives=3))
    images = _images(4, seed=7)
    together = captioner.caption(images)
    assert len({row[0].text for row in together}) > 1  # the images get different captions
    for b in range(4):
        alone = captioner.caption(images[b : b + 1])[0]
        assert [c.tokens for c in alone] == [c.tokens for c in together[b]]
        np.testing.assert_allclose([c.score for c in alone], [c.score for c in together[b]], rtol=1e-5)


def test_bundle_round_trip_gives_identical_captions(attention_model, tiny_vocab, tmp_path):
    bundle_id = save_bundle(attention_model, tiny_vocab, str(tmp_path / "b"))
    loaded = load_bundle(str(tmp_path / "b"))
    assert isinstance(loaded.model, AttendAndTell) and loaded.config == attention_model.config
    assert loaded.bundle_id == bundle_id
    images = _images(3, seed=8)
    assert (load_captioner(str(tmp_path / "b")).caption(images)
            == Captioner(attention_model, tiny_vocab).caption(images))


def test_precomputed_features_give_the_same_logits(attention_model):
    images = _images(2, seed=9)
    from_images = attention_model({"images": images, "tokens": TOKENS})
    from_features = attention_model({"features": attention_model.encode(images), "tokens": TOKENS})
    np.testing.assert_allclose(from_images.numpy(), from_features.numpy(), atol=1e-5)


def test_build_all_creates_the_variables_a_call_creates(attention_model):
    keras.utils.set_random_seed(0)
    called = build_model(attention_model.config)
    called({"images": _images(1), "tokens": TOKENS[:1]})
    shapes = lambda m: sorted((v.path, tuple(v.shape)) for v in m.weights)  # noqa: E731
    assert shapes(called) == shapes(attention_model)
    backbone = {id(v) for v in attention_model.backbone.weights}
    decoder = [v.path for v in attention_model.weights if id(v) not in backbone]
    assert decoder and all(path.startswith("attend_and_tell/") for path in decoder)


def test_penalty_is_the_doubly_stochastic_term_over_real_tokens():
    alphas = tf.constant([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]], tf.float32)  # [1, T=3, L=2]
    targets = tf.constant([[5, V.END_ID, V.PAD_ID]])  # the third position is padding
    # totals per cell over the two real steps: 1.5 and 0.5 -> (1 - 1.5)² + (1 - 0.5)²
    assert float(attention_penalty(alphas, targets)) == pytest.approx(0.5)


def test_config_validation_and_show_and_tell_configs_unchanged():
    with pytest.raises(ValueError, match="decoder must be one of show_and_tell, attention"):
        ModelConfig(vocab_size=10, decoder="transformer")
    with pytest.raises(ValueError, match="image_input applies to the show_and_tell decoder only"):
        ModelConfig(vocab_size=10, decoder="attention", image_input="every_step")
    # A Show-and-Tell config.json keeps only its own fields (and so its bundle id).
    assert "decoder" not in ModelConfig(vocab_size=10).to_dict()
    attention = ModelConfig(vocab_size=10, decoder="attention", attention_units=7)
    assert ModelConfig.from_dict(attention.to_dict()) == attention


def test_a_keras_application_keeps_its_grid_for_the_attention_decoder():
    config = ModelConfig(vocab_size=10, encoder="mobilenet_v3_small", image_size=64, decoder="attention",
                         embedding_size=8, lstm_units=8, attention_units=8)
    model = build_model(config)
    model.build_all()
    cells, channels = model.cells, model.channels
    assert cells == 4 and model.feature_size == cells * channels  # 64 px / 32 = a 2x2 map
    assert model.encode(_images(1)).shape == (1, cells * channels)


def test_captioner_returns_the_best_captions_attention_maps(attention_model, tiny_vocab):
    images = _images(3, seed=10)
    plain = Captioner(attention_model, tiny_vocab).caption(images)
    with_maps = Captioner(attention_model, tiny_vocab, attention_maps=True).caption(images)
    features = attention_model.encode(images)
    for b, (row, plain_row) in enumerate(zip(with_maps, plain)):
        best = row[0]
        assert [c.tokens for c in row] == [c.tokens for c in plain_row]  # the maps change no caption
        assert all(c.attention is None for c in row[1:])
        assert best.attention.grid == (2, 2)
        assert best.attention.words == tuple(tiny_vocab.words[i] for i in best.tokens)
        expected = attention_model.attention_maps(features[b : b + 1], tf.constant([list(best.tokens)]))[0]
        np.testing.assert_allclose(best.attention.weights, expected.numpy(), atol=1e-5)


def test_attention_maps_need_the_attention_decoder(tiny_model, tiny_vocab):
    with pytest.raises(ValueError, match="attention maps need a model with the attention decoder"):
        Captioner(tiny_model, tiny_vocab, attention_maps=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_one_step_matches_the_papers_equations_in_numpy(attention_model):
    """An independent reference: the first step written out in numpy from Xu et al.'s
    equations (init MLPs, additive attention, gated context, LSTM, output layer)."""
    model = attention_model
    features = model.encode(_images(2, seed=5)).numpy()
    tokens = np.array([V.START_ID, 5], np.int32)
    w = lambda layer: [np.asarray(x, np.float64) for x in layer.get_weights()]  # noqa: E731
    a = features.astype(np.float64).reshape(2, model.cells, model.channels)
    mean = a.mean(axis=1)
    (kh, bh), (kc, bc) = w(model.init_h), w(model.init_c)
    h, c = np.tanh(mean @ kh + bh), np.tanh(mean @ kc + bc)
    (ka,), (ks, bs), (v,), (kg, bg) = w(model.cell_keys), w(model.state_keys), w(model.attention_score), w(model.context_gate)
    energy = (np.tanh(a @ ka + (h @ ks + bs)[:, None, :]) @ v)[:, :, 0]
    alpha = np.exp(energy - energy.max(axis=1, keepdims=True))
    alpha /= alpha.sum(axis=1, keepdims=True)
    z = _sigmoid(h @ kg + bg) * (alpha[:, :, None] * a).sum(axis=1)
    (embedding,) = w(model.word_embedding)
    words = embedding[tokens]
    kernel, recurrent, bias = w(model.lstm)
    gates = np.concatenate([words, z], axis=1) @ kernel + h @ recurrent + bias
    i, f, g, o = np.split(gates, 4, axis=1)  # Keras' gate order
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    ko, bo = w(model.output_projection)
    if model.config.deep_output:
        (kl,), (kz,) = w(model.output_state), w(model.output_context)
        logits = (words + h @ kl + z @ kz) @ ko + bo
    else:
        logits = np.concatenate([h, z], axis=1) @ ko + bo
    logits = logits + model._forbidden.numpy()
    expected = logits - logits.max(axis=1, keepdims=True)
    expected = expected - np.log(np.exp(expected).sum(axis=1, keepdims=True))
    log_probs, _ = model.step(tf.constant(tokens), model.initial_state(tf.constant(features)))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(log_probs.numpy()[finite], expected[finite], atol=1e-4)


def _reference_step(model, word, h, c, cells):
    """One decoder step in numpy, written from the paper's equations (Xu et al. 2015,
    soft attention, eqs. 4-7 and 9), reading the layers' weights only:
        e_i = v . tanh(W_a a_i + W_h h + b)          alpha = softmax(e)
        z = sigmoid(f_beta(h)) * sum_i alpha_i a_i
        i, f, g, o = split(W x + U h + b), x = [E w ; z]   (Keras LSTM gate order)
        c' = f c + i g,  h' = o tanh(c')             (sigmoid gates, tanh candidate)
        logits = L_o(E w + L_h h' + L_z z)  or  L_o([h' ; z])
    word int [N], h, c [N, U], cells [N, L, D] -> (log-probs [N, V], h', c')."""
    def dense(layer, x):
        out = x @ layer.kernel.numpy()
        return out + layer.bias.numpy() if layer.use_bias else out

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    keys = dense(model.cell_keys, cells)  # [N, L, A]
    e = dense(model.attention_score, np.tanh(keys + dense(model.state_keys, h)[:, None, :]))[..., 0]
    alpha = np.exp(e - e.max(axis=1, keepdims=True))
    alpha /= alpha.sum(axis=1, keepdims=True)
    z = sigmoid(dense(model.context_gate, h)) * np.einsum("nl,nld->nd", alpha, cells)
    emb = model.word_embedding.embeddings.numpy()[word]
    x = np.concatenate([emb, z], axis=1)
    lstm = model.lstm
    gates = x @ lstm.kernel.numpy() + h @ lstm.recurrent_kernel.numpy() + lstm.bias.numpy()
    i, f, g, o = np.split(gates, 4, axis=1)
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    if model.config.deep_output:
        out = emb + dense(model.output_state, h_new) + dense(model.output_context, z)
    else:
        out = np.concatenate([h_new, z], axis=1)
    logits = dense(model.output_projection, out).astype(np.float64) + model._forbidden.numpy()
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    top = finite.max(axis=1, keepdims=True)
    return finite - top - np.log(np.exp(finite - top).sum(axis=1, keepdims=True)), h_new, c_new


@pytest.mark.parametrize("beams", [1, 3], ids=["row_per_image", "beams_share_the_cells"])
def test_a_step_follows_the_papers_equations(attention_model, beams):
    """model.step against the numpy reference, with a row per image (training, sampling)
    and with k rows per image over one copy of the image's cells (the beam search's
    `shared_state` layout)."""
    model = attention_model
    h0, c0, cells, keys = (x.numpy() for x in model.initial_state(model.encode(_images(2, seed=11))))
    rng = np.random.default_rng(4)
    n = 2 * beams
    h = (h0.repeat(beams, 0) + rng.normal(0, 0.3, (n, h0.shape[1]))).astype(np.float32)
    c = (c0.repeat(beams, 0) + rng.normal(0, 0.3, (n, c0.shape[1]))).astype(np.float32)
    words = np.array([4, 5, 6, 7, 4, 6][:n], np.int32)
    got, (h_new, c_new, _, _) = model.step(tf.constant(words), (h, c, cells, keys))  # cells: 2 rows
    want, want_h, want_c = _reference_step(model, words, h, c, cells.repeat(beams, 0))
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got.numpy()), finite)
    np.testing.assert_allclose(got.numpy()[finite], want[finite], atol=1e-4)
    np.testing.assert_allclose(h_new.numpy(), want_h, atol=1e-5)
    np.testing.assert_allclose(c_new.numpy(), want_c, atol=1e-5)
