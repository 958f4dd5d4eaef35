"""The encoder and decoder registries: a component registered from outside the package
goes through config, network, Captioner and bundle with no edit to the package, and no
module of the package branches on a component's name."""

from __future__ import annotations

import ast
import contextlib
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from batch_caption.model import vocab as V
from batch_caption.model.attend_and_tell import AttendAndTell
from batch_caption.model.bundle import save_bundle
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DECODERS, ENCODERS, ModelConfig
from batch_caption.model.encoder import build_backbone
from batch_caption.model.load import load_bundle, load_captioner
from batch_caption.model.network import build_model
from batch_caption.model.registry import DecoderSpec, EncoderSpec
from batch_caption.model.show_and_tell import forbidden_logits

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "batch_caption"
SIZE = 32


@contextlib.contextmanager
def registered(*specs):
    """Registers encoder and decoder specs for the `with` block, then removes them."""
    done = []
    try:
        for spec in specs:
            registry = ENCODERS if isinstance(spec, EncoderSpec) else DECODERS
            done.append((registry, registry.register(spec).name))
        yield
    finally:
        for registry, name in reversed(done):
            registry.unregister(name)


def tiny_cnn(x, imagenet=False):
    """float32 [B, 32, 32, 3] in [0, 255] -> [B, 4, 4, 8]: one strided conv, one pool."""
    x = layers.Rescaling(1.0 / 255.0, name="tiny_rescale")(x)
    x = layers.Conv2D(8, 3, strides=4, padding="same", activation="relu", name="tiny_conv")(x)
    return layers.AveragePooling2D(2, name="tiny_pool")(x)


class TinyRNN(keras.Model):
    """An LSTM-free decoder over the pooled vector f [B, F]:
    h0 = tanh(W_i f); h = tanh(W [emb(w) ; h]); logits = W_o h."""

    def __init__(self, config: ModelConfig, initial_encoder_weights: bool = True, **kwargs):
        kwargs.setdefault("name", "tiny_rnn")
        super().__init__(**kwargs)
        self.config = config
        self.backbone = build_backbone(config, load_weights=initial_encoder_weights)
        self.feature_size = int(self.backbone.output.shape[-1])
        self.init_h = layers.Dense(config.lstm_units, activation="tanh", name="init_h")
        self.word_embedding = layers.Embedding(config.vocab_size, config.embedding_size, name="word_embedding")
        self.cell = layers.Dense(config.lstm_units, activation="tanh", name="cell")
        self.output_projection = layers.Dense(config.vocab_size, name="output_projection")
        self._forbidden = forbidden_logits(config.vocab_size)

    def encode(self, images, training=False):
        return self.backbone(images, training=training)

    def initial_state(self, features):
        return (self.init_h(features),)

    def _advance(self, words, h):
        return self.cell(tf.concat([tf.cast(words, h.dtype), h], axis=1))

    def call(self, inputs, training=False):
        features = inputs["features"] if "features" in inputs else self.encode(inputs["images"], training)
        words = tf.transpose(self.word_embedding(inputs["tokens"]), [1, 0, 2])  # [T, B, E]
        hs = tf.scan(lambda h, w: self._advance(w, h), words, initializer=self.init_h(features))
        return self.output_projection(tf.transpose(hs, [1, 0, 2]))

    def step(self, tokens, state):
        h = self._advance(self.word_embedding(tokens), state[0])
        return tf.nn.log_softmax(tf.cast(self.output_projection(h), tf.float32) + self._forbidden), (h,)

    def build_all(self):
        with keras.name_scope(self.name, caller=self):
            self.init_h.build((None, self.feature_size))
            self.word_embedding.build((None, None))
            self.cell.build((None, self.config.embedding_size + self.config.lstm_units))
            self.output_projection.build((None, self.config.lstm_units))
        self.built = True


class AttendAgain(AttendAndTell):
    """The attention decoder under another name, without the deep output option."""


TINY_CNN = EncoderSpec("tiny_cnn", tiny_cnn)
TINY_GRID_CNN = EncoderSpec("tiny_grid_cnn", tiny_cnn, grid_channels=8)
TINY_RNN = DecoderSpec("tiny_rnn", TinyRNN, "pooled")
ATTEND_AGAIN = DecoderSpec("attend_again", AttendAgain, "grid", attention_maps=True, options=("attention_units",))


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _built(config):
    keras.utils.set_random_seed(3)
    model = build_model(config)
    model.build_all()
    return model


