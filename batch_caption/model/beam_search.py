"""Batched beam search, in the graph, written against a step callback.

All images x beams advance together: one call of `step_fn` per time step on a
[batch * beam] batch, inside one `tf.while_loop`, so a whole batch is captioned by one
graph execution with no host round trips.

The search (per image, k = beam_size):
  * Each alive hypothesis proposes its own top-k next tokens (ties: lower token id first),
    giving k*k candidates, scored by their total log-prob.
  * Candidates that emit the end token (and, at the last step, every candidate: a caption
    may be cut at max_length) become finished hypotheses with
        score = logprob / length ** alpha        (length includes the end token)
    and join the k best finished ones kept so far (ties: earlier-found first).
  * The k best non-finished candidates by log-prob stay alive.
  * The search stops at max_length, or earlier once no alive hypothesis can still reach
    the n-th best finished score: log-probs only decrease, so an alive hypothesis with
    log-prob a can at best finish with a / max_length ** alpha (alpha >= 0).
With k=1 this is exactly greedy decoding (the arg-max token each step, until end). With
k >= vocabulary size it is exhaustive: every prefix is kept.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import tensorflow as tf

# step_fn(tokens: int32 [N], state: nest of [N, ...]) -> (log_probs: float32 [N, V], state)
StepFn = Callable[[tf.Tensor, Any], tuple[tf.Tensor, Any]]

_NEG_INF = float("-inf")


class BeamSearchResult(NamedTuple):
    """n-best captions per image, best first.

    tokens:   int32 [B, n, max_length] caption ids (end token included), pad_id after it.
    lengths:  int32 [B, n] tokens used, end token included (max_length if cut).
    logprobs: float32 [B, n] total log-probability of each caption.
    scores:   float32 [B, n] length-normalised score, the ranking key.
    """

    tokens: tf.Tensor
    lengths: tf.Tensor
    logprobs: tf.Tensor
    scores: tf.Tensor


def _repeats(seq, t, n: int, vocab):
    """The words that would repeat an n-gram: seq int32 [B, k, L] (tokens at positions < t
    set), t the position being chosen -> bool [B, k, vocab], True for w when seq[t-n+1 : t]
    + [w] equals seq[i : i+n] for some i + n <= t."""
    shape = tf.shape(seq)
    span = shape[2] - n + 1  # where an earlier n-gram can start
    match = tf.broadcast_to(tf.range(span) + n <= t, [shape[0], shape[1], span])
    for j in range(n - 1):  # its first n - 1 tokens equal the last n - 1 before t
        last = tf.gather(seq, tf.maximum(t - n + 1 + j, 0), axis=2)[:, :, None]
        match &= tf.equal(seq[:, :, j : j + span], last)
    rows = tf.range(shape[0] * shape[1])[:, None] * vocab + tf.reshape(seq[:, :, n - 1 :], [shape[0] * shape[1], span])
    hits = tf.math.unsorted_segment_sum(tf.reshape(tf.cast(match, tf.int32), [-1]), tf.reshape(rows, [-1]),
                                        shape[0] * shape[1] * vocab)
    return tf.reshape(hits > 0, [shape[0], shape[1], vocab])


def beam_search(
    step_fn: StepFn,
    initial_state: Any,
    *,
    start_id: int,
    end_id: int,
    beam_size: int,
    max_length: int,
    num_results: int = 1,
    alpha: float = 0.0,
    pad_id: int = 0,
    min_words: int = 0,
    shared: Any = None,
    no_repeat_ngram: int = 0,
) -> BeamSearchResult:
    """Finds the n-best token sequences for every row of `initial_state`.

    Args:
      step_fn: the model's next-token function; it sees [B*k] rows, beam-major per image
        (row b*k + j is hypothesis j of image b). It must return log-probabilities (<= 0).
      initial_state: nest of float tensors [B, ...], the decoder state before the start
        token is fed (for Show and Tell: after the image embedding).
      start_id, end_id, pad_id: special token ids.
      beam_size: k >= 1.
      max_length: maximum caption length, end token included.
      num_results: n <= k captions returned per image.
      alpha: length-normalisation exponent (>= 0).
      min_words: the end token is not allowed before this many words (1 = never an
        empty caption).
      shared: None, or a nest of bools shaped like `initial_state`: True marks an entry
        that all hypotheses of an image read and `step_fn` returns unchanged (e.g. the
        image's attention cells). Such an entry keeps its [B, ...] rows, never repeated k
        times nor reordered, so step_fn sees it beside [B*k]-row entries.
      no_repeat_ngram: n > 0 forbids a hypothesis the word that would repeat one of its
        n-grams (its last n - 1 tokens followed by that word, seen before in it); 0 = off.

    Returns:
      A `BeamSearchResult`.
    """
    if beam_size < 1 or not 1 <= num_results <= beam_size:
        raise ValueError(f"need 1 <= num_results ({num_results}) <= beam_size ({beam_size})")
    if max_length < 1 or alpha < 0:
        raise ValueError(f"need max_length >= 1 and alpha >= 0, got {max_length}, {alpha}")
    if not 0 <= no_repeat_ngram <= max_length:
        raise ValueError(f"need 0 <= no_repeat_ngram ({no_repeat_ngram}) <= max_length ({max_length})")
    k, length = beam_size, max_length
    batch = tf.shape(tf.nest.flatten(initial_state)[0])[0]
    if shared is None:
        shared = tf.nest.map_structure(lambda _: False, initial_state)
    state = tf.nest.map_structure(lambda s, fixed: s if fixed else tf.repeat(s, k, axis=0), initial_state, shared)
    positions = tf.range(length)[None, None, :]
    max_len_norm = tf.pow(tf.cast(length, tf.float32), alpha)

    def step(t, alive_seq, alive_logp, state, fin_seq, fin_logp, fin_score, fin_len):
        prev = tf.where(t > 0, tf.gather(alive_seq, tf.maximum(t - 1, 0), axis=2), start_id)
        log_probs, new_state = step_fn(tf.reshape(prev, [-1]), state)
        vocab = tf.shape(log_probs)[-1]
        log_probs = tf.reshape(log_probs, [batch, k, vocab])
        if min_words > 0:
            too_early = tf.logical_and(t < min_words, tf.equal(tf.range(vocab), end_id))
            log_probs = tf.where(too_early, _NEG_INF, log_probs)
        if no_repeat_ngram > 0:
            log_probs = tf.where(_repeats(alive_seq, t, no_repeat_ngram, vocab), _NEG_INF, log_probs)
        # Each hypothesis proposes its own top-k words: [B, k, k].
        words_logp, words = tf.math.top_k(alive_logp[:, :, None] + log_probs, k=tf.minimum(k, vocab))
        per_beam = tf.shape(words)[2]
        cand_logp = tf.reshape(words_logp, [batch, -1])  # [B, k*k'] beam-major
        cand_tok = tf.reshape(words, [batch, -1])
        cand_parent = tf.reshape(tf.repeat(tf.range(k)[None, :], per_beam, axis=1), [1, -1])
        cand_parent = tf.broadcast_to(cand_parent, tf.shape(cand_tok))
        cand_seq = tf.gather(alive_seq, cand_parent, batch_dims=1)  # [B, k*k', L]
        cand_seq = tf.where(positions == t, tf.expand_dims(cand_tok, 2), cand_seq)

        finishing = tf.logical_or(tf.equal(cand_tok, end_id), t == length - 1)
        cur_len = t + 1
        new_fin_logp = tf.where(finishing, cand_logp, _NEG_INF)
        new_fin_score = new_fin_logp / tf.pow(tf.cast(cur_len, tf.float32), alpha)
        # Keep the k best finished, old ones first so that ties keep the earlier find.
        all_score = tf.concat([fin_score, new_fin_score], axis=1)
        top_score, top_idx = tf.math.top_k(all_score, k=k)
        fin_seq = tf.gather(tf.concat([fin_seq, cand_seq], axis=1), top_idx, batch_dims=1)
        fin_logp = tf.gather(tf.concat([fin_logp, new_fin_logp], axis=1), top_idx, batch_dims=1)
        all_len = tf.concat([fin_len, tf.fill(tf.shape(cand_tok), cur_len)], axis=1)
        fin_len = tf.gather(all_len, top_idx, batch_dims=1)
        fin_score = top_score

        # The k best unfinished candidates stay alive; their parents' states follow them.
        alive_logp, alive_idx = tf.math.top_k(tf.where(finishing, _NEG_INF, cand_logp), k=k)
        alive_seq = tf.gather(cand_seq, alive_idx, batch_dims=1)
        parent = tf.gather(cand_parent, alive_idx, batch_dims=1)  # [B, k]

        def reorder(s):
            s = tf.reshape(s, tf.concat([[batch, k], tf.shape(s)[1:]], axis=0))
            s = tf.gather(s, parent, batch_dims=1)
            return tf.reshape(s, tf.concat([[batch * k], tf.shape(s)[2:]], axis=0))

        # Static shapes are lost in the reshapes; the loop needs them unchanged.
        state = tf.nest.map_structure(lambda s, old, fixed: old if fixed else tf.ensure_shape(reorder(s), old.shape),
                                      new_state, state, shared)
        return t + 1, alive_seq, alive_logp, state, fin_seq, fin_logp, fin_score, fin_len

    def not_done(t, alive_seq, alive_logp, state, fin_seq, fin_logp, fin_score, fin_len):
        best_reachable = tf.reduce_max(alive_logp, axis=1) / max_len_norm  # [B]
        nth_finished = fin_score[:, num_results - 1]
        can_improve = tf.reduce_any(best_reachable > nth_finished)
        return tf.logical_and(t < length, can_improve)

    alive_logp = tf.tile(tf.constant([[0.0] + [_NEG_INF] * (k - 1)]), [batch, 1])
    seq0 = tf.fill([batch, k, length], pad_id)
    loop_vars = (
        tf.constant(0),
        seq0,
        alive_logp,
        state,
        seq0,
        tf.fill([batch, k], _NEG_INF),
        tf.fill([batch, k], _NEG_INF),
        tf.zeros([batch, k], tf.int32),
    )
    out = tf.while_loop(not_done, step, loop_vars, maximum_iterations=length)
    _, _, _, _, fin_seq, fin_logp, fin_score, fin_len = out
    n = num_results
    return BeamSearchResult(fin_seq[:, :n], fin_len[:, :n], fin_logp[:, :n], fin_score[:, :n])
