"""BuildCatalog: this run's records and the skipped files' earlier rows -> the catalog's rows."""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from helpers import caption_record, write_catalog

from batch_caption import catalog, records
from batch_caption.core.elements import CatalogRef, SourceFile
from batch_caption.pipeline import ERRORS, carry

DECODE = {"beam_size": 3}


def _rows(prefix, n):
    """n caption rows of /in/PREFIX<i>.png, the i-th modified at i seconds."""
    return [catalog.captioned_row(caption_record(f"/in/{prefix}{i}.png", modified=float(i), sha256=f"s{i}"), None)
            for i in range(n)]


def test_carried_rows_are_read_back_in_row_order_with_the_mtimes_they_have_now(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "ROW_GROUP_ROWS", 2)  # row groups: 0-1, 2-3, 4
    rows = _rows("a", 5)
    path = write_catalog(tmp_path / "catalog.parquet", rows)
    fn = carry._CarryFromCatalogFn([str(tmp_path / "other.parquet"), path])
    fn.setup()
    # Two batches of references, out of order; nan: the row keeps its mtime.
    refs = [(np.array([4, 0]), np.array([np.nan, 9.0])), (np.array([1]), np.array([7.0]))]
    tables = list(fn.process((1, iter(refs))))
    assert [t.num_rows for t in tables] == [2, 1]  # the middle group holds none of them
    assert all(t.schema == catalog.schema() for t in tables)
    assert [r for t in tables for r in t.to_pylist()] == [{**rows[0], "modified": 9.0}, {**rows[1], "modified": 7.0},
                                                          rows[4]]


def test_rows_carried_from_an_older_catalog_take_this_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = catalog.schema()
    old = pa.schema([f for f in old if f.name not in catalog.ADDED_COLUMNS])  # before flags, width, height
    rows = [{k: v for k, v in r.items() if k in old.names} for r in _rows("a", 2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=old), tmp_path / "old.parquet")
    fn = carry._CarryFromCatalogFn([str(tmp_path / "old.parquet")])
    fn.setup()
    [table] = fn.process((0, [(np.array([1]), np.array([np.nan]))]))
    assert table.schema == catalog.schema()
    assert table.to_pylist() == [{**rows[1], "flags": None, "width": None, "height": None}]


def test_a_skipped_file_becomes_a_row_reference_or_its_inline_row():
    [(index, (at, mtimes))] = carry._split_skips(SourceFile("/in/a.png", 10, 5.0, "s", CatalogRef(3, 8)))
    assert (index, at.tolist(), mtimes.tolist()) == (3, [8], [5.0])
    [(_, (_, unknown))] = carry._split_skips(SourceFile("/in/a.png", None, None, "s", CatalogRef(3, 8)))
    assert math.isnan(unknown[0])  # the row keeps its mtime

    row = _rows("b", 1)[0]  # modified 0.0
    [same] = carry._split_skips(SourceFile("/in/b0.png", 10, 0.0, "s0", row))
    [touched] = carry._split_skips(SourceFile("/in/b0.png", 10, 6.0, "s0", row))
    [listed] = carry._split_skips(SourceFile("/in/b0.png", None, None, "s0", row))
    assert all(isinstance(o, TaggedOutput) and o.tag == "inline" for o in (same, touched, listed))
    assert same.value == row and listed.value == row
    assert touched.value == {**row, "modified": 6.0} and row["modified"] == 0.0  # a copy: the row is not changed
    assert list(carry._split_skips(SourceFile("/in/c.png", 10, 1.0))) == []  # nothing to carry


def test_a_files_error_becomes_a_failed_row_under_this_runs_settings_and_a_patterns_none():
    record = records.error_record("/in/bad.png", "decode", "TruncatedImageError", "cut short", run_id="r1", size=4,
                                  modified=2.0, sha256="ab")
    [row] = carry._failed_row(record, "m", DECODE)
    assert set(row) == set(catalog.COLUMNS)
    assert {k: row[k] for k in ("path", "size", "modified", "sha256", "status", "stage", "error", "message")} == {
        "path": "/in/bad.png", "size": 4, "modified": 2.0, "sha256": "ab", "status": "failed", "stage": "decode",
        "error": "TruncatedImageError", "message": "cut short"}
    assert (row["model"], row["decode"], row["captioned_run"]) == ("m", catalog.decode_key(DECODE), "r1")
    pattern = records.error_record("/in/missing/*.png", "match", "FileNotFoundError", run_id="r1")
    assert list(carry._failed_row(pattern, "m", DECODE)) == []


def _path_and_mtime(rows):
    return [(catalog.path_of(r), r["modified"]) for r in rows]


def test_build_catalog_gives_every_row_by_where_it_comes_from(tmp_path):
    first = write_catalog(tmp_path / "catalog-0.parquet", _rows("a", 3))
    second = write_catalog(tmp_path / "catalog-1.parquet", _rows("b", 2))
    inline = catalog.captioned_row(caption_record("/in/old.png", run_id="old"), None)
    with BeamTestPipeline() as p:
        outputs = {
            "captions": p | "Captions" >> beam.Create([caption_record("/in/new.png", run_id="r1", bytes=12)]),
            ERRORS: p | "Errors" >> beam.Create([
                records.error_record("/in/bad.png", "decode", "E", run_id="r1", size=3, modified=1.0),
                records.error_record("/in/gone/*", "match", "E", run_id="r1")]),
            "skipped": p | "Skipped" >> beam.Create([SourceFile("/in/b1.png", 10, 8.0, "s1", CatalogRef(1, 1)),
                                                     SourceFile("/in/old.png", 10, 4.0, "s", inline)]),
            "carry": p | "Carry" >> beam.Create([(0, (np.array([2, 0]), np.array([np.nan, np.nan]))),
                                                 (1, (np.array([0]), np.array([np.nan])))]),
        }
        rows = outputs | carry.BuildCatalog([first, second], "m", DECODE)
        assert sorted(rows) == sorted(carry.ROWS)
        assert_that(rows["captioned_rows"] | "C" >> beam.Map(lambda r: (r["path"], r["size"], r["status"])),
                    equal_to([("/in/new.png", 12, "captioned")]), label="Captioned")
        assert_that(rows["failed_rows"] | "F" >> beam.Map(lambda r: (r["path"], r["stage"], r["size"], r["model"])),
                    equal_to([("/in/bad.png", "decode", 3, "m")]), label="Failed")
        assert_that(rows["carried_rows"] | "T" >> beam.FlatMap(lambda t: _path_and_mtime(t.to_pylist())),
                    equal_to([("/in/a0.png", 0.0), ("/in/a2.png", 2.0), ("/in/b0.png", 0.0), ("/in/b1.png", 8.0)]),
                    label="Carried")
        assert_that(rows["inline_rows"] | "I" >> beam.Map(lambda r: (r["path"], r["modified"], r["captioned_run"])),
                    equal_to([("/in/old.png", 4.0, "old")]), label="Inline")
