"""Beam search against independent references: exhaustive search, greedy, hand cases."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from batch_caption.model.beam_search import beam_search

PAD, START, END = 0, 1, 2


class TinyRnn:
    """A random 1-layer RNN over a tiny vocabulary, runnable in TF (the search) and numpy
    (the reference). Pad and start are never produced (log-prob -inf)."""

    def __init__(self, vocab=5, hidden=4, seed=0):
        rng = np.random.default_rng(seed)
        self.emb = rng.normal(size=(vocab, hidden)).astype(np.float32)
        self.rec = rng.normal(size=(hidden, hidden)).astype(np.float32)
        self.out = (2.0 * rng.normal(size=(hidden, vocab))).astype(np.float32)
        self.vocab = vocab

    def step_tf(self, tokens, h):
        h = tf.tanh(tf.gather(self.emb, tokens) + tf.matmul(h, self.rec))
        logits = tf.matmul(h, self.out)
        mask = np.zeros(self.vocab, np.float32)
        mask[[PAD, START]] = -np.inf
        return tf.nn.log_softmax(logits + mask), h

    def step_np(self, token, h):
        h = np.tanh(self.emb[token] + h @ self.rec)
        logits = (h @ self.out).astype(np.float64)
        logits[[PAD, START]] = -np.inf
        logits -= logits.max()
        return logits - np.log(np.exp(logits).sum()), h

    def sequence_logprob(self, h0, seq):
        h, total, prev = h0, 0.0, START
        for tok in seq:
            logp, h = self.step_np(prev, h)
            total += logp[tok]
            prev = tok
        return total


def exhaustive(model, h0, max_length, alpha):
    """All captions (ended by END within max_length, or cut at max_length), best first."""
    words = [t for t in range(model.vocab) if t not in (PAD, START, END)]
    seqs = []
    for n in range(1, max_length + 1):
        seqs += [p + (END,) for p in itertools.product(words, repeat=n - 1)]
    seqs += list(itertools.product(words, repeat=max_length))
    scored = []
    for s in seqs:
        lp = model.sequence_logprob(h0, s)
        scored.append((lp / len(s) ** alpha, lp, s))
    scored.sort(key=lambda x: -x[0])
    return scored


def greedy(model, h0, max_length):
    h, prev, seq, total = h0, START, [], 0.0
    for _ in range(max_length):
        logp, h = model.step_np(prev, h)
        prev = int(np.argmax(logp))
        seq.append(prev)
        total += logp[prev]
        if prev == END:
            break
    return tuple(seq), total


def run(model, h0, **kw):
    return beam_search(model.step_tf, tf.constant(h0), start_id=START, end_id=END, **kw)


def captions(result, b):
    toks, lens = result.tokens.numpy()[b], result.lengths.numpy()[b]
    return [tuple(int(x) for x in toks[i, : lens[i]]) for i in range(len(lens))]


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(alpha, seed):
    model = TinyRnn(vocab=5, seed=seed)
    h0 = np.random.default_rng(100 + seed).normal(size=(2, 4)).astype(np.float32)
    max_length = 4
    # 2 words -> at most 2**(L-1) = 8 alive prefixes: k=8 never prunes.
    result = run(model, h0, beam_size=8, max_length=max_length, num_results=8, alpha=alpha)
    for b in range(2):
        ref = exhaustive(model, h0[b], max_length, alpha)[:8]
        assert captions(result, b) == [s for _, _, s in ref]
        np.testing.assert_allclose(result.scores.numpy()[b], [sc for sc, _, _ in ref], rtol=1e-4)
        np.testing.assert_allclose(result.logprobs.numpy()[b], [lp for _, lp, _ in ref], rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_beam_of_one_is_greedy(alpha, seed):
    model = TinyRnn(vocab=7, hidden=6, seed=seed)
    h0 = np.random.default_rng(seed).normal(size=(3, 6)).astype(np.float32)
    result = run(model, h0, beam_size=1, max_length=6, alpha=alpha)
    for b in range(3):
        seq, total = greedy(model, h0[b], 6)
        assert captions(result, b) == [seq]
        np.testing.assert_allclose(result.logprobs.numpy()[b, 0], total, rtol=1e-4)


class TableModel:
    """Next-token distribution depends only on the previous token (state = one-hot of it)."""

    def __init__(self, table, vocab):
        self.logp = np.full((vocab, vocab), -np.inf, np.float32)
        for prev, dist in table.items():
            for tok, p in dist.items():
                self.logp[prev, tok] = np.log(p)

    def step_tf(self, tokens, state):
        return tf.gather(self.logp, tokens), state


def test_beam_of_two_beats_greedy_on_constructed_case():
    a, b = 3, 4
    table = {
        START: {a: 0.6, b: 0.4},
        a: {END: 0.4, a: 0.3, b: 0.3},  # greedy: a, end -> 0.24
        b: {END: 0.9, a: 0.05, b: 0.05},  # beam finds b, end -> 0.36
    }
    model = TableModel(table, vocab=5)
    state = tf.zeros([1, 1])
    kw = dict(start_id=START, end_id=END, max_length=5, alpha=0.0)
    greedy_r = beam_search(model.step_tf, state, beam_size=1, **kw)
    beam_r = beam_search(model.step_tf, state, beam_size=2, num_results=2, **kw)
    assert captions(greedy_r, 0) == [(a, END)]
    assert captions(beam_r, 0) == [(b, END), (a, END)]
    np.testing.assert_allclose(np.exp(beam_r.logprobs.numpy()[0]), [0.36, 0.24], rtol=1e-5)
    # Each hypothesis keeps 2 of its 3 next tokens (pruning), yet the beam's best is the
    # optimum of a brute force over every caption of up to 5 tokens.
    def prob(seq):
        p, prev = 1.0, START
        for tok in seq:
            p, prev = p * table[prev].get(tok, 0.0), tok
        return p
    every = [s + (END,) for n in range(5) for s in itertools.product((a, b), repeat=n)]
    every += list(itertools.product((a, b), repeat=5))
    assert max(every, key=prob) == (b, END) != captions(greedy_r, 0)[0]


def test_top_k_selection_keeps_the_most_probable_words():
    """The im2txt failure mode: the kept words must be the k most probable ones."""
    rng = np.random.default_rng(7)
    vocab = 12
    probs = rng.dirichlet(np.ones(vocab - 2))
    table = {START: {t + 2: p for t, p in enumerate(probs)}}  # END and words 3..11
    model = TableModel(table, vocab)
    # max_length=1: every first token finishes, so the n-best list is the top-k words.
    r = beam_search(model.step_tf, tf.zeros([1, 1]), start_id=START, end_id=END, beam_size=4,
                    num_results=4, max_length=1)
    expected = (np.argsort(-probs, kind="stable")[:4] + 2).tolist()
    assert [c[0] for c in captions(r, 0)] == expected
    np.testing.assert_allclose(np.exp(r.logprobs.numpy()[0]), np.sort(probs)[::-1][:4], rtol=1e-5)


def test_second_step_expands_the_surviving_beams():
    # State-independent distribution over two steps: best pairs are products of marginals.
    a, b, c = 3, 4, 5
    dist = {a: 0.5, b: 0.3, c: 0.15, END: 0.05}
    model = TableModel({START: dist, a: dist, b: dist, c: dist}, vocab=6)
    r = beam_search(model.step_tf, tf.zeros([1, 1]), start_id=START, end_id=END, beam_size=3,
                    num_results=3, max_length=2)
    # Cut at length 2: (a,a)=.25, (a,b)=(b,a)=.15; ties keep the lower beam first.
    assert captions(r, 0) == [(a, a), (a, b), (b, a)]


def test_ties_break_deterministically_toward_lower_token_ids():
    dist = {3: 0.25, 4: 0.25, 5: 0.25, END: 0.25}
    model = TableModel({START: dist, 3: dist, 4: dist, 5: dist}, vocab=6)
    r = beam_search(model.step_tf, tf.zeros([1, 1]), start_id=START, end_id=END, beam_size=3,
                    num_results=3, max_length=1)
    assert captions(r, 0) == [(END,), (3,), (4,)]


def test_batched_search_matches_each_image_alone():
    model = TinyRnn(vocab=9, hidden=8, seed=3)
    h0 = np.random.default_rng(5).normal(size=(5, 8)).astype(np.float32)
    kw = dict(beam_size=3, max_length=7, num_results=3, alpha=0.7)
    together = run(model, h0, **kw)
    for b in range(5):
        alone = run(model, h0[b : b + 1], **kw)
        assert captions(alone, 0) == captions(together, b)
        np.testing.assert_allclose(alone.scores.numpy()[0], together.scores.numpy()[b], rtol=1e-5)


def test_runs_inside_one_tf_function_with_fixed_shapes():
    model = TinyRnn(vocab=6, hidden=4, seed=4)
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def search(h0):
        traces.append(1)
        return beam_search(model.step_tf, h0, start_id=START, end_id=END, beam_size=3,
                           max_length=5, num_results=2, alpha=0.7)

    for n in (1, 4, 4, 2):
        out = search(tf.random.normal([n, 4]))
        assert out.tokens.shape == (n, 2, 5)
    assert len(traces) == 1


def test_argument_validation():
    with pytest.raises(ValueError, match="num_results"):
        beam_search(lambda t, s: (t, s), tf.zeros([1, 1]), start_id=1, end_id=2, beam_size=2,
                    num_results=3, max_length=3)


def test_min_words_forbids_an_early_end():
    dist = {END: 0.7, 3: 0.2, 4: 0.1}
    model = TableModel({START: dist, 3: dist, 4: dist}, vocab=5)
    kw = dict(start_id=START, end_id=END, beam_size=2, num_results=2, max_length=4)
    assert captions(beam_search(model.step_tf, tf.zeros([1, 1]), **kw), 0)[0] == (END,)
    r = beam_search(model.step_tf, tf.zeros([1, 1]), min_words=1, **kw)
    assert captions(r, 0) == [(3, END), (4, END)]


def reference_beam(model, h0, k, max_length, alpha, n):
    """The beam search the module docstring describes, in plain Python over model.step_np,
    always run to max_length (no early stop): each alive hypothesis proposes its k best next
    tokens, finishing ones (END, or any at max_length) join the finished, the k best others
    stay alive. Returns the n best finished as (score, logprob, tokens), best first."""
    alive = [((), 0.0, h0)]
    finished = []
    for t in range(max_length):
        candidates = []
        for seq, logp, h in alive:
            step_logp, h2 = model.step_np(seq[-1] if seq else START, h)
            for tok in sorted(range(model.vocab), key=lambda x: (-step_logp[x], x))[:k]:
                candidates.append((seq + (tok,), logp + step_logp[tok], h2))
        ending = [c for c in candidates if c[0][-1] == END or t == max_length - 1]
        finished += [(lp / len(s) ** alpha, lp, s) for s, lp, _ in ending if np.isfinite(lp)]
        alive = sorted((c for c in candidates if c not in ending), key=lambda c: -c[1])[:k]
    return sorted(finished, key=lambda f: -f[0])[:n]


class CountingSteps:
    """model.step_tf, counting the steps the search takes (the search runs eagerly here)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, tokens, h):
        self.calls += 1
        return self.model.step_tf(tokens, h)


