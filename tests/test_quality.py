import pytest

from batch_caption.quality import caption_flags, has_repeated_ngram


@pytest.mark.parametrize(
    "caption, score, expected",
    [
        ("a red circle", -0.2, []),
        ("a red red circle", -0.2, ["repeated_ngram"]),
        ("a circle and a circle", -0.2, ["repeated_ngram"]),
        ("a <unk> circle", -0.2, ["unknown_word"]),
        ("a <unk> <unk>", -0.2, ["repeated_ngram", "unknown_word"]),
        ("a blue square", -2.0, ["low_score"]),
        ("a circle, a square.", -0.2, []),
    ],
)
def test_caption_flags(caption, score, expected):
    assert caption_flags(caption, score, -1.5) == expected


def test_threshold_is_the_boundary():
    assert caption_flags("a red circle", -1.5, -1.5) == []
    assert caption_flags("a red circle", -1.5001, -1.5) == ["low_score"]


def test_repeated_ngram_needs_two_words_or_a_direct_repeat():
    assert not has_repeated_ngram("a red circle and a blue square".split())
    assert has_repeated_ngram("a red circle and a red square".split())
