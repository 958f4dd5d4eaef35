"""BuildCatalog: this run's records and the skipped files' earlier rows -> catalog rows.

A row per live input path: a caption record or an error record of a file (not of a
pattern) of this run becomes a new row (a dict); a skipped file carries its earlier row
forward, with the mtime it has now (a touched file whose content was unchanged). Earlier
rows are referenced, not shuffled: the references are grouped by catalog file, and each
group reads just its rows back from that file, as Arrow tables.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np

from batch_caption import catalog
from batch_caption.core.elements import CatalogRef, SourceFile, counter
from batch_caption.storage import gcs

# BuildCatalog's outputs, the catalog's rows by where they come from.
ROWS = ("captioned_rows", "carried_rows", "failed_rows", "inline_rows")


class _CarryFromCatalogFn(beam.DoFn):
    """(file index, [(row numbers, mtimes now)]) -> those rows of that catalog file, as
    Arrow tables of at most catalog.ROW_GROUP_ROWS rows (never one element per row)."""

    def __init__(self, catalog_files: list[str]):
        self._files = catalog_files

    def setup(self):
        gcs.configure_for_emulator()
        self._carried = counter("carried")

    def process(self, item):
        from apache_beam.io.filesystems import FileSystems

        index, parts = item
        parts = list(parts)
        rows = np.concatenate([r for r, _ in parts])
        mtimes = np.concatenate([m for _, m in parts])
        order = np.argsort(rows, kind="stable")
        rows, mtimes = rows[order], mtimes[order]
        with FileSystems.open(self._files[index], compression_type="uncompressed") as f:
            for table in _tables_at(f, rows, mtimes):
                self._carried.inc(table.num_rows)
                yield table


def _tables_at(f, rows: np.ndarray, mtimes: np.ndarray):
    """The rows at the sorted row numbers `rows` of one Parquet catalog file, their
    `modified` set to `mtimes` where those are known; a row group at a time, reading only
    the groups that hold one of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(f)
    start = 0
    for group in range(parquet.num_row_groups):
        end = start + parquet.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(rows, start), np.searchsorted(rows, end)
        if hi > lo:
            table = parquet.read_row_group(group).take(pa.array(rows[lo:hi] - start))
            now = mtimes[lo:hi]
            old = table.column("modified").to_numpy(zero_copy_only=False)
            modified = np.where(np.isnan(now), old, now)
            table = table.set_column(table.schema.get_field_index("modified"), "modified", pa.array(modified))
            yield catalog.conform(table)
        start = end


def _split_skips(f: SourceFile):
    """A file skipped after reading -> (catalog file index, (row numbers, mtimes)), or its
    inline row (tag 'inline': outputs written without catalogs)."""
    if isinstance(f.previous, CatalogRef):
        mtime = np.nan if f.modified is None else f.modified
        yield f.previous.file, (np.array([f.previous.row], np.int64), np.array([mtime], np.float64))
    elif f.previous is not None:
        counter("carried").inc()
        yield beam.pvalue.TaggedOutput("inline", _touched(f.previous, f.modified))


def _touched(row: dict[str, Any], modified: float | None) -> dict[str, Any]:
    if modified is not None and modified != row.get("modified"):
        row = {**row, "modified": modified}
    return row


def _failed_row(record, model: str, decode: dict[str, Any]):
    """Error record of one file -> its row; a match error (a pattern or directory) has none."""
    if record["stage"] == "match":
        return
    yield catalog.failed_row(record, record.get("bytes"), record.get("modified"), record.get("sha256"), model, decode)


class BuildCatalog(beam.PTransform):
    """{"captions", "errors", "skipped", "carry"} -> {ROWS}: the catalog's rows by where
    they come from (dicts of catalog.COLUMNS, or Arrow tables of carried rows), each
    written by a writer of its own.

    Args:
      catalog_files: the earlier catalog's files, which CatalogRef.file indexes.
      model, decode: this run's model id and decode settings (a failed file's row keeps
        them, so that a change of either tries it again).
    """

    def __init__(self, catalog_files, model: str, decode: dict[str, Any]):
        super().__init__()
        self._catalog = list(catalog_files)
        self._model = model
        self._decode = dict(decode)

    def expand(self, outputs):
        """outputs: {"captions", "errors", "skipped" (SourceFiles), "carry" (batched refs)}."""
        new = (
            outputs["captions"] | "CaptionRows" >> beam.Map(lambda r: catalog.captioned_row(r, r.get("bytes"))),
            outputs["errors"] | "FailedRows" >> beam.FlatMap(_failed_row, self._model, self._decode),
        )
        skips = outputs["skipped"] | "SplitSkips" >> beam.FlatMap(_split_skips).with_outputs("inline", main="refs")
        carried = (
            (skips.refs, outputs["carry"])
            | "FlattenCarried" >> beam.Flatten()
            | "GroupByCatalogFile" >> beam.GroupByKey()
            | "CarryRows" >> beam.ParDo(_CarryFromCatalogFn(self._catalog))
        )
        return {"captioned_rows": new[0], "failed_rows": new[1], "carried_rows": carried, "inline_rows": skips.inline}
