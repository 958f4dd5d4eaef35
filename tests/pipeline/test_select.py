"""SelectChanged: the listing joined with the earlier catalog (or, without one, the
earlier caption records) -> the files to read, the rows to carry, the counts."""

from __future__ import annotations

import json
import math
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from helpers import caption_record, write_catalog

from batch_caption import catalog
from batch_caption.core.elements import CatalogRef, SourceFile, path_key
from batch_caption.pipeline import select
from batch_caption.pipeline.tallies import TAG

DECODE = {"beam_size": 3}
SETTINGS = select.Settings("m", catalog.decode_key(DECODE))


def _row(path, size=10, modified=1.0, sha256="s", failed=False, same=True):
    """One earlier catalog row, as the decision sees it (None: unknown)."""
    return path, size, modified, sha256, failed, same


def _part(*rows, file=0, first=0):
    """The CatalogPart of `rows` (_row tuples), numbered from `first` in catalog file `file`."""
    paths, sizes, mtimes, shas, failed, same = zip(*rows) if rows else ((),) * 6
    return select.CatalogPart(
        file, np.arange(first, first + len(rows), dtype=np.int64), [path_key(p) for p in paths],
        np.array([-1 if s is None else s for s in sizes], np.int64),
        np.array([np.nan if m is None else m for m in mtimes], np.float64),
        list(shas), np.array(failed, bool), np.array(same, bool))


def _batch(files):
    files = list(files)
    return [path_key(f.path) for f in files], [f.size for f in files], [f.modified for f in files]


def _mtime(m):
    return None if math.isnan(m) else m


def _decide(parts, listed=(), not_image=(), unlistable=(), retry_failed=False, report=False):
    """One partition through the decision -> ({path: file to read}, {catalog file: [(row,
    mtime now)]}, {tally kind: n})."""
    fn = select._DecidePartitionFn(retry_failed, report)
    fn.start_bundle()
    grouped = {"files": [_batch(b) for b in listed], "previous": list(parts),
               "not_image": [_batch(SourceFile(p) for p in not_image)]}
    out = [*fn.process((7, grouped), unlistable), *fn.finish_bundle()]
    read = [o for o in out if isinstance(o, SourceFile)]
    assert len({f.path for f in read}) == len(read), "one file per path"
    carried, tallies = {}, {}
    for o in out:
        if isinstance(o, TaggedOutput) and o.tag == "carry":
            index, (rows, mtimes) = o.value
            carried.setdefault(index, []).extend((int(r), _mtime(m)) for r, m in zip(rows, mtimes))
        elif isinstance(o, TaggedOutput) and o.tag == TAG:
            (kind, _), n = o.value.value
            tallies[kind] = n
    return {f.path: f for f in read}, carried, tallies


def test_each_listed_file_is_skipped_or_read_by_what_its_row_says(progress_reporter):
    part = _part(
        _row("same.png", sha256="s0"),
        _row("touched.png", sha256="s1"),
        _row("grown.png", sha256="s2"),
        _row("named.png", sha256="s3"),  # now named by a list file: no size, no mtime
        _row("remodelled.png", same=False),  # captioned with another model or decode settings
        _row("gone.png"),
        file=2, first=10)
    other = _part(_row("kept.png", 20, 5.0), file=3)
    listed = [SourceFile("same.png", 10, 1.0), SourceFile("touched.png", 10, 2.0), SourceFile("grown.png", 11, 2.0),
              SourceFile("named.png"), SourceFile("remodelled.png", 10, 1.0), SourceFile("new.png", 5, 1.0),
              SourceFile("kept.png", 20, 5.0)]
    read, carried, tallies = _decide([part, other], [listed[:4], listed[4:]], report=True)
    # Only a file of the same size (or of unknown size) may be skipped after hashing.
    assert {p: (f.previous_sha256, f.previous) for p, f in read.items()} == {
        "touched.png": ("s1", CatalogRef(2, 11)), "named.png": ("s3", CatalogRef(2, 13)),
        "grown.png": (None, None), "remodelled.png": (None, None), "new.png": (None, None)}
    by_path = {f.path: f for f in listed}
    assert {p: f._replace(previous_sha256=None, previous=None) for p, f in read.items()} == {p: by_path[p] for p in read}
    assert carried == {2: [(10, 1.0)], 3: [(0, 5.0)]}
    assert tallies == {"matched": 7, "skipped": 2, "deleted": 1}
    assert progress_reporter.by_kind == {"skipped": 2}


