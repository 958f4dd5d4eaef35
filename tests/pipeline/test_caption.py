"""CaptionImages with stand-in model handlers: records, and failures as records or as a failed run."""

from __future__ import annotations

import traceback

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from batch_caption.core.dead_letters import describe_failure, is_model_load_failure
from batch_caption.core.inference import CaptionModelHandler
from batch_caption.core.model_loading import ModelLoadError
from batch_caption.model.captioner import Caption
from batch_caption.model.config import DecodeConfig
from batch_caption.pipeline import ERRORS, CaptionImages, ImageExample


def _example(path):
    return ImageExample(path=path, pixels=np.zeros((8, 8, 3), np.uint8), width=8, height=8, format="PNG",
                        sha256="0" * 64, size_bytes=10)


class _FakeModel:
    def caption(self, pixels):
        return [[Caption("a thing", (4,), -1.0, -0.5)] for _ in range(len(pixels))]

    def get_model_id(self):
        return "fake"


class FlakyHandler(CaptionModelHandler):
    """Captions everything, except that a batch holding a path with 'bad' raises."""

    def load_model(self):
        return _FakeModel()

    def run_inference(self, batch, model, inference_args=None):
        if any("bad" in e.path for e in batch):
            raise RuntimeError("device fell over")
        return super().run_inference(batch, model, inference_args)


def test_a_failed_inference_batch_becomes_one_error_record_per_image():
    handler = FlakyHandler("unused", DecodeConfig(), batch_size=2)
    paths = ["ok1", "ok2", "bad1", "ok3"]
    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create([_example(x) for x in paths])
            | CaptionImages(handler, DecodeConfig(), run_id="r", low_score_threshold=-1.5)
        )
        done = (
            (out["captions"] | "C" >> beam.Map(lambda r: (r["path"], "captioned", r["caption"])),
             out[ERRORS] | "E" >> beam.Map(lambda r: (r["path"], r["stage"], r["error"], r["message"])))
            | beam.Flatten()
            | beam.Map(lambda t: (t[0], t[1:]))
        )
        # Batches may pair any two elements: check each path lands once, correctly.

        def check(items):
            by_path = dict(items)
            assert sorted(by_path) == sorted(paths) and len(items) == len(paths)
            assert by_path["bad1"] == ("infer", "RuntimeError", "device fell over")
            for path, outcome in by_path.items():
                assert outcome[0] in ("captioned", "infer")
                if outcome[0] == "captioned":
                    assert outcome[1] == "a thing"

        assert_that(done, check)



class BrokenModelHandler(CaptionModelHandler):
    """Its model fails to load, in the background as the real handler's does."""

    def load_now(self):
        raise OSError("weights unreadable")


def test_a_model_that_fails_to_load_fails_the_run_not_the_images():
    handler = BrokenModelHandler("unused", DecodeConfig(), batch_size=2)
    # Without the check, each image would become an 'infer' error record and the run
    # would succeed.
    with pytest.raises(Exception, match="ModelLoadError.*the model failed to load: OSError: weights unreadable"):
        with BeamTestPipeline() as p:
            _ = (
                p
                | beam.Create([_example(x) for x in ["a", "b", "c"]])
                | CaptionImages(handler, DecodeConfig(), run_id="r", low_score_threshold=-1.5)
            )


def test_describe_failure_handles_beam_dead_letter_tuples():
    exc = (ValueError, "ValueError('x: y')", ["Traceback...\n", "ValueError: x: y\n"])
    assert describe_failure(exc) == ("ValueError", "x: y")
    assert describe_failure(KeyError("k")) == ("KeyError", "'k'")
    # A class outside builtins: traceback writes "module.Name: message".
    try:
        raise ModelLoadError("the model failed to load: OSError: gone")
    except ModelLoadError as e:
        dead = (type(e), repr(e), traceback.format_exception(e))
    assert describe_failure(dead) == ("ModelLoadError", "the model failed to load: OSError: gone")
    assert is_model_load_failure((ModelLoadError, "ModelLoadError('x')", []))
    assert not is_model_load_failure(exc) and not is_model_load_failure(KeyError("k"))
