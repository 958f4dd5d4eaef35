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


def test_caption_rows_carry_flags_and_size_failed_rows_nulls():
    row = catalog.captioned_row({**_caption("/p"), "flags": ["low_score"], "width": 640, "height": 480}, size=1)
    failed = catalog.failed_row({"path": "/q", "stage": "read", "error": "E", "message": "m", "run_id": "r1"},
                                None, None, None, "m1", DECODE)
    buf = io.BytesIO()
    catalog.write_rows(buf, [row, failed])
    buf.seek(0)
    back = list(catalog.read_rows(buf, ["flags", "width", "height", "score"]))
    assert back == [{"flags": ["low_score"], "width": 640, "height": 480, "score": -0.5},
                    {"flags": None, "width": None, "height": None, "score": None}]


def _old_catalog(path, rows) -> None:
    """A catalog file as written before flags, width and height existed."""
    import pyarrow as pa

    old = pa.schema([f for f in catalog.schema() if f.name not in ("flags", "width", "height")])
    pq.write_table(pa.Table.from_pylist(rows, schema=old), path)


def test_rows_of_an_older_catalog_conform_with_nulls(tmp_path):
    _old_catalog(tmp_path / "old.parquet", [catalog.captioned_row(_caption("/a"), size=3)])
    table = catalog.conform(pq.read_table(tmp_path / "old.parquet"))
    assert table.schema.equals(catalog.schema())
    [row] = table.to_pylist()
    assert (row["path"], row["caption"], row["flags"], row["width"], row["height"]) == ("/a", "a red circle", None,
                                                                                        None, None)


def test_an_incremental_run_carries_rows_of_an_older_catalog(tiny_bundle, tmp_path):
    import json

    from helpers import varied_images
    from PIL import Image

    from batch_caption import run

    src, out = tmp_path / "archive", str(tmp_path / "out")
    src.mkdir()
    for i, px in enumerate(varied_images(2, 64)):
        Image.fromarray(px).save(src / f"{i}.png")
    base = ["--input", str(src), "--output", out, "--model", tiny_bundle, "--incremental"]
    run.run(base + ["--run_id", "r1"])
    manifest = json.loads(open(os.path.join(out, "run=r1", "manifest.json")).read())
    for name in manifest["files"]["catalog"]:  # rewrite r1's catalog as an older version wrote it
        path = os.path.join(out, "run=r1", name)
        _old_catalog(path, pq.read_table(path).to_pylist())
    Image.fromarray(varied_images(1, 64, seed=5)[0]).save(src / "new.png")
    second = run.run(base + ["--run_id", "r2"])
    assert (second["counts"]["carried"], second["counts"]["captioned"]) == (2, 1)
    files = json.loads(open(os.path.join(out, "run=r2", "manifest.json")).read())["files"]["catalog"]
    table = pq.read_table([os.path.join(out, "run=r2", n) for n in files], partitioning=None)
    rows = {os.path.basename(r["path"]): r for r in table.to_pylist()}
    assert rows["0.png"]["caption"] and rows["0.png"]["width"] is None and rows["0.png"]["flags"] is None
    assert (rows["new.png"]["width"], rows["new.png"]["height"]) == (64, 64) and rows["new.png"]["flags"] is not None