@pytest.mark.parametrize("retry_failed", [False, True])
def test_a_file_that_failed_is_tried_again_only_with_retry_failed(retry_failed):
    part = _part(_row("failed.png", failed=True), _row("ok.png"))
    read, carried, tallies = _decide([part], [[SourceFile("failed.png", 10, 1.0), SourceFile("ok.png", 10, 1.0)]],
                                     retry_failed=retry_failed)
    if retry_failed:
        # Read and decoded again: no earlier hash, so equal bytes are not skipped after reading.
        assert read == {"failed.png": SourceFile("failed.png", 10, 1.0)} and carried == {0: [(1, 1.0)]}
        assert tallies == {"matched": 2, "skipped": 1}
    else:
        assert read == {} and carried == {0: [(0, 1.0), (1, 1.0)]} and tallies == {"matched": 2, "skipped": 2}


def test_rows_under_what_could_not_be_listed_are_carried_as_they_were():
    part = _part(_row("/in/locked/a.png"), _row("/in/locked/sub/b.png"), _row("/in/locked_too/c.png"),
                 _row("/in/broken.png"), _row("/in/open.png"), _row("/in/slash/d.png"))
    read, carried, tallies = _decide([part], [[SourceFile("/in/open.png", 10, 1.0)]],
                                     unlistable=["/in/locked", "/in/broken.png", "/in/slash/"])
    assert read == {}
    # Unlisted rows keep their mtime (nan); the sibling whose name extends a directory's is deleted.
    assert carried == {0: [(0, None), (1, None), (3, None), (4, 1.0), (5, None)]}
    assert tallies == {"matched": 1, "skipped": 1, "unlisted": 4, "deleted": 1}


def test_a_file_the_filter_leaves_out_keeps_its_caption_and_drops_its_error():
    part = _part(_row("/in/a.jpg"), _row("/in/notes.txt", failed=True), _row("/in/b.jpg"))
    read, carried, tallies = _decide([part], not_image=["/in/a.jpg", "/in/notes.txt"])
    assert read == {} and carried == {0: [(0, None)]}
    assert tallies == {"carried_not_image": 1, "deleted": 1}


def test_a_path_listed_twice_is_decided_once_from_its_best_known_listing():
    part = _part(_row("a.png"))
    read, carried, tallies = _decide(
        [part], [[SourceFile("a.png", 10, 1.0), SourceFile("n.png")], [SourceFile("a.png"), SourceFile("n.png", 5, 2.0)]])
    assert read == {"n.png": SourceFile("n.png", 5, 2.0)} and carried == {0: [(0, 1.0)]}
    assert tallies == {"matched": 2, "skipped": 1}


def test_with_nothing_listed_every_row_is_deleted_and_with_nothing_at_all_nothing_happens():
    assert _decide([_part(_row("a.png"), _row("b.png"))]) == ({}, {}, {"deleted": 2})
    assert _decide([]) == ({}, {}, {})
    assert _decide([_part()], [[SourceFile("new.png", 1, 1.0)]]) == ({"new.png": SourceFile("new.png", 1, 1.0)}, {},
                                                                     {"matched": 1})


def test_settings_match_the_model_unless_any_model_and_always_the_decode():
    key = catalog.decode_key(DECODE)
    assert SETTINGS.match("m", key) and not SETTINGS.match("other", key)
    assert not SETTINGS.match("m", catalog.decode_key({"beam_size": 1})) and not SETTINGS.match(None, None)
    anything = select.Settings("m", key, any_model=True)
    assert anything.match("other", key) and not anything.match("other", "")


def test_partitions_grow_with_the_catalog_within_bounds():
    assert [select.partitions_for(n) for n in (0, 16384 * 8, 16384 * 100, 10**12)] == [8, 9, 101, 4096]
    keys = [path_key(f"/in/{i}.png") for i in range(200)]
    parts = [select.partition_of(k, 8) for k in keys]
    assert set(parts) == set(range(8))  # spread over all of them


def _failed(path, size=10, modified=1.0):
    record = {"path": path, "stage": "decode", "error": "E", "message": "bad", "run_id": "r0"}
    return catalog.failed_row(record, size, modified, None, "m", DECODE)


def _captioned(path, **fields):
    return catalog.captioned_row(caption_record(path, **fields), None)


LATIN1 = os.fsdecode(b"/in/caf\xe9.png")  # a name that is not UTF-8


