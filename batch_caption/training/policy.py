"""The decoder as a policy: captions sampled from it, and the policy-gradient step on them.

Both run the network's own interface: sampling calls `step` (the beam search's callback,
so samples come from the distribution the search ranks), the gradient step teacher-forces
the samples through `call`. Neither uses dropout: the gradient is that of the policy that
sampled. `self_critical` drives them.
"""

from __future__ import annotations

import tensorflow as tf

from batch_caption.model import vocab as V
from batch_caption.model.network import CaptionModel
from batch_caption.model.show_and_tell import forbidden_logits


def make_sampler(model: CaptionModel, samples_per_image: int, max_tokens: int, rng: tf.random.Generator):
    """A tf.function features float32 [B, F] -> int32 [B * K, T] (T = max_tokens): K captions
    per image (rows image-major), each its words, <end>, then <pad>; a caption that reaches T
    tokens without <end> is cut there. Draws are Gumbel-max with `rng`'s uniforms, so a
    checkpointed generator makes a resumed run draw on."""
    k = samples_per_image
    no_end = tf.one_hot(V.END_ID, model.config.vocab_size, on_value=-float("inf"))

    @tf.function(input_signature=[tf.TensorSpec([None, model.feature_size], tf.float32)], autograph=False)
    def sample(features):
        state = tf.nest.map_structure(lambda s: tf.repeat(s, k, axis=0), model.initial_state(features))
        n = tf.shape(features)[0] * k
        prev, done, out = tf.fill([n], V.START_ID), tf.zeros([n], tf.bool), []
        for t in range(max_tokens):  # unrolled: T is small and fixed
            log_probs, state = model.step(prev, state)
            if t == 0:  # as the search: never an empty caption
                log_probs += no_end
            uniform = rng.uniform(tf.shape(log_probs), minval=1e-20, maxval=1.0)
            token = tf.argmax(log_probs - tf.math.log(-tf.math.log(uniform)), axis=1, output_type=tf.int32)
            token = tf.where(done, V.PAD_ID, token)
            out.append(token)
            done = tf.logical_or(done, tf.equal(token, V.END_ID))
            prev = token
        return tf.stack(out, axis=1)

    return sample


def make_policy_step(model: CaptionModel, samples_per_image: int, variables, optimizer, clip_norm: float):
    """A tf.function (features [B, F], samples int32 [B * K, T'], advantages float32 [B * K])
    -> (loss [], gradient norm []) that applies one optimizer step to `variables`:

        loss = -mean over samples of advantage * sum of the sample's token log-probs

    (tokens up to and including <end>; the <pad> after it does not count). Gradients are
    clipped to `clip_norm` (0 = off) by their global norm."""
    k = samples_per_image
    forbidden = forbidden_logits(model.config.vocab_size)

    @tf.function(input_signature=[tf.TensorSpec([None, model.feature_size], tf.float32),
                                  tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.float32)],
                 autograph=False)
    def policy_step(features, samples, advantages):
        n = tf.shape(samples)[0]
        tokens = tf.concat([tf.fill([n, 1], V.START_ID), samples[:, :-1]], axis=1)
        mask = tf.not_equal(samples, V.PAD_ID)
        targets = tf.where(mask, samples, V.END_ID)  # any real id: masked out below
        with tf.GradientTape() as tape:
            logits = model({"features": tf.repeat(features, k, axis=0), "tokens": tokens}, training=False)
            logits = tf.cast(logits, tf.float32) + forbidden  # normalised as `step` normalises
            token_logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
            sequence_logp = tf.reduce_sum(tf.where(mask, token_logp, 0.0), axis=1)
            loss = -tf.reduce_mean(advantages * sequence_logp)
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in tape.gradient(loss, variables)]
        norm = tf.linalg.global_norm(grads)
        if clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm, use_norm=norm)
        optimizer.apply(grads, variables)
        return loss, norm

    return policy_step