def test_a_registered_encoder_and_decoder_caption_and_round_trip_a_bundle(tiny_vocab, tmp_path):
    with registered(TINY_CNN, TINY_RNN):
        config = ModelConfig(vocab_size=len(tiny_vocab), encoder="tiny_cnn", decoder="tiny_rnn", image_size=SIZE,
                             embedding_size=8, lstm_units=12, dropout=0.0)
        saved = config.to_dict()
        assert saved["decoder"] == "tiny_rnn" and "attention_units" not in saved and "deep_output" not in saved
        assert ModelConfig.from_dict(saved) == config
        model = _built(config)
        assert isinstance(model, TinyRNN)
        assert model.backbone.grid_shape == (1, 8)  # the 4x4 map, averaged for a pooled decoder

        images = _images(3)
        tokens = np.array([[V.START_ID, 4, 5], [V.START_ID, 6, 0], [V.START_ID, 7, 4]], np.int32)
        logits = model({"images": images, "tokens": tokens}).numpy()
        state = model.initial_state(model.encode(images))
        for t in range(tokens.shape[1]):  # its two paths agree, as the beam search assumes
            log_probs, state = model.step(tf.constant(tokens[:, t]), state)
            np.testing.assert_allclose(log_probs.numpy(), tf.nn.log_softmax(logits[:, t] + model._forbidden), atol=1e-5)

        captions = Captioner(model, tiny_vocab).caption(images)
        assert len(captions) == 3 and all(row and row[0].tokens for row in captions)
        with pytest.raises(ValueError, match="attention maps need a model with the attention decoder, not tiny_rnn"):
            Captioner(model, tiny_vocab, attention_maps=True)

        path = str(tmp_path / "bundle")
        bundle_id = save_bundle(model, tiny_vocab, path)
        loaded = load_bundle(path)
        assert isinstance(loaded.model, TinyRNN) and loaded.bundle_id == bundle_id and loaded.config == config
        again = load_captioner(path).caption(images)
        assert [[c.tokens for c in row] for row in again] == [[c.tokens for c in row] for row in captions]
    with pytest.raises(ValueError, match="unknown encoder 'tiny_cnn'"):
        ModelConfig(vocab_size=10, encoder="tiny_cnn")
    assert "tiny_rnn" not in DECODERS


def test_a_registered_grid_decoder_gets_attention_maps_and_the_penalty(tiny_vocab):
    from batch_caption.cli import UsageError
    from batch_caption import train

    with registered(TINY_GRID_CNN, ATTEND_AGAIN):
        config = ModelConfig(vocab_size=len(tiny_vocab), encoder="tiny_grid_cnn", small_cnn_grid=2,
                             decoder="attend_again", image_size=SIZE, embedding_size=8, lstm_units=8,
                             attention_units=6)
        assert config.to_dict()["attention_units"] == 6 and "deep_output" not in config.to_dict()
        model = _built(config)
        assert (model.cells, model.channels) == (4, 8)  # the 4x4 map pooled to small_cnn_grid 2x2
        best = Captioner(model, tiny_vocab, attention_maps=True).caption(_images(2))[0][0]
        assert best.attention.grid == (2, 2)
        np.testing.assert_allclose(np.sum(best.attention.weights, axis=1), 1.0, atol=1e-5)

        flags = ["--data", "d", "--output", "o", "--decoder", "attend_again"]
        assert train.parse([*flags, "--attention_units", "6", "--attention_penalty", "0.5"]).model.attention_units == 6
        with pytest.raises(UsageError, match="--deep_output applies to the attention decoder only"):
            train.parse([*flags, "--deep_output"])
        with pytest.raises(UsageError, match="--attention_penalty applies to --decoder attention or attend_again"):
            train.parse(["--data", "d", "--output", "o", "--attention_penalty", "0.5"])
        with pytest.raises(ValueError, match="small_cnn_grid only applies to small_cnn or tiny_grid_cnn, not resnet50"):
            ModelConfig(vocab_size=10, encoder="resnet50", small_cnn_grid=2)


def test_registered_names_are_the_flags_choices():
    from batch_caption import train

    with registered(TINY_CNN, TINY_RNN):
        args = train.build_parser().parse_args(["--data", "d", "--output", "o", "--encoder", "tiny_cnn",
                                                "--decoder", "tiny_rnn"])
        assert (args.encoder, args.decoder) == ("tiny_cnn", "tiny_rnn")
    assert list(DECODERS) == ["show_and_tell", "attention"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(features="cells"), "features must be one of grid, pooled"),
    (dict(features="pooled", attention_maps=True), "attention maps need grid features"),
    (dict(features="grid", image_inputs=("sideways",)), "image_inputs must be some of first, every_step"),
    (dict(features="grid", options=("colour",)), "unknown options colour"),
])
def test_a_decoder_spec_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecoderSpec("bad", TinyRNN, **kwargs)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="decoder 'attention' is already registered"):
        DECODERS.register(DecoderSpec("attention", TinyRNN, "pooled"))
    assert DECODERS["attention"].network == "batch_caption.model.attend_and_tell:AttendAndTell"


def test_every_entry_names_a_builder_that_exists():
    for spec in ENCODERS.values():
        assert callable(spec.load_builder()), spec.name
    for spec in DECODERS.values():
        assert issubclass(spec.load_network(), keras.Model), spec.name


def test_configs_validate_without_tensorflow():
    code = ("import sys; import batch_caption.model.config, batch_caption.training.preflight, "
            "batch_caption.prepare.config; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"


def _name_branches(tree: ast.AST) -> list[int]:
    """Lines where an `.encoder` / `.decoder` attribute is compared with a string literal
    (or a collection of them)."""

    def is_name(node):
        return isinstance(node, ast.Attribute) and node.attr in ("encoder", "decoder")

    def is_literal(node):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_literal(e) for e in node.elts)
        return isinstance(node, ast.Constant) and isinstance(node.value, str)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(is_name(o) for o in operands) and any(is_literal(o) for o in operands):
                lines.append(node.lineno)
    return sorted(lines)


def test_no_module_branches_on_an_encoder_or_decoder_name():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "registry.py":
            continue
        lines = _name_branches(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(PACKAGE))] = lines
    assert not found, f"compare names in model/registry.py only, ask an entry for a capability elsewhere: {found}"


def test_the_branch_finder_finds_branches():
    code = ('if config.decoder == "attention": pass\n'
            'x = 1 if "small_cnn" != info.encoder else 2\n'
            'y = args.decoder in ("show_and_tell", "attention")\n'
            'z = config.decoder == other.decoder or config.encoder in ENCODERS\n')
    assert _name_branches(ast.parse(code)) == [1, 2, 3]