def test_pruning_beam_matches_a_reference_beam_and_stops_early_only_when_it_may():
    """beam_size < vocabulary: prefixes are pruned, so exhaustive search is no reference;
    a plain-Python beam restricted the same way and run to max_length is."""
    max_length, k, n = 5, 2, 2
    misses_optimum = stopped_early = 0
    for seed in range(8):
        model = TinyRnn(vocab=7, hidden=4, seed=seed)  # 4 words and END: k=2 prunes
        h0 = np.random.default_rng(200 + seed).normal(size=(1, 4)).astype(np.float32)
        for alpha in (0.0, 0.7):
            steps = CountingSteps(model)
            result = beam_search(steps, tf.constant(h0), start_id=START, end_id=END, beam_size=k,
                                 max_length=max_length, num_results=n, alpha=alpha)
            ref = reference_beam(model, h0[0], k, max_length, alpha, n)
            assert captions(result, 0) == [s for _, _, s in ref], (seed, alpha)
            np.testing.assert_allclose(result.scores.numpy()[0], [sc for sc, _, _ in ref], rtol=1e-4)
            np.testing.assert_allclose(result.logprobs.numpy()[0], [lp for _, lp, _ in ref], rtol=1e-4)
            assert 1 <= steps.calls <= max_length
            stopped_early += steps.calls < max_length
            if alpha == 0.0:
                best = exhaustive(model, h0[0], max_length, alpha)[0][2]
                misses_optimum += captions(result, 0)[0] != best
    # The seeds cover both cases: a beam of 2 misses the exhaustive optimum (pruning bites),
    # and the search stops before max_length.
    assert misses_optimum and stopped_early


