"""The Show-and-Tell network (Vinyals et al. 2015) in Keras 3.

    image --CNN--> features [B, F] --Dense--> image embedding [B, E]
    LSTM inputs:  [image embedding, emb(<start>), emb(w1), ..., emb(wn)]
    LSTM outputs after <start>, w1, ..., wn predict w1, ..., wn, <end>.

With `image_input="first"` (Show and Tell) the image is the LSTM's first input only; the
output at that position is not scored. With "every_step" the LSTM inputs are instead
[emb(<start>) ; image embedding], [emb(w1) ; image embedding], ... ([B, T, 2E]): the
image is seen at every step and the LSTM starts from a zero state.
Training uses teacher forcing over whole sequences (`call`); inference advances one
token at a time (`step`) with the same LSTM weights, driven by the beam search.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from batch_caption.model import vocab as V
from batch_caption.model.config import ModelConfig
from batch_caption.model.encoder import build_backbone


class ShowAndTell(keras.Model):
    """CNN encoder + LSTM decoder.

    Inputs of `call`: a dict with "tokens" int32 [B, T] (<start> w1 .. wn, then <pad>)
    and either "images" uint8 [B, S, S, 3] or precomputed "features" float32 [B, F].
    Output: logits float32 [B, T, vocab_size]; position t predicts token t+1.

    Args:
      config: the architecture.
      initial_encoder_weights: load `config.encoder_weights` into the backbone; False
        when trained weights of the whole model are loaded next (a bundle).
    """

    def __init__(self, config: ModelConfig, initial_encoder_weights: bool = True, **kwargs):
        # Fixed names: Keras writes them into the weights file, and auto-generated ones
        # ("dropout_3") would make the bundle id depend on process history.
        kwargs.setdefault("name", "show_and_tell")
        super().__init__(**kwargs)
        self.config = config
        self.backbone = build_backbone(config, load_weights=initial_encoder_weights)
        self.image_projection = layers.Dense(config.embedding_size, name="image_projection")
        self.word_embedding = layers.Embedding(config.vocab_size, config.embedding_size, name="word_embedding")
        # No mask on the LSTM: padding only ever follows the caption, and outputs are
        # causal, so padded positions cannot change the scored ones (and cuDNN stays on).
        self.lstm = layers.LSTM(config.lstm_units, return_sequences=True, name="lstm")
        self.dropout = layers.Dropout(config.dropout, name="dropout")
        self.output_projection = layers.Dense(config.vocab_size, name="output_projection")
        self._forbidden = forbidden_logits(config.vocab_size)

    @property
    def feature_size(self) -> int:
        return int(self.backbone.output.shape[-1])

    def encode(self, images, training=False):
        """uint8 [B, S, S, 3] -> pooled features float32 [B, F]."""
        return self.backbone(images, training=training)

    def embed_image(self, features, training=False):
        """features [B, F] -> image embedding [B, E]."""
        return self.image_projection(features)

    @property
    def image_every_step(self) -> bool:
        return self.config.image_input == "every_step"

    def call(self, inputs, training=False):
        features = inputs["features"] if "features" in inputs else self.encode(inputs["images"], training)
        image_emb = self.embed_image(features, training)[:, None, :]  # [B, 1, E]
        words = tf.cast(self.word_embedding(inputs["tokens"]), image_emb.dtype)  # [B, T, E]
        if self.image_every_step:
            image_seq = tf.broadcast_to(image_emb, tf.shape(words))
            seq = self.dropout(tf.concat([words, image_seq], axis=2), training=training)  # [B, T, 2E]
            outputs = self.lstm(seq, training=training)
        else:
            seq = self.dropout(tf.concat([image_emb, words], axis=1), training=training)  # [B, T+1, E]
            outputs = self.lstm(seq, training=training)[:, 1:]
        return self.output_projection(self.dropout(outputs, training=training))

    # --- inference, one step at a time -----------------------------------------------
    def initial_state(self, features):
        """features [B, F] -> decoder state before <start>.

        "first": (h, c) after the image input, each [B, units]. "every_step": (h, c) zeros
        and the image's share of the LSTM gates, image embedding @ kernel[E:] + bias
        [B, 4 * units]: it is the same at every step, so it is computed once here and
        carried along (the beam search reorders it with h and c) instead of multiplying
        the image embedding again at every step.
        """
        image_emb = self.embed_image(features)
        batch = tf.shape(image_emb)[0]
        zeros = tf.zeros([batch, self.config.lstm_units], image_emb.dtype)
        if self.image_every_step:
            cell = self.lstm.cell
            image_gates = tf.matmul(image_emb, cell.kernel[self.config.embedding_size:]) + cell.bias
            return zeros, zeros, image_gates
        _, (h, c) = self.lstm.cell(image_emb, [zeros, zeros], training=False)
        return h, c

    def step(self, tokens, state):
        """tokens int32 [N], state as `initial_state`'s with N rows -> (log-probs [N, vocab], state)."""
        words = self.word_embedding(tokens)
        if self.image_every_step:
            # The LSTM cell's own equations (keras LSTMCell, gates in i, f, c, o order) with
            # the input [word ; image] split: word @ kernel[:E] + the precomputed image gates.
            h, c, image_gates = state
            cell = self.lstm.cell
            z = (tf.matmul(tf.cast(words, h.dtype), cell.kernel[: self.config.embedding_size])
                 + tf.matmul(h, cell.recurrent_kernel) + image_gates)
            z_i, z_f, z_c, z_o = tf.split(z, 4, axis=1)
            c = cell.recurrent_activation(z_f) * c + cell.recurrent_activation(z_i) * cell.activation(z_c)
            out = h = cell.recurrent_activation(z_o) * cell.activation(c)
            new_state = (h, c, image_gates)
        else:
            out, (h, c) = self.lstm.cell(words, list(state), training=False)
            new_state = (h, c)
        logits = tf.cast(self.output_projection(out), tf.float32) + self._forbidden
        return tf.nn.log_softmax(logits), new_state

    def build_all(self):
        """Creates every weight (needed before loading weights), without running the network.

        Each layer is built from its input shape, as a first call would build it, so the
        job's start runs no dummy forward pass.
        """
        e = self.config.embedding_size
        # In the model's name scope, as in a call: the variables keep their paths
        # ("show_and_tell/lstm/..."), which training's weights digest hashes.
        with keras.name_scope(self.name, caller=self):
            self.image_projection.build((None, self.feature_size))
            self.word_embedding.build((None, None))
            self.lstm.build((None, None, 2 * e if self.image_every_step else e))
            self.output_projection.build((None, self.config.lstm_units))
        self.built = True


def forbidden_logits(vocab_size: int):
    """float32 [vocab_size]: -inf for <pad> and <start>, 0 elsewhere; added to the logits at
    inference, so that a decoder never produces either."""
    return tf.constant([-float("inf") if i in (V.PAD_ID, V.START_ID) else 0.0 for i in range(vocab_size)])


def caption_loss(targets, logits):
    """Masked cross-entropy over real tokens.

    targets int32 [B, T] (w1 .. wn <end>, then <pad>), logits [B, T, vocab].
    Returns (sum of token losses, number of real tokens), so that a distributed trainer
    can normalise by the global token count rather than per replica.
    """
    mask = tf.cast(tf.not_equal(targets, V.PAD_ID), tf.float32)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(losses * mask), tf.reduce_sum(mask)
