"""The sink seam: the run's own outputs and one from here, each listed in the manifest,
which is written only after every sink completed."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import apache_beam as beam
import pytest

from batch_caption import records
from batch_caption.storage import files, run_dirs
from batch_caption.pipeline import ERRORS, RunInfo, Sink, WriteRun, build_pipeline, carry, shards, sinks


@dataclasses.dataclass(frozen=True)
class Summary(Sink):
    """One JSON file per run, summary.json: how many captions the run has. Written under
    the run's temp dir, moved into place when published."""

    run_dir: str
    fail: str = ""  # "write" or "publish": the sink fails there

    def write(self):
        return CountCaptions(shards.temp_dir_of(self.run_dir), self.fail == "write")

    def publish(self, written):
        if self.fail == "publish":
            raise RuntimeError("the summary store is down")
        [temp] = written
        files.write_bytes(files.join(self.run_dir, "summary.json"), files.read_bytes(temp))
        return ["summary.json"]


class CountCaptions(beam.PTransform):
    def __init__(self, temp_dir, fail):
        super().__init__()
        self._temp_dir, self._fail = temp_dir, fail

    def expand(self, inputs):
        return (inputs["captions"]
                | "Count" >> beam.combiners.Count.Globally()
                | "WriteSummary" >> beam.Map(_write_summary, self._temp_dir, self._fail))


def _write_summary(n, temp_dir, fail):
    if fail:
        raise OSError("no space left on the summary's device")
    path = files.join(temp_dir, f"summary-{uuid.uuid4().hex}.json")
    files.write_bytes(path, json.dumps({"captions": n}).encode())
    return path


def _caption(i):
    return {"path": f"/in/{i}.png", "caption": "a thing", "score": -0.5, "flags": ["low_score"] if i == 0 else [],
            "model": "m", "run_id": "r", "decode": {}, "bytes": 10, "modified": 1.0, "sha256": "ab" * 32,
            "width": 8, "height": 8}


def _write_run(run_dir, extra):
    """WriteRun over 3 captions and one decode error, with `extra` sinks; -> its manifest."""
    info = RunInfo(run_id="r", run_dir=run_dir, model="m", model_path="/m", options={}, start_time=0.0)
    with beam.Pipeline() as p:
        none = p | "Nothing" >> beam.Create([])
        outputs = {
            "captions": p | "Captions" >> beam.Create([_caption(i) for i in range(3)]),
            ERRORS: p | "Errors" >> beam.Create([records.error_record("/in/bad.png", "decode", "E", run_id="r")]),
            "skipped": none, "carry": none, "links_skipped": none, "not_image": none,
            "read": p | "Read" >> beam.Create(["/in/0.png"] * 4),
            "tallies": p | "Tallies" >> beam.Create([(("matched", ""), 4)]),
        }
        outputs | WriteRun(info, sinks=extra)
    return run_dirs.read_run(run_dir).manifest


def test_an_extra_sink_writes_beside_the_runs_own_and_the_manifest_names_all(tmp_path):
    run_dir = str(tmp_path / "run=r")
    manifest = _write_run(run_dir, [Summary("summary", run_dir)])
    assert manifest["format"] == records.MANIFEST_FORMAT
    listed = manifest["files"]
    assert sorted(listed) == ["captions", "catalog", "errors", "summary"] and listed["summary"] == ["summary.json"]
    assert listed["captions"] == ["captions-00000-of-00001.jsonl"] and listed["catalog"][0].startswith("catalog-")
    assert json.loads(files.read_bytes(os.path.join(run_dir, "summary.json"))) == {"captions": 3}
    c = manifest["counts"]
    assert (c["captioned"], c["failed"], c["matched"], c["read"], c["catalog_rows"]) == (3, 1, 4, 4, 4)
    assert c["flagged"]["low_score"] == 1
    named = [n for names in listed.values() for n in names]
    assert sorted(os.listdir(run_dir)) == sorted(named + [records.MANIFEST_NAME])  # no _temporary/


@pytest.mark.parametrize("where", ["write", "publish"])
def test_a_sink_that_fails_fails_the_run_and_no_manifest_is_written(tmp_path, where):
    run_dir = str(tmp_path / "run=r")
    with pytest.raises(Exception, match="no space left|store is down"):
        _write_run(run_dir, [Summary("summary", run_dir, fail=where)])
    assert not os.path.exists(os.path.join(run_dir, records.MANIFEST_NAME))
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))


def test_the_job_takes_extra_sinks(tiny_bundle, tmp_path):
    """build_pipeline's sinks=: the whole job, one more output."""
    from helpers import varied_images
    from PIL import Image

    from batch_caption import run
    from batch_caption.pipeline.preflight import check_model, resolve_inputs

    for i, px in enumerate(varied_images(2, 32)):
        Image.fromarray(px).save(tmp_path / f"{i}.png")
    config, options = run.parse(["--input", str(tmp_path / "*.png"), "--output", str(tmp_path / "out"),
                                 "--model", tiny_bundle, "--run_id", "s"])
    config = resolve_inputs(config)
    model_id, model_config, _ = check_model(config.model)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, config, model_id, model_config.image_size, True, sinks=[Summary("summary", config.run_dir)])
    manifest = run_dirs.read_run(config.run_dir).manifest
    assert manifest["files"]["summary"] == ["summary.json"] and manifest["counts"]["captioned"] == 2
    assert json.loads(files.read_bytes(os.path.join(config.run_dir, "summary.json"))) == {"captions": 2}


def test_sinks_need_plain_distinct_names(tmp_path):
    info = RunInfo(run_id="r", run_dir=str(tmp_path), model="m", model_path="/m", options={}, start_time=0.0)
    with pytest.raises(ValueError, match="share a name"):
        WriteRun(info, sinks=[Summary("captions", str(tmp_path))])
    with pytest.raises(ValueError, match="plain word"):
        Summary("../x", str(tmp_path))
    with pytest.raises(ValueError, match="not one of"):
        sinks.Shards("more", str(tmp_path), ("captions",), "csv")


def test_the_catalog_sink_writes_every_kind_of_row_build_catalog_makes():
    with beam.Pipeline() as p:
        none = p | beam.Create([])
        rows = {"captions": none, "errors": none, "skipped": none, "carry": none} | carry.BuildCatalog([], "m", {})
    [catalog_sink] = [s for s in sinks.run_sinks("/run") if s.name == "catalog"]
    assert sorted(rows) == sorted(carry.ROWS) == sorted(catalog_sink.keys)
