"""BuildCatalog: this run's records and the skipped files' earlier rows -> catalog rows.

A row per live input path: a caption record or an error record of a file (not of a
pattern) of this run becomes a new row; a skipped file carries its earlier row forward,
with the mtime it has now (a touched file whose content was unchanged). Earlier rows are
referenced, not shuffled: the skips are grouped by catalog file, and each group reads
just its rows back from that file.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from batch_caption import catalog, gcs
from batch_caption.job.elements import CatalogRef, SourceFile, counter


class _CarryFromCatalogFn(beam.DoFn):
    """(file index, [(row number, mtime now)]) -> those rows of that catalog file."""

    def __init__(self, catalog_files: list[str]):
        self._files = catalog_files

    def setup(self):
        gcs.configure_for_emulator()
        self._carried = counter("carried")

    def process(self, item):
        from apache_beam.io.filesystems import FileSystems

        index, wanted = item
        mtimes = dict(wanted)
        with FileSystems.open(self._files[index], compression_type="uncompressed") as f:
            for number, row in _rows_at(f, sorted(mtimes)):
                self._carried.inc()
                yield _touched(row, mtimes[number])


def _rows_at(f, numbers: list[int]):
    """(row number, row) of one Parquet catalog file for the sorted row `numbers`, read a
    row group at a time and only for the groups that hold one of them."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(f)
    start, i = 0, 0
    for group in range(parquet.num_row_groups):
        end = start + parquet.metadata.row_group(group).num_rows
        local = []
        while i < len(numbers) and numbers[i] < end:
            local.append(numbers[i] - start)
            i += 1
        if local:
            rows = parquet.read_row_group(group).take(local).to_pylist()
            yield from zip((start + n for n in local), rows)
        start = end


def _touched(row: dict[str, Any], modified: float | None) -> dict[str, Any]:
    if modified is not None and modified != row.get("modified"):
        row = {**row, "modified": modified}
    return row


def _split_skips(f: SourceFile):
    """A skipped file -> (catalog file index, (row number, mtime)), or its inline row
    (tag 'inline': outputs written without catalogs)."""
    if isinstance(f.previous, CatalogRef):
        yield f.previous.file, (f.previous.row, f.modified)
    elif f.previous is not None:
        counter("carried").inc()
        yield beam.pvalue.TaggedOutput("inline", _touched(f.previous, f.modified))


def _failed_row(record, model: str, decode: dict[str, Any]):
    """Error record of one file -> its row; a match error (a pattern or directory) has none."""
    if record["stage"] == "match":
        return
    yield catalog.failed_row(record, record.get("bytes"), record.get("modified"), record.get("sha256"), model, decode)


class BuildCatalog(beam.PTransform):
    """{"captions", "errors", "skipped"} -> catalog rows (dicts, catalog.COLUMNS).

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
        new = (
            outputs["captions"] | "CaptionRows" >> beam.Map(lambda r: catalog.captioned_row(r, r.get("bytes"))),
            outputs["errors"] | "FailedRows" >> beam.FlatMap(_failed_row, self._model, self._decode),
        )
        skips = outputs["skipped"] | "SplitSkips" >> beam.FlatMap(_split_skips).with_outputs("inline", main="refs")
        carried = (
            skips.refs
            | "GroupByCatalogFile" >> beam.GroupByKey()
            | "CarryRows" >> beam.ParDo(_CarryFromCatalogFn(self._catalog))
        )
        return (*new, carried, skips.inline) | "FlattenRows" >> beam.Flatten()