def test_early_stop_returns_what_running_to_max_length_returns():
    # END is likely at once: after step 1 no alive prefix (log-prob <= log 0.3) can beat the
    # finished (END,) at log 0.6, so one step is taken of 12.
    a, b, c = 3, 4, 5
    dist = {END: 0.6, a: 0.3, b: 0.07, c: 0.03}
    model = TableModel({START: dist, a: dist, b: dist, c: dist}, vocab=6)
    steps = CountingSteps(model)
    r = beam_search(steps, tf.zeros([1, 1]), start_id=START, end_id=END, beam_size=2, max_length=12)
    assert steps.calls == 1
    assert captions(r, 0) == [(END,)]
    np.testing.assert_allclose(np.exp(r.logprobs.numpy()[0]), [0.6], rtol=1e-6)
    # Two results: (a, END) at 0.18 must be found too, so the search goes on one step more.
    steps = CountingSteps(model)
    r = beam_search(steps, tf.zeros([1, 1]), start_id=START, end_id=END, beam_size=2, num_results=2, max_length=12)
    assert steps.calls == 2
    assert captions(r, 0) == [(END,), (a, END)]
    np.testing.assert_allclose(np.exp(r.logprobs.numpy()[0]), [0.6, 0.18], rtol=1e-6)


def test_a_shared_entry_stays_one_row_per_image_and_changes_nothing():
    """An image's bias on the logits, carried as a shared state entry ([B, V], never
    repeated nor reordered), gives the search's results with the bias repeated per beam."""
    model = TinyRnn(vocab=6, hidden=4, seed=3)
    h0 = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    bias = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    k = 3
    rows_seen = []

    def step(tokens, state):
        h, image_bias = state
        rows_seen.append((int(tokens.shape[0]) if tokens.shape[0] is not None else None, image_bias.shape[0]))
        log_probs, h = model.step_tf(tokens, h)
        groups = tf.shape(h)[0] // tf.shape(image_bias)[0]
        log_probs = tf.nn.log_softmax(log_probs + tf.repeat(image_bias, groups, axis=0))
        return log_probs, (h, image_bias)

    kw = dict(start_id=START, end_id=END, beam_size=k, num_results=2, max_length=5, alpha=0.7)
    shared = beam_search(step, (tf.constant(h0), tf.constant(bias)), shared=(False, True), **kw)
    tiled = beam_search(step, (tf.constant(h0), tf.constant(bias)), **kw)
    for a, b in zip(shared, tiled):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(bias_rows == 3 for _, bias_rows in rows_seen)  # the shared run saw B rows of it


