import pytest

from batch_caption.model import vocab as V


def test_tokenize_lowercases_and_splits_punctuation():
    assert V.tokenize("A Dog, running. It's 3!") == ["a", "dog", ",", "running", ".", "it's", "3", "!"]


def test_build_orders_by_count_then_alphabet_and_cuts_rare_words():
    v = V.Vocabulary.build(["b a a", "c b a", "d"], min_count=2)
    assert v.words == ("<pad>", "<start>", "<end>", "<unk>", "a", "b")
    assert v.encode("a b c zebra") == [4, 5, V.UNK_ID, V.UNK_ID]


def test_build_is_deterministic_whatever_the_input_order():
    caps = ["the cat sat", "a dog ran", "the dog sat", "zebra"]
    assert V.Vocabulary.build(caps) == V.Vocabulary.build(list(reversed(caps)))


def test_decode_stops_at_end_skips_pad_and_start_and_attaches_punctuation():
    v = V.Vocabulary.build(["a red circle , left ."])
    ids = [V.START_ID] + v.encode("a red circle, left.") + [V.END_ID, v.token_id("red")]
    assert v.decode(ids) == "a red circle, left."
    assert v.decode([V.PAD_ID, v.token_id("a"), 999]) == "a <unk>"


def test_encode_truncates():
    v = V.Vocabulary.build(["a b c d"])
    assert len(v.encode("a b c d", max_length=2)) == 2


def test_json_round_trip_and_validation():
    v = V.Vocabulary.build(["one two three two"])
    assert V.Vocabulary.from_json(v.to_json()) == v
    with pytest.raises(ValueError, match="format"):
        V.Vocabulary.from_json('{"words": ["a"]}')
    with pytest.raises(ValueError, match="special"):
        V.Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="min_count"):
        V.Vocabulary.build([], min_count=0)