@pytest.mark.parametrize("partitions", [1, 4])
def test_catalog_rows_are_read_as_decision_columns_numbered_across_row_groups(tmp_path, monkeypatch, partitions):
    monkeypatch.setattr(catalog, "ROW_GROUP_ROWS", 2)
    rows = [_captioned("/in/a.png", modified=1.5, sha256="sa"),
            _captioned("/in/b.png", model="other"),
            _failed("/in/c.png", None, None),
            _captioned(LATIN1, sha256="sd"),
            _captioned("/in/e.png", decode={"beam_size": 1})]
    path = write_catalog(tmp_path / "catalog.parquet", rows)
    fn = select._ReadCatalogFn(SETTINGS, partitions)
    fn.setup()
    out = list(fn.process((5, path)))
    assert len(out) >= 3  # one part per row group at least
    got = []
    for p, part in out:
        assert part.file == 5 and all(select.partition_of(k, partitions) == p for k in part.keys)
        got += zip(part.rows.tolist(), part.keys, part.size.tolist(), map(_mtime, part.modified), part.sha256,
                   part.failed.tolist(), part.same_settings.tolist())
    assert sorted(got) == [
        (0, b"/in/a.png", 10, 1.5, "sa", False, True),
        (1, b"/in/b.png", 10, 1.0, "s", False, False),
        (2, b"/in/c.png", -1, None, None, True, True),
        (3, b"/in/caf\xe9.png", 10, 1.0, "sd", False, True),
        (4, b"/in/e.png", 10, 1.0, "s", False, False)]


def test_listed_files_are_batched_by_partition_up_to_batch_files(monkeypatch):
    monkeypatch.setattr(select, "BATCH_FILES", 2)
    fn = select._BatchByPartitionFn(1)
    fn.start_bundle()
    files = [SourceFile(f"/in/{i}.png", i, float(i)) for i in range(4)] + [SourceFile(LATIN1)]
    full = [out for f in files for out in fn.process(f)]
    assert full == [(0, ([b"/in/0.png", b"/in/1.png"], [0, 1], [0.0, 1.0])),
                    (0, ([b"/in/2.png", b"/in/3.png"], [2, 3], [2.0, 3.0]))]
    assert [wv.value for wv in fn.finish_bundle()] == [(0, ([b"/in/caf\xe9.png"], [None], [None]))]


def test_select_changed_joins_the_listing_with_a_catalog_of_several_files(tmp_path):
    first = write_catalog(tmp_path / "catalog-0.parquet", [
        _captioned(p, sha256=s)
        for p, s in [("/in/a.png", "sa"), ("/in/b.png", "sb"), ("/in/gone.png", "sg"), ("/in/locked/x.png", "sx"),
                     ("/in/notes.txt", "sn")]])
    second = write_catalog(tmp_path / "catalog-1.parquet", [
        _captioned("/in/c.png"), _failed("/in/f.png")])
    listed = [SourceFile("/in/a.png"), SourceFile("/in/a.png", 10, 1.0), SourceFile("/in/b.png", 10, 2.0),
              SourceFile("/in/c.png", 10, 1.0), SourceFile("/in/f.png", 10, 1.0), SourceFile("/in/new.png", 3, 1.0)]
    with BeamTestPipeline() as p:
        out = p | "Listed" >> beam.Create(listed) | select.SelectChanged(
            [first, second], SETTINGS, catalog_rows=7,
            unlistable=p | "Unlistable" >> beam.Create(["/in/locked"]),
            not_image=p | "NotImage" >> beam.Create(["/in/notes.txt"]))
        assert_that(out["files"], equal_to([SourceFile("/in/b.png", 10, 2.0, "sb", CatalogRef(0, 1)),
                                            SourceFile("/in/new.png", 3, 1.0)]), label="Files")
        carried = out["carry"] | beam.FlatMap(
            lambda item: [(item[0], int(r), _mtime(m)) for r, m in zip(*item[1])])
        assert_that(carried, equal_to([(0, 0, 1.0), (0, 3, None), (0, 4, None), (1, 0, 1.0), (1, 1, 1.0)]),
                    label="Carry")
        assert_that(out["tallies"] | beam.CombinePerKey(sum), equal_to([
            (("matched", ""), 5), (("skipped", ""), 3), (("deleted", ""), 1), (("unlisted", ""), 1),
            (("carried_not_image", ""), 1)]), label="Tallies")
        assert_that(out["skipped"], equal_to([]), label="Skipped")


# --- outputs written before catalogs existed: their caption records -----------------------


@pytest.mark.parametrize("line", ["", "{not json", '{"run_id": "r1"}', "[1]", "7", '"a string"', "null",
                                  json.dumps({**caption_record("/in/a.png"), "path": 5})])
