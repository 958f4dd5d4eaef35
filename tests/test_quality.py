import json
import os
import re
import types

import numpy as np
import pytest
import tensorflow as tf

from batch_caption import bundled, quality, records
from batch_caption.data import scenes
from batch_caption.model import vocab as V
from batch_caption.model.beam_search import beam_search
from batch_caption.model.captioner import Caption, Captioner
from batch_caption.model.config import DecodeConfig
from batch_caption.quality import caption_flags
from batch_caption.storage import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repeated(text: str) -> bool:
    return quality.has_repeated_ngram(V.tokenize(text))


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


def test_truncated_is_flagged_and_sorted_with_the_rest():
    assert caption_flags("a red circle and a", -0.2, -1.5, truncated=True) == ["truncated"]
    assert caption_flags("a <unk> and a", -9.0, -1.5, truncated=True) == ["low_score", "truncated", "unknown_word"]


@pytest.mark.parametrize("text", [
    "a red circle and a red circle",
    "a circle circle",
    "red red red",
    "a a red circle",
    "a red circle, a blue square, a red circle",
    "the blue square and the blue square",
    "a white star and and and and",
    "three shapes: a large blue square, a large blue circle and two large blue square and a large",
    "a red circle red circle",
    "a large red circle large red circle on a grey background",
])
def test_repetition_is_flagged(text):
    assert repeated(text)


@pytest.mark.parametrize("text", [
    "a small white star and a small red diamond",
    "a large red circle, a large white square and a large purple circle",
    "a small red circle and a small red star",
    "a large red circle and a small red circle",
    "a red circle, a red square and a red star",
    "a red circle is to the left of a blue square, and a green star is to the left of the blue square",
    "a red circle is above a blue square, and a green star is above the blue square",
    "two red circles and a red circle on a grey background",
])
def test_enumerations_and_back_references_are_not_repetition(text):
    assert not repeated(text)


def test_content_phrases_are_the_runs_between_function_words_and_punctuation():
    tokens = V.tokenize("a large red circle, the blue square and two stars")
    assert quality.content_phrases(tokens) == [
        (False, ("large", "red", "circle")), (True, ("blue", "square")), (False, ("stars",))]


def test_no_true_caption_of_the_synthetic_scenes_is_flagged_repeated():
    """Every template caption (the training language, up to four objects, relations
    included) is ordinary phrasing: none may look like a stutter."""
    config = scenes.SceneConfig(max_objects=4)
    checked = 0
    for split in ("train", "val"):
        for scene in scenes.generate_scenes(split, 400, seed=11, config=config):
            plain, relational = scenes.caption_candidates(scene)
            for text in plain + relational:
                assert not repeated(text), text
                checked += 1
    assert checked > 4000


# --- truncated: through a real beam search ----------------------------------------------

def _search(tiny_vocab, max_length: int):
    """Beam search over a fixed next-token table: image 0 may emit the end token only at
    the last step (so it ends exactly at the limit), image 1 never (so it is cut)."""
    n = len(tiny_vocab)
    logits = np.linspace(-1.0, -3.0, n).astype(np.float32)
    logits[[V.PAD_ID, V.START_ID]] = -np.inf

    def step(tokens, state):
        may_end, t = state[:, 0], state[:, 1]
        end_ok = tf.logical_and(may_end > 0, t >= max_length - 1)
        end_col = tf.where(end_ok, 5.0, -np.inf)[:, None]
        row = tf.broadcast_to(logits, [tf.shape(tokens)[0], n])
        row = tf.concat([row[:, : V.END_ID], end_col, row[:, V.END_ID + 1 :]], axis=1)
        return tf.nn.log_softmax(row), tf.stack([may_end, t + 1], axis=1)

    state = tf.constant([[1.0, 0.0], [0.0, 0.0]])
    return beam_search(step, state, start_id=V.START_ID, end_id=V.END_ID, pad_id=V.PAD_ID,
                       beam_size=2, max_length=max_length, num_results=1, alpha=0.7)


