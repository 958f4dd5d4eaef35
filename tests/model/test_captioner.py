import numpy as np
import pytest
from helpers import varied_images

from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig


def _images(n, seed=0):
    return varied_images(n, 64, seed)


@pytest.fixture(scope="module")
def captioner(tiny_model, tiny_vocab):
    return Captioner(tiny_model, tiny_vocab, DecodeConfig(beam_size=3, max_length=8, num_alternatives=3))


def test_n_best_captions_are_ranked_and_consistent(captioner, tiny_vocab):
    rows = captioner.caption(_images(6))
    assert len(rows) == 6
    assert len({row[0].text for row in rows}) > 1, "fixture model should not say the same thing for all"
    for row in rows:
        assert len(row) == 3
        scores = [c.score for c in row]
        assert scores == sorted(scores, reverse=True)
        for c in row:
            assert c.text == tiny_vocab.decode(c.tokens)
            n = len(c.tokens) + 1  # + end token (cut captions aside)
            if n <= 8:
                assert c.score == pytest.approx(c.logprob / n**0.7, rel=1e-5)


def test_an_image_gets_the_same_captions_alone_and_in_a_batch(captioner):
    images = _images(7, seed=3)
    together = captioner.caption(images)
    for i in range(7):
        alone = captioner.caption(images[i : i + 1])[0]
        assert [c.text for c in alone] == [c.text for c in together[i]]
        np.testing.assert_allclose([c.score for c in alone], [c.score for c in together[i]], rtol=1e-4)


def test_search_is_traced_once_for_any_batch_size(captioner):
    for n in (1, 5, 2, 8):
        captioner.search(_images(n))
    assert captioner._search.experimental_get_tracing_count() == 1


def test_greedy_is_a_beam_of_one(captioner):
    greedy = captioner.with_decode(DecodeConfig(beam_size=1, num_alternatives=1, max_length=8))
    rows = greedy.caption(_images(4))
    assert all(len(r) == 1 for r in rows)


def test_rejects_wrong_image_shape_or_dtype(captioner):
    with pytest.raises(ValueError, match="uint8"):
        captioner.search(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="64, 64, 3"):
        captioner.search(np.zeros((1, 32, 32, 3), np.uint8))


def test_warm_up_traces_once_and_every_batch_reuses_that_trace(tiny_model, tiny_vocab):
    fresh = Captioner(tiny_model, tiny_vocab, DecodeConfig(beam_size=3, max_length=8, num_alternatives=3))
    fresh.warm_up()
    assert fresh._search.experimental_get_tracing_count() == 1
    images = _images(5, seed=9)
    warmed = fresh.caption(images)
    assert fresh._search.experimental_get_tracing_count() == 1
    cold = Captioner(tiny_model, tiny_vocab, fresh.decode).caption(images)  # no warm-up
    assert [[c.text for c in row] for row in warmed] == [[c.text for c in row] for row in cold]