def test_an_unreadable_caption_record_is_passed_over(line):
    fn = select._ParseCaptionRecordFn(SETTINGS, {})
    assert list(fn.process(line)) == []


def test_a_caption_record_gives_its_row_its_settings_and_its_runs_rank():
    fn = select._ParseCaptionRecordFn(SETTINGS, {"r1": "2026-01-02T00:00:00Z"})
    [(key, previous)] = fn.process(json.dumps(caption_record(LATIN1, bytes=12, modified=3.0, sha256="sa", run_id="r1")))
    assert key == b"/in/caf\xe9.png"
    assert (previous.size, previous.modified, previous.sha256, previous.same_settings) == (12, 3.0, "sa", True)
    assert previous.rank == ("2026-01-02T00:00:00Z", "r1") and previous.row["captioned_run"] == "r1"
    assert catalog.path_of(previous.row) == LATIN1
    [(_, unknown_run)] = fn.process(json.dumps(caption_record("/in/a.png", run_id="r0", model="other")))
    assert unknown_run.rank == ("", "r0") and not unknown_run.same_settings


def _previous(size=10, modified=1.0, sha256="s", same=True, run=("t1", "r1")):
    return select.Previous(size, modified, sha256, same, {"path": "a.png", "captioned_run": run[1]}, run)


def _decide_from_records(files, previous):
    fn = select._DecideFromRecordsFn()
    fn.start_bundle()
    out = [*fn.process((b"a.png", {"files": files, "previous": previous})), *fn.finish_bundle()]
    tally = [isinstance(o, TaggedOutput) and o.tag == TAG for o in out]
    return [o for o, t in zip(out, tally) if not t], [o.value.value for o, t in zip(out, tally) if t]


def test_from_records_the_newest_earlier_record_decides():
    unchanged = SourceFile("a.png", 10, 1.0)
    newest_other = [_previous(run=("t1", "r1")), _previous(same=False, run=("t2", "r2"))]
    assert _decide_from_records([unchanged], newest_other) == ([unchanged], [(("matched", ""), 1)])
    newest_same = [_previous(same=False, run=("t1", "r1")), _previous(run=("t2", "r2"))]
    [skipped], _ = _decide_from_records([unchanged], newest_same)
    assert skipped.tag == "skipped" and skipped.value == unchanged._replace(previous=newest_same[1].row)


@pytest.mark.parametrize("listed, expected", [
    (SourceFile("a.png", 10, 2.0), ("s", True)),  # touched: hashed, skipped if equal
    (SourceFile("a.png"), ("s", True)),  # named by a list: hashed
    (SourceFile("a.png", 11, 1.0), (None, False)),  # other size: read
])
def test_from_records_a_file_that_may_be_unchanged_is_read_with_its_earlier_hash(listed, expected):
    [read], _ = _decide_from_records([listed], [_previous()])
    assert isinstance(read, SourceFile) and read.path == "a.png"
    assert (read.previous_sha256, read.previous is not None) == expected


def test_from_records_a_new_path_is_read_and_a_deleted_one_is_not_counted():
    files = [SourceFile("a.png"), SourceFile("a.png", 10, 1.0)]
    assert _decide_from_records(files, []) == ([files[1]], [(("matched", ""), 1)])
    assert _decide_from_records([], [_previous()]) == ([], [])


def test_select_changed_without_a_catalog_reads_every_earlier_runs_records(tmp_path):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    lines = {old: [caption_record("/in/a.png", run_id="r1", model="other"), caption_record("/in/b.png", run_id="r1"),
                   caption_record("/in/gone.png")],
             new: [caption_record("/in/a.png", run_id="r2"), "{torn line",
                   caption_record("/in/b.png", run_id="r2", model="other")]}
    for path, records in lines.items():
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    listed = [SourceFile("/in/a.png", 10, 1.0), SourceFile("/in/b.png", 10, 1.0), SourceFile("/in/c.png", 10, 1.0)]
    with BeamTestPipeline() as p:
        out = p | beam.Create(listed) | select.SelectChanged(
            [], SETTINGS, legacy_caption_files=[str(old), str(new)], end_times={"r1": "t1", "r2": "t2"})
        assert_that(out["files"], equal_to([listed[1], listed[2]]), label="Files")
        assert_that(out["skipped"] | beam.Map(lambda f: (f.path, f.previous["captioned_run"])),
                    equal_to([("/in/a.png", "r2")]), label="Skipped")
        assert_that(out["tallies"] | beam.CombinePerKey(sum), equal_to([(("matched", ""), 3)]), label="Tallies")
        assert_that(out["carry"], equal_to([]), label="Carry")
