"""WriteRun: the manifest's counts from the stages' tallies, the catalog with every live
row, the manifest last."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import caption_record, write_catalog

from batch_caption import catalog, quality, records
from batch_caption.core.elements import CatalogRef, SourceFile
from batch_caption.pipeline import ERRORS, RunInfo, Sink, WriteRun, shards, write
from batch_caption.storage import run_dirs


@dataclasses.dataclass(frozen=True)
class Named(Sink):
    """A sink whose manifest entry is the sorted list of what its write() gave."""

    def publish(self, written):
        return sorted(written)


def _manifest(run_dir, tallies, written=(("b", "a"), ()), **info):
    """The manifest step alone, over `tallies`, with sinks 'first' and 'second' that
    wrote `written`; -> (the manifest it yields, the one it wrote)."""
    info = RunInfo(run_id="r", run_dir=run_dir, model="m", model_path="/m", options={"batch_size": 4},
                   start_time=0.0, **info)
    fn = write._WriteManifestFn(info, [Named("first"), Named("second")])
    fn.setup()
    [manifest] = fn.process(None, tallies, *written)
    return manifest, json.loads(open(os.path.join(run_dir, records.MANIFEST_NAME)).read())


def test_the_manifest_counts_every_kind_the_stages_tallied(tmp_path):
    run_dir = str(tmp_path / "run=r")
    leftover = os.path.join(shards.temp_dir_of(run_dir), "failed-attempt.jsonl")
    os.makedirs(os.path.dirname(leftover))
    open(leftover, "w").close()
    tallies = [(("captioned", ""), 3), (("failed", "decode"), 1), (("failed", "match"), 1), (("failed", "infer"), 1),
               (("skipped", ""), 2), (("unlisted", ""), 1), (("carried_not_image", ""), 1), (("deleted", ""), 4),
               (("matched", ""), 8), (("read", ""), 5), (("links_skipped", ""), 1), (("skipped_not_image", ""), 2),
               (("flagged", quality.LOW_SCORE), 2), (("flagged", quality.TRUNCATED), 1)]
    before = time.time()
    manifest, written = _manifest(run_dir, tallies, previous_runs=("r0", "r1"), previous_catalog=("c0",))
    assert written == manifest
    end = manifest.pop("end_seconds")
    assert before <= end <= time.time()
    assert manifest.pop("end_time") == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
    assert manifest == {
        "format": records.MANIFEST_FORMAT, "run_id": "r", "model": "m", "model_path": "/m",
        "options": {"batch_size": 4}, "previous_runs": ["r0", "r1"], "files": {"first": ["a", "b"], "second": []},
        "start_time": "1970-01-01T00:00:00Z",
        "counts": {
            "captioned": 3, "failed": 3, "failed_by_stage": {"match": 1, "read": 0, "decode": 1, "infer": 1, "write": 0},
            "inputs": 6, "matched": 8, "skipped": 2, "read": 5, "carried": 4, "deleted": 4, "unlisted": 1,
            "links_skipped": 1, "skipped_not_image": 2, "carried_not_image": 1,
            "catalog_rows": 9,  # captions 3, errors of files 2, carried 4; a pattern's error has no row
            "flagged": {quality.LOW_SCORE: 2, quality.REPEATED_NGRAM: 0, quality.TRUNCATED: 1, quality.UNKNOWN_WORD: 0},
        },
    }
    assert not os.path.exists(shards.temp_dir_of(run_dir))  # with what failed attempts left there


@pytest.mark.parametrize("captioned, failed, limit, rejected", [
    (3, 1, 0.25, None),  # at the limit: accepted
    (3, 1, 0.2, "1 of 4 inputs failed (25.0%), over --max_failed_fraction 0.2"),
    (0, 2, 0.99, "2 of 2 inputs failed (100.0%), over --max_failed_fraction 0.99"),
    (0, 0, 0.0, None),  # nothing to caption: nothing failed
])
def test_a_run_whose_failed_share_is_over_the_limit_is_marked_rejected(tmp_path, captioned, failed, limit, rejected):
    tallies = [(("captioned", ""), captioned), (("failed", "read"), failed)]
    manifest, written = _manifest(str(tmp_path / "run=r"), tallies, max_failed_fraction=limit)
    assert manifest.get("rejected") == written.get("rejected") == rejected
    assert manifest["counts"]["inputs"] == captioned + failed


def _catalog_rows(run):
    table = pq.read_table([os.path.join(run.run_dir, n) for n in run.manifest["files"]["catalog"]], partitioning=None)
    return {catalog.path_of(r): r for r in table.to_pylist()}


def _lines(run, kind):
    return [json.loads(line) for n in run.manifest["files"][kind]
            for line in open(os.path.join(run.run_dir, n), encoding="utf-8")]


def _write(run_dir, report=False, previous_catalog=(), **given):
    """WriteRun over `given` PCollection contents (the rest empty); -> the run it wrote."""
    info = RunInfo(run_id="r1", run_dir=run_dir, model="m", model_path="/m", options={}, start_time=0.0,
                   decode={"beam_size": 3}, previous_catalog=previous_catalog)
    keys = ("captions", ERRORS, "skipped", "carry", "read", "links_skipped", "not_image", "tallies")
    with beam.Pipeline() as p:
        outputs = {k: p | f"Given{k.title()}" >> beam.Create(given.get(k, [])) for k in keys}
        outputs | WriteRun(info, report_progress=report)
    return run_dirs.read_run(run_dir)


def test_an_empty_run_writes_empty_shards_an_empty_catalog_and_zero_counts(tmp_path):
    run = _write(str(tmp_path / "run=r1"))
    assert {k: len(v) for k, v in run.manifest["files"].items()} == {"captions": 1, "errors": 1, "catalog": 1}
    assert _lines(run, "captions") == _lines(run, ERRORS) == [] and _catalog_rows(run) == {}
    counts = run.manifest["counts"]
    assert set(counts.pop("failed_by_stage").values()) == set(counts.pop("flagged").values()) == {0}
    assert set(counts.values()) == {0}
    assert sorted(os.listdir(run.run_dir)) == sorted(
        [n for names in run.manifest["files"].values() for n in names] + [records.MANIFEST_NAME])


def test_the_catalog_holds_new_failed_carried_and_inline_rows_and_the_manifest_counts_them(tmp_path,
                                                                                          progress_reporter):
    earlier = [catalog.captioned_row(caption_record(f"/in/a{i}.png", run_id="r0"), None) for i in range(3)]
    previous = write_catalog(tmp_path / "catalog-0.parquet", earlier)
    inline = catalog.captioned_row(caption_record("/in/old.png", run_id="old"), None)
    new = caption_record("/in/new.png", run_id="r1", flags=[quality.LOW_SCORE])
    errors = [records.error_record("/in/bad.png", "decode", "E", run_id="r1", size=3, modified=1.0),
              records.error_record("/in/gone/*", "match", "E", run_id="r1")]
    run = _write(
        str(tmp_path / "run=r1"), report=True, previous_catalog=(previous,),
        captions=[new], errors=errors,
        # a1 touched and hashed unchanged; old.png unchanged, from an output without catalogs
        skipped=[SourceFile("/in/a1.png", 10, 8.0, "s", CatalogRef(0, 1)), SourceFile("/in/old.png", 10, 1.0, "s", inline)],
        carry=[(0, (np.array([0]), np.array([np.nan])))],  # a0 skipped unread; a2 deleted
        read=["/in/new.png", "/in/bad.png", "/in/a1.png", "/in/old.png"],
        tallies=[(("matched", ""), 5), (("skipped", ""), 1), (("deleted", ""), 1)])
    rows = _catalog_rows(run)
    assert {p: (r["status"], r["captioned_run"], r["modified"]) for p, r in rows.items()} == {
        "/in/new.png": ("captioned", "r1", 1.0), "/in/bad.png": ("failed", "r1", 1.0),
        "/in/a0.png": ("captioned", "r0", 1.0), "/in/a1.png": ("captioned", "r0", 8.0),
        "/in/old.png": ("captioned", "old", 1.0)}
    assert rows["/in/a0.png"] == earlier[0] and rows["/in/new.png"]["flags"] == [quality.LOW_SCORE]
    assert _lines(run, "captions") == [new] and sorted(r["path"] for r in _lines(run, ERRORS)) == ["/in/bad.png", "/in/gone/*"]
    c = run.manifest["counts"]
    assert (c["captioned"], c["failed"], c["inputs"], c["matched"], c["read"]) == (1, 2, 3, 5, 4)
    assert (c["skipped"], c["carried"], c["deleted"], c["catalog_rows"]) == (3, 3, 1, len(rows))
    assert c["failed_by_stage"]["match"] == c["failed_by_stage"]["decode"] == 1 and c["flagged"][quality.LOW_SCORE] == 1
    # The progress line counts matched paths: a pattern's error is none of them, and the
    # files skipped unread were counted where they were decided (SelectChanged).
    assert progress_reporter.by_kind == {"captioned": 1, "failed": 1, "skipped": 2}