def test_a_caption_cut_at_the_length_limit_is_truncated_one_ending_there_is_not(tiny_model, tiny_vocab):
    result = _search(tiny_vocab, max_length=5)
    assert result.lengths.numpy().tolist() == [[5], [5]]  # both use every step
    captioner = Captioner(tiny_model, tiny_vocab, DecodeConfig(beam_size=2, max_length=5, num_alternatives=1))
    ended, cut = (row[0] for row in captioner.to_captions(type(result)(*(t.numpy() for t in result))))
    assert not ended.truncated and len(ended.tokens) == 4
    assert cut.truncated and len(cut.tokens) == 5
    assert cut.text == tiny_vocab.decode(cut.tokens)


def test_the_caption_record_flags_a_truncated_best_caption():
    example = types.SimpleNamespace(path="/x.png", width=4, height=4, format="PNG", size_bytes=10, sha256="0" * 64)

    def record(truncated):
        best = Caption("a red circle and a", (4, 5, 6, 7, 4), -1.0, -0.3, truncated)
        return records.caption_record(example, [best], model_id="m", run_id="r", decode={}, low_score_threshold=-1.5)

    assert record(True)["flags"] == ["truncated"]
    assert record(False)["flags"] == []


# --- the bundled models -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(bundled.BUNDLED))
def test_each_bundled_models_threshold_is_its_calibration(name):
    """A bundled model's low_score is what its calibration chose for the bundle shipped now
    (bench/results/low_score_<name>.json; the scenes model's: bench/low_score.py)."""
    model = bundled.BUNDLED[name]
    with open(os.path.join(REPO, "bench", "results", f"low_score_{name}.json")) as f:
        results = json.load(f)
    assert results["model"] == model.bundle_id(), f"the {name} bundle changed: calibrate it again"
    assert model.low_score == results["threshold"]
    assert bundled.low_score_threshold(model.bundle_id()) == model.low_score


def test_the_job_takes_its_models_threshold_unless_given_one(monkeypatch):
    from batch_caption import run
    from batch_caption.pipeline.config import JobConfig

    assert run.parse(["--output", "o"])[0].low_score_threshold is None  # filled in from the bundle id
    assert run.parse(["--output", "o", "--low_score_threshold", "-2"])[0].low_score_threshold == -2.0
    assert JobConfig(inputs=("x",), input_lists=(), output="o", model="m", run_id="r").low_score_threshold is None
    # A bundle of one's own gets the default model's.
    assert bundled.low_score_threshold("0123456789abcdef") == bundled.default().low_score


def _readme_sample_counts() -> dict[str, int]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `(\w+)` \|.*\| (\d+) of 8 \|$", f.read(), re.M)
    return {flag: int(n) for flag, n in rows}


def test_the_readme_says_how_often_each_flag_fires_on_the_scene_samples():
    """With the scenes model, its samples and the job's default settings: the README's
    counts hold, and no sample is cut or flagged repeated."""
    from batch_caption import run
    from batch_caption.images import decoding
    from batch_caption.model.load import load_captioner

    scenes_model = bundled.BUNDLED["scenes"]
    config = run.parse(["--output", "o", "--model", "scenes"])[0]
    captioner = load_captioner(scenes_model.path, config.decode)
    paths = scenes_model.sample_files()
    assert len(paths) == 8
    decode = decoding.ImageConfig(image_size=captioner.image_size, max_image_pixels=config.max_image_pixels,
                                draft=config.draft)
    pixels = np.stack([decoding.decode_image(files.read_bytes(p), decode).pixels for p in paths])
    best = [row[0] for row in captioner.caption(pixels)]
    flags = [caption_flags(c.text, c.score, scenes_model.low_score, c.truncated) for c in best]
    counts = {f: sum(f in fl for fl in flags) for f in quality.FLAGS}
    assert counts[quality.REPEATED_NGRAM] == 0 and counts[quality.TRUNCATED] == 0
    assert _readme_sample_counts() == counts