def _repeats_an_ngram(seq, n):
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_no_repeat_ngram_equals_exhaustive_search_over_captions_without_repeats(n, seed):
    model = TinyRnn(vocab=6, seed=seed)
    h0 = np.random.default_rng(200 + seed).normal(size=(2, 4)).astype(np.float32)
    max_length, k = 5, 81  # 3 words: at most 3**4 = 81 alive prefixes, so the beam never prunes
    result = run(model, h0, beam_size=k, max_length=max_length, num_results=8, alpha=0.7, no_repeat_ngram=n)
    for b in range(2):
        ref = [r for r in exhaustive(model, h0[b], max_length, 0.7) if not _repeats_an_ngram(r[2], n)][:8]
        got = [c for c, s in zip(captions(result, b), result.scores.numpy()[b]) if np.isfinite(s)]
        assert got == [s for _, _, s in ref][: len(got)] and len(got) == min(8, len(ref))
        np.testing.assert_allclose(result.scores.numpy()[b][: len(got)], [sc for sc, _, _ in ref][: len(got)],
                                   rtol=1e-4)
    # Off, some of the 8 best captions do repeat: the option is what removes them.
    plain = run(model, h0, beam_size=k, max_length=max_length, num_results=8, alpha=0.7)
    assert any(_repeats_an_ngram(c, n) for b in range(2) for c in captions(plain, b))
