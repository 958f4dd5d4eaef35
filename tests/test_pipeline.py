"""Transform-level tests of the job's composite transforms, with fake model handlers."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from batch_caption import pipeline as P
from batch_caption.inference import CaptionModelHandler, ImageExample
from batch_caption.model.captioner import Caption
from batch_caption.model.config import DecodeConfig


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
            | P.CaptionImages(handler, DecodeConfig(), run_id="r", low_score_threshold=-1.5)
        )
        done = (
            (out["captions"] | "C" >> beam.Map(lambda r: (r["path"], "captioned", r["caption"])),
             out[P.ERRORS] | "E" >> beam.Map(lambda r: (r["path"], r["stage"], r["error"], r["message"])))
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


def test_describe_failure_handles_beam_dead_letter_tuples():
    exc = (ValueError, "ValueError('x: y')", ["Traceback...\n", "ValueError: x: y\n"])
    assert P._describe_failure(exc) == ("ValueError", "x: y")
    assert P._describe_failure(KeyError("k")) == ("KeyError", "'k'")


def test_match_images_dedupes_and_reports_empty_patterns(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.png'}\n")
    with BeamTestPipeline() as p:
        out = p | P.MatchImages([str(tmp_path / "*.png"), str(tmp_path / "none-*.jpg")], [str(listing)], "r")
        paths = out["files"] | beam.Map(lambda f: (f.path, f.size))
        # a.png came from the glob and the list: one file, with the glob's metadata.
        assert_that(paths, equal_to([(str(tmp_path / "a.png"), 1), (str(tmp_path / "b.png"), 1)]), label="Paths")
        assert_that(out[P.ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error"])),
                    equal_to([(str(tmp_path / "none-*.jpg"), "match", "NoMatch")]), label="Errors")


def test_the_bundled_model_is_resolved_on_the_worker_not_the_driver():
    import os

    import batch_caption
    from batch_caption.inference import BUNDLED_MODEL, resolve_model_path

    here = os.path.join(os.path.dirname(batch_caption.__file__), "default_model")
    assert resolve_model_path(BUNDLED_MODEL) == os.path.abspath(here)
    assert resolve_model_path("gs://b/m") == "gs://b/m"
