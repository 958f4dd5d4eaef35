"""The catalog contract: rows from records, Parquet round trips, non-UTF-8 paths."""

from __future__ import annotations

import io
import os

import pyarrow.parquet as pq

from batch_caption import catalog

DECODE = {"beam_size": 3, "max_length": 20, "num_alternatives": 2, "length_normalization": 0.7}


def _caption(path, run_id="r1"):
    return {"path": path, "modified": 5.0, "caption": "a red circle", "score": -0.5, "bytes": 10,
            "sha256": "ab" * 32, "model": "m1", "run_id": run_id, "decode": DECODE}


def test_rows_round_trip_through_parquet_with_a_latin1_path():
    latin1 = os.fsdecode(b"caf\xe9.png")
    rows = [
        catalog.captioned_row(_caption("/a/x.png"), size=10),
        catalog.captioned_row(_caption(latin1), size=10),
        catalog.failed_row({"path": "/a/bad.jpg", "stage": "decode", "error": "TruncatedImageError",
                            "message": "cut short", "run_id": "r1"}, 7, 3.0, "cd" * 32, "m1", DECODE),
    ]
    buf = io.BytesIO()
    assert catalog.write_rows(buf, rows) == 3
    buf.seek(0)
    back = list(catalog.read_rows(buf))
    assert [catalog.path_of(r) for r in back] == ["/a/x.png", latin1, "/a/bad.jpg"]
    assert back[1]["path"] == "caf\\xe9.png" and back[1]["path_bytes"] == b"caf\xe9.png"
    assert back[0]["path_bytes"] is None
    assert back[2]["status"] == "failed" and back[2]["caption"] is None and back[2]["stage"] == "decode"
    assert back[0]["decode"] == catalog.decode_key(DECODE) == catalog.decode_key(catalog.decode_key(DECODE))
    buf.seek(0)
    table = pq.read_table(buf)
    assert table.schema.equals(catalog.schema())


def test_empty_catalog_is_a_valid_file_and_columns_can_be_chosen():
    buf = io.BytesIO()
    assert catalog.write_rows(buf, []) == 0
    buf.seek(0)
    assert pq.read_table(buf).num_rows == 0
    buf = io.BytesIO()
    catalog.write_rows(buf, [catalog.captioned_row(_caption("/p"), size=1)])
    buf.seek(0)
    assert list(catalog.read_rows(buf, ["path", "status"])) == [{"path": "/p", "status": "captioned"}]


def test_row_groups_split_large_catalogs(monkeypatch):
    monkeypatch.setattr(catalog, "ROW_GROUP_ROWS", 4)
    buf = io.BytesIO()
    assert catalog.write_rows(buf, (catalog.captioned_row(_caption(f"/p{i}"), size=1) for i in range(10))) == 10
    buf.seek(0)
    assert pq.ParquetFile(buf).num_row_groups == 3
    buf.seek(0)
    assert [r["path"] for r in catalog.read_rows(buf)] == [f"/p{i}" for i in range(10)]
