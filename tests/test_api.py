"""batch_caption.api: paths, bytes and arrays in process, the PTransform and the model
handler in a pipeline; the records are the job's; the README's examples run, quietly."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from helpers import varied_images
from PIL import Image

from batch_caption import api, bundled, quiet, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two images, a text file and a path that does not exist."""
    d = tmp_path_factory.mktemp("photos")
    for i, pixels in enumerate(varied_images(2, 48)):
        Image.fromarray(pixels).save(d / f"{i}.png")
    (d / "notes.txt").write_text("not an image")
    return [str(d / "0.png"), str(d / "notes.txt"), str(d / "missing.jpg"), str(d / "1.png")]


@pytest.fixture(scope="module")
def captioner(tiny_bundle):
    return api.load(tiny_bundle, beam_size=2, batch_size=8, run_id="r1")


def test_paths_give_one_record_each_in_order(captioner, photos):
    got = captioner.caption_paths(photos)
    assert [r["path"] for r in got] == photos
    assert [r.get("stage") for r in got] == [None, "decode", "read", None]
    assert got[1]["error"] == "UnsupportedImageError" and got[2]["error"] == "FileNotFoundError"
    for r in (got[0], got[3]):
        assert r["caption"] and r["model"] == captioner.model_id and r["run_id"] == "r1"
        assert r["decode"] == {"beam_size": 2, "max_length": 20, "num_alternatives": 2, "length_normalization": 0.7}
        assert (r["width"], r["height"], r["format"]) == (48, 48, "PNG") and len(r["alternatives"]) == 1
        assert records.to_json_line(r)  # a valid JSONL record


def test_bytes_and_arrays_caption_as_files_do(captioner, photos):
    with open(photos[0], "rb") as f:
        data = f.read()
    [from_path] = captioner.caption_paths(photos[:1])
    [from_bytes, bad] = captioner.caption_bytes([data, b"junk"], names=["a", "b"])
    assert {**from_bytes, "path": photos[0]} == from_path
    assert (bad["path"], bad["stage"], bad["bytes"]) == ("b", "decode", 4)
    [from_array] = captioner.caption_arrays([np.asarray(Image.open(photos[0]))])
    assert from_array["path"] is None and from_array["caption"] == from_path["caption"]
    assert from_array["score"] == from_path["score"] and from_array["sha256"] is None
    with pytest.raises(ValueError, match="1 names for 2 images"):
        captioner.caption_bytes([data, data], names=["a"])
    with pytest.raises(TypeError, match="uint8"):
        captioner.caption_arrays([np.zeros((4, 4, 3), np.float32)])


def test_more_images_than_a_batch(tiny_bundle, photos):
    small = api.load(tiny_bundle, batch_size=1)
    assert [r.get("caption") is not None for r in small.caption_paths(photos)] == [True, False, False, True]


def test_bad_settings_raise_before_loading(tiny_bundle):
    with pytest.raises(ValueError, match="beam_size"):
        api.load(tiny_bundle, beam_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        api.CaptionPaths(tiny_bundle, batch_size=0)
    with pytest.raises(TypeError):
        api.load(tiny_bundle, beam_sise=3)


def test_settings_take_every_search_flag_from_decode_config():
    """One definition per search setting: Settings has a field for each of the job's
    search flags, None (the model's default) unless given, and passes it to the search."""
    from batch_caption.model.config import SEARCH_FLAGS, DecodeConfig

    fields = {f.name: f.default for f in dataclasses.fields(api.Settings)}
    assert {flag: fields.get(flag, "missing") for flag in SEARCH_FLAGS} == dict.fromkeys(SEARCH_FLAGS)
    given = dict(beam_size=5, max_caption_length=9, num_alternatives=2, length_normalization=0.0,
                 forbid_unknown=True, no_repeat_ngram=3)
    assert set(given) == set(SEARCH_FLAGS)
    assert api.Settings(**given).decode_for(DecodeConfig()) == DecodeConfig(
        beam_size=5, max_length=9, num_alternatives=2, length_normalization=0.0, forbid_unknown=True,
        no_repeat_ngram=3)


def _sizeless_errors(rs):
    """Sorted by path; error records without `bytes` (a path the job reads without
    matching it first has no size in its decode error, the in-process API knows it)."""
    return sorted(({k: v for k, v in r.items() if not ("stage" in r and k == "bytes")} for r in rs),
                  key=lambda r: r["path"])


def test_the_ptransform_gives_the_in_process_records(captioner, tiny_bundle, photos):
    want = _sizeless_errors(captioner.caption_paths(photos))
    with BeamTestPipeline() as p:
        out = p | beam.Create(photos) | api.CaptionPaths(tiny_bundle, beam_size=2, batch_size=8, run_id="r1")
        both = (out["captions"], out["errors"]) | beam.Flatten()
        assert_that(both | beam.combiners.ToList() | beam.Map(_sizeless_errors), equal_to([want]))


def test_the_model_handler_captions_examples_in_runinference(captioner, tiny_bundle, photos):
    from apache_beam.ml.inference.base import RunInference

    with open(photos[0], "rb") as f:
        example = api.decode_example(f.read(), api.image_size(tiny_bundle), path=photos[0])
    want = captioner.caption_paths(photos[:1])[0]["caption"]
    with BeamTestPipeline() as p:
        texts = (p | beam.Create([example]) | RunInference(api.model_handler(tiny_bundle, beam_size=2))
                 | beam.Map(lambda result: (result.example.path, result.inference[0].text)))
        assert_that(texts, equal_to([(photos[0], want)]))


def _readme_examples() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = re.search(r"<!-- api-examples -->(.*?)<!-- /api-examples -->", readme, re.S)
    assert section, "README.md lost its api-examples section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) >= 3
    return "\n".join(blocks)


def test_the_readme_examples_run_with_the_bundled_model_and_print_nothing_else(tmp_path):
    (tmp_path / "photos").mkdir()
    first, second = bundled.default().sample_files()[:2]  # the default model's own samples
    shutil.copy(first, tmp_path / "photos" / "a.jpg")
    Image.open(second).save(tmp_path / "photos" / "b.png")
    (tmp_path / "examples.py").write_text(_readme_examples())
    env = {k: v for k, v in os.environ.items() if k not in (quiet.TF_LEVEL, quiet.MARK)}
    done = subprocess.run([sys.executable, "examples.py"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**env, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no TensorFlow, absl or Beam lines
    lines = done.stdout.splitlines()
    captions = [line for line in lines if line.startswith(("photos/a.jpg ", "photos/b.png ")) and "Error" not in line]
    assert len(captions) == 5, done.stdout  # caption_paths, CaptionPaths (2 each), RunInference
    assert "photos/missing.jpg FileNotFoundError" in lines
