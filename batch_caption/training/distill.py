"""Word-level distillation from an ensemble of trained bundles into the model being trained.

An ensemble of decoders captions better than any one of them, but costs one decoder per
member at inference and bundle size. Distillation moves (part of) that gain into a single
model of the usual size (Hinton et al. 2015; word-level knowledge distillation, Kim & Rush
2016; from an ensemble, Freitag et al. 2017): at every position t of a training caption,
the target is no longer the reference word alone but

    q_t = (1 - w) * onehot(y_t) + w * mean over teachers m of p_m(. | image, y_<t)

and the loss -sum_v q_t[v] log p(v | image, y_<t), over real tokens. The teachers run
teacher-forced on the same batch as the student (inference mode: no dropout, no gradient),
so a step costs about one extra forward pass per teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from batch_caption.model import vocab as V
from batch_caption.model.load import load_bundle
from batch_caption.model.show_and_tell import caption_loss


class Teachers:
    """The bundles at `paths`, loaded once (under the strategy's scope when one is active).

    `probs(inputs)`: the student's inputs dict ("features" float32 [B, F] or "images" uint8
    [B, S, S, 3], and "tokens" int32 [B, T]) -> the teachers' mean next-word distribution,
    float32 [B, T, vocab], with no gradient.
    """

    def __init__(self, paths: Sequence[str]):
        if not paths:
            raise ValueError("Teachers needs at least one bundle")
        self.models = [load_bundle(path).model for path in paths]

    def probs(self, inputs) -> tf.Tensor:
        each = [tf.nn.softmax(tf.cast(model(inputs, training=False), tf.float32)) for model in self.models]
        return tf.stop_gradient(tf.add_n(each) / float(len(each)))


def distillation_loss(targets, logits, teacher_probs, weight: float):
    """The cross-entropy of the student against the mixed target q (module docstring).

    targets int32 [B, T] (w1 .. wn <end>, then <pad>), logits [B, T, vocab], teacher_probs
    float32 [B, T, vocab], weight w in [0, 1]. Returns (sum of token losses, number of real
    tokens) as `caption_loss` does, which gives the reference word's term.
    """
    reference, count = caption_loss(targets, logits)
    mask = tf.cast(tf.not_equal(targets, V.PAD_ID), tf.float32)
    soft = -tf.reduce_sum(teacher_probs * tf.nn.log_softmax(tf.cast(logits, tf.float32)), axis=-1)  # [B, T]
    return (1.0 - weight) * reference + weight * tf.reduce_sum(soft * mask), count
