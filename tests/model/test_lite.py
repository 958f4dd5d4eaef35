"""model.lite: the Captioner's graph compiled to LiteRT, cached, and run without TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from batch_caption.model import lite
from batch_caption.model.bundle import save_bundle
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig
from tests.helpers import varied_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(lite.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same_search(want, got, atol=1e-4):
    assert np.array_equal(want.tokens, got.tokens)
    assert np.array_equal(want.lengths, got.lengths)
    finite = np.isfinite(want.scores)
    assert np.array_equal(finite, np.isfinite(got.scores))
    np.testing.assert_allclose(got.scores[finite], want.scores[finite], atol=atol)
    np.testing.assert_allclose(got.logprobs[finite], want.logprobs[finite], atol=atol)


@pytest.mark.parametrize("decode", [DecodeConfig(), DecodeConfig(beam_size=4, num_alternatives=2,
                                                                 length_normalization=1.0, forbid_unknown=True,
                                                                 no_repeat_ngram=2)],
                         ids=["default", "beam4_nbest2_no_unk_no_repeat"])
def test_compiled_graph_finds_tensorflows_captions(tiny_model, attention_model, every_step_model, tiny_vocab, decode):
    images = varied_images(6)
    for model in (tiny_model, attention_model, every_step_model):
        tf_captioner = Captioner(model, tiny_vocab, decode, model_id="m")
        compiled = lite.LiteCaptioner(lite.compile_captioner(tf_captioner), tiny_vocab, "m", 64)
        _same_search(tf_captioner.search(images), compiled.search(images))
        want, got = tf_captioner.caption(images), compiled.caption(images)
        assert [[c.text for c in row] for row in got] == [[c.text for c in row] for row in want]
        assert [[c.truncated for c in row] for row in got] == [[c.truncated for c in row] for row in want]
        # Another batch size re-allocates the interpreter's tensors, and still agrees.
        _same_search(tf_captioner.search(images[:1]), compiled.search(images[:1]))


def test_a_batch_split_over_replicas_finds_what_one_interpreter_finds(attention_model, tiny_vocab):
    tf_captioner = Captioner(attention_model, tiny_vocab, DecodeConfig(beam_size=3, num_alternatives=2), model_id="m")
    data = lite.compile_captioner(tf_captioner)
    one = lite.LiteCaptioner(data, tiny_vocab, "m", 64, num_threads=1)
    three = lite.LiteCaptioner(data, tiny_vocab, "m", 64, num_threads=3)
    assert (one.replicas, three.replicas) == (1, 3)
    images = varied_images(26)  # parts of 9, 9 and 8 rows: the split is uneven
    want = one.search(images)
    assert want.tokens.shape[0] == 26
    _same_search(want, three.search(images), atol=1e-5)
    _same_search(tf_captioner.search(images), three.search(images))
    assert lite.LiteCaptioner(data, tiny_vocab, "m", 64, num_threads=2, replicas=1).replicas == 1


def test_replicas_are_safe_to_share_between_threads(tiny_model, tiny_vocab):
    from concurrent.futures import ThreadPoolExecutor

    data = lite.compile_captioner(Captioner(tiny_model, tiny_vocab))
    shared = lite.LiteCaptioner(data, tiny_vocab, "m", 64, num_threads=2)
    batches = [varied_images(n) for n in (16, 9, 16, 3, 24)]
    want = [lite.LiteCaptioner(data, tiny_vocab, "m", 64, num_threads=1).search(b).tokens for b in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: shared.search(b).tokens, batches * 3))
    for i, tokens in enumerate(got):
        assert np.array_equal(tokens, want[i % len(batches)])


def test_default_replicas_use_each_cpu_up_to_a_cap():
    assert [lite.default_replicas(n) for n in (1, 2, 3, 8, 64)] == [1, 2, 3, 4, 4]


def test_bad_input_is_refused(tiny_model, tiny_vocab):
    compiled = lite.LiteCaptioner(lite.compile_captioner(Captioner(tiny_model, tiny_vocab)), tiny_vocab, "m", 64)
    with pytest.raises(ValueError, match=r"expected uint8 images \[B, 64, 64, 3\]"):
        compiled.search(np.zeros([2, 32, 32, 3], np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        compiled.search(np.zeros([2, 64, 64, 3], np.float32))


def test_attention_maps_do_not_compile(attention_model, tiny_vocab):
    with pytest.raises(lite.CompileError, match="attention maps"):
        lite.compile_captioner(Captioner(attention_model, tiny_vocab, attention_maps=True))


def test_compiles_once_per_bundle_and_search(tiny_model, tiny_vocab, tmp_path, cache):
    bundle = str(tmp_path / "bundle")
    bundle_id = save_bundle(tiny_model, tiny_vocab, bundle)
    heard = []
    first = lite.load_lite_captioner(bundle, DecodeConfig(), log=heard.append)
    assert len(heard) == 1 and "compiled model" in heard[0] and str(cache) in heard[0]
    (compiled,) = os.listdir(cache / "litert")
    assert compiled.startswith(bundle_id) and compiled.endswith(".tflite")
    again = lite.load_lite_captioner(bundle, DecodeConfig(), log=heard.append)
    assert len(heard) == 1  # from the cache
    images = varied_images(3)
    _same_search(first.search(images), again.search(images), atol=0)
    lite.load_lite_captioner(bundle, DecodeConfig(beam_size=2, num_alternatives=2), log=heard.append)
    assert len(heard) == 2 and len(os.listdir(cache / "litert")) == 2  # other settings: another graph
    other = DecodeConfig(beam_size=2, num_alternatives=2)
    assert lite.compiled_path(bundle_id, DecodeConfig()) != lite.compiled_path(bundle_id, other)


def test_a_graph_that_disagrees_with_tensorflow_is_not_cached(tiny_model, every_step_model, tiny_vocab, tmp_path,
                                                              cache, monkeypatch):
    bundle = str(tmp_path / "bundle")
    save_bundle(tiny_model, tiny_vocab, bundle)
    other = lite.compile_captioner(Captioner(every_step_model, tiny_vocab))  # another model's graph
    monkeypatch.setattr(lite, "compile_captioner", lambda captioner: other)
    with pytest.raises(lite.CompileError, match="differ from TensorFlow"):
        lite.load_lite_captioner(bundle, DecodeConfig())
    assert not (cache / "litert").exists() or not os.listdir(cache / "litert")


def test_handler_keeps_tensorflow_when_the_graph_does_not_compile(tiny_bundle, cache, monkeypatch, caplog):
    from batch_caption.core.inference import CaptionModelHandler

    def refuse(captioner):
        raise lite.CompileError("LiteRT cannot convert the graph: no")

    monkeypatch.setattr(lite, "compile_captioner", refuse)
    captioner = CaptionModelHandler(tiny_bundle, DecodeConfig(), runtime="litert").load_now()
    assert isinstance(captioner, Captioner)
    assert "runs on TensorFlow: LiteRT cannot convert the graph" in caplog.text
    assert isinstance(CaptionModelHandler(tiny_bundle, DecodeConfig(), runtime="tensorflow").load_now(), Captioner)
    with pytest.raises(ValueError, match="runtime must be one of litert, tensorflow"):
        CaptionModelHandler(tiny_bundle, DecodeConfig(), runtime="onnx")


_CHILD = """
import json, sys
from batch_caption import run
m = run.run(sys.argv[1:])
print("RESULT " + json.dumps({"counts": m["counts"], "tensorflow": "tensorflow" in sys.modules}))
"""


def _job_in_process(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _captions(run_dir) -> dict:
    got = {}
    for name in os.listdir(run_dir):
        if name.startswith("captions-"):
            with open(os.path.join(run_dir, name)) as f:
                for line in f:
                    r = json.loads(line)
                    got[r["path"]] = (r["caption"], r["score"])
    return got


def test_job_with_a_compiled_model_never_imports_tensorflow(tmp_path):
    out = str(tmp_path / "out")
    common = ["--model", "scenes", "--output", out]
    first = _job_in_process([*common, "--run_id", "compile"])  # compiles: TF is loaded once
    assert first["tensorflow"] and first["counts"]["captioned"] == first["counts"]["inputs"] > 0
    cached = _job_in_process([*common, "--run_id", "cached"])
    assert not cached["tensorflow"] and cached["counts"]["captioned"] == first["counts"]["captioned"]
    _job_in_process([*common, "--run_id", "tf", "--runtime", "tensorflow"])
    on_lite, on_tf = _captions(os.path.join(out, "run=cached")), _captions(os.path.join(out, "run=tf"))
    assert on_lite.keys() == on_tf.keys()
    for path, (caption, score) in on_tf.items():
        assert on_lite[path][0] == caption
        assert on_lite[path][1] == pytest.approx(score, abs=1e-4)


def test_a_change_to_the_model_code_compiles_anew(monkeypatch):
    before = lite.compiled_path("b", DecodeConfig())
    digest = lite.graph_code_digest()
    assert len(digest) == 64 and lite.graph_code_digest() == digest  # computed once, stable
    monkeypatch.setattr(lite, "graph_code_digest", lambda: "other code")
    assert lite.compiled_path("b", DecodeConfig()) != before
