"""The Show, Attend and Tell network (Xu et al. 2015, soft attention) in Keras 3.

    image --CNN--> features [B, L * D] = a grid of L cells of D channels --> a [B, L, D]
    h0, c0 = tanh(Dense(mean over cells of a))                       (the paper's init MLPs)
    at each step t, from the previous state h and word w:
        e     = v . tanh(W_a a + W_h h)                              [B, L]   additive attention
        alpha = softmax(e) over the L cells                           [B, L]
        z     = sigmoid(f_beta(h)) * sum_i alpha_i a_i                [B, D]   gated context
        h, c  = LSTM([emb(w) ; z], (h, c))
        logits = Dense(dropout([h ; z]))                             [B, vocab]
    or, with `deep_output` (the paper's eq. 7, fewer weights than [h ; z] -> vocab):
        logits = L_o(dropout(emb(w) + L_h h + L_z z))                [B, vocab]

Teacher forcing (`call`) and step-by-step inference (`step`) run the same `_advance`, so
they agree by construction; `call` scans it over the caption with `tf.scan`. The state
carries the cells (a and W_a a, computed once per image) beside (h, c); `shared_state`
tells the beam search that they are per image, so it keeps one copy per image while
(h, c) hold a row per hypothesis, and `_attend` groups the hypotheses by image.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from batch_caption.model import vocab as V
from batch_caption.model.config import ModelConfig
from batch_caption.model.encoder import build_backbone
from batch_caption.model.show_and_tell import forbidden_logits


class AttendAndTell(keras.Model):
    """CNN encoder + attention LSTM decoder; the interface of `ShowAndTell`.

    Inputs of `call`: a dict with "tokens" int32 [B, T] (<start> w1 .. wn, then <pad>)
    and either "images" uint8 [B, S, S, 3] or precomputed "features" float32 [B, L * D].
    Output: logits float32 [B, T, vocab_size]; position t predicts token t+1.
    """

    def __init__(self, config: ModelConfig, initial_encoder_weights: bool = True, **kwargs):
        kwargs.setdefault("name", "attend_and_tell")  # fixed: layer paths go into the weights file
        super().__init__(**kwargs)
        self.config = config
        self.backbone = build_backbone(config, load_weights=initial_encoder_weights)
        self.cells, self.channels = self.backbone.grid_shape
        units = config.lstm_units
        self.init_h = layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = layers.Dense(units, activation="tanh", name="init_c")
        self.cell_keys = layers.Dense(config.attention_units, use_bias=False, name="attention_cells")
        self.state_keys = layers.Dense(config.attention_units, name="attention_state")
        self.attention_score = layers.Dense(1, use_bias=False, name="attention_score")
        self.context_gate = layers.Dense(1, activation="sigmoid", name="context_gate")
        self.word_embedding = layers.Embedding(config.vocab_size, config.embedding_size, name="word_embedding")
        self.lstm = layers.LSTMCell(units, name="lstm")
        self.dropout = layers.Dropout(config.dropout, name="dropout")
        self.output_projection = layers.Dense(config.vocab_size, name="output_projection")
        if config.deep_output:
            self.output_state = layers.Dense(config.embedding_size, use_bias=False, name="output_state")
            self.output_context = layers.Dense(config.embedding_size, use_bias=False, name="output_context")
        self._forbidden = forbidden_logits(config.vocab_size)

    @property
    def feature_size(self) -> int:
        return self.cells * self.channels

    def encode(self, images, training=False):
        """uint8 [B, S, S, 3] -> grid features float32 [B, L * D]."""
        return self.backbone(images, training=training)

    # --- the decoder's one step, shared by teacher forcing and inference -----------------
    # The beam search keeps the cells and their keys at one row per image (k hypotheses
    # read them): no copy of [B * k, L, D] made or reordered at every step.
    shared_state = (False, False, True, True)

    def _attend(self, h, cells, keys):
        """h [N, U], cells [M, L, D], keys [M, L, A] with N = M * g (row n of h is image
        n // g's: g = 1 in training, the beam size in the search)
        -> (context [N, D], alpha [N, L])."""
        m = tf.shape(cells)[0]
        query = tf.reshape(self.state_keys(h), [m, -1, 1, self.config.attention_units])  # [M, g, 1, A]
        energy = self.attention_score(tf.tanh(keys[:, None] + query))[..., 0]  # [M, g, L]
        alpha = tf.nn.softmax(energy, axis=-1)
        context = tf.reshape(tf.matmul(alpha, cells), [-1, self.channels])  # [M, g, D] -> [N, D]
        return self.context_gate(h) * context, tf.reshape(alpha, [-1, self.cells])

    @property
    def _output_size(self) -> int:
        """Width of what the output projection reads: E (deep output) or U + D."""
        return self.config.embedding_size if self.config.deep_output else self.config.lstm_units + self.channels

    def _advance(self, words, h, c, cells, keys):
        """One step from word embeddings [N, E] -> (h, c, output [N, `_output_size`], alpha [N, L])."""
        context, alpha = self._attend(h, cells, keys)
        words = tf.cast(words, h.dtype)
        out, (h, c) = self.lstm(tf.concat([words, context], axis=1), [h, c], training=False)
        if self.config.deep_output:
            return h, c, words + self.output_state(out) + self.output_context(context), alpha
        return h, c, tf.concat([out, context], axis=1), alpha

    def initial_state(self, features):
        """features [B, L * D] -> (h [B, U], c [B, U], cells [B, L, D], keys [B, L, A])."""
        cells = tf.reshape(features, [-1, self.cells, self.channels])
        mean = tf.reduce_mean(cells, axis=1)
        return self.init_h(mean), self.init_c(mean), cells, self.cell_keys(cells)

    def call_with_attention(self, inputs, training=False):
        """As `call`, and the attention weights: (logits [B, T, vocab], alpha [B, T, L])."""
        features = inputs["features"] if "features" in inputs else self.encode(inputs["images"], training)
        h, c, cells, keys = self.initial_state(features)
        words = self.dropout(self.word_embedding(inputs["tokens"]), training=training)  # [B, T, E]

        def scan_step(carry, w):
            h, c, _, _ = carry
            return self._advance(w, h, c, cells, keys)

        first = (h, c, tf.zeros([tf.shape(h)[0], self._output_size], h.dtype),
                 tf.zeros([tf.shape(h)[0], self.cells], h.dtype))
        _, _, outputs, alphas = tf.scan(scan_step, tf.transpose(words, [1, 0, 2]), initializer=first)
        outputs = tf.transpose(outputs, [1, 0, 2])  # [B, T, _output_size]
        logits = self.output_projection(self.dropout(outputs, training=training))
        return logits, tf.transpose(alphas, [1, 0, 2])

    def call(self, inputs, training=False):
        return self.call_with_attention(inputs, training)[0]

    def step(self, tokens, state):
        """tokens int32 [N], state as `initial_state`'s, (h, c) with N rows, (cells, keys)
        with N or N / g rows (see `_attend`) -> (log-probs [N, vocab], state)."""
        h, c, cells, keys = state
        h, c, out, _ = self._advance(self.word_embedding(tokens), h, c, cells, keys)
        logits = tf.cast(self.output_projection(out), tf.float32) + self._forbidden
        return tf.nn.log_softmax(logits), (h, c, cells, keys)

    def attention_maps(self, features, tokens):
        """The attention over the cells while a caption is said: features [B, L * D], the
        caption's ids int32 [B, T] (end token included) -> alpha float32 [B, T, L]; row t
        is where the decoder looked when it chose token t."""
        inputs = tf.concat([tf.fill([tf.shape(tokens)[0], 1], V.START_ID), tokens[:, :-1]], axis=1)
        return self.call_with_attention({"features": features, "tokens": inputs})[1]

    def build_all(self):
        """Creates every weight (needed before loading weights), without running the network."""
        u, d, e, a = self.config.lstm_units, self.channels, self.config.embedding_size, self.config.attention_units
        with keras.name_scope(self.name, caller=self):
            for layer in (self.init_h, self.init_c, self.cell_keys):
                layer.build((None, d))
            self.state_keys.build((None, u))
            self.attention_score.build((None, None, a))
            self.context_gate.build((None, u))
            self.word_embedding.build((None, None))
            self.lstm.build((None, e + d))
            self.output_projection.build((None, self._output_size))
            if self.config.deep_output:
                self.output_state.build((None, u))
                self.output_context.build((None, d))
        self.built = True


def attention_penalty(alphas, targets):
    """The doubly stochastic penalty (Xu et al. 2015, eq. 14) before its weight lambda:
    sum over captions and cells of (1 - total attention the cell got over the caption)²,
    counting real tokens only; pushes the decoder to look at every cell at some point.

    alphas [B, T, L] (`call_with_attention`), targets int32 [B, T] (<pad> after the end)
    -> float32 [], a sum (normalised by the trainer like the token loss).
    """
    mask = tf.cast(tf.not_equal(targets, V.PAD_ID), tf.float32)[:, :, None]
    totals = tf.reduce_sum(tf.cast(alphas, tf.float32) * mask, axis=1)  # [B, L]
    return tf.reduce_sum(tf.square(1.0 - totals))
