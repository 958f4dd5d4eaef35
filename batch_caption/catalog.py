"""The catalog contract: the whole archive as of one run, one Parquet row per live path.

Every complete run writes `catalog-SSSSS-of-NNNNN.parquet` in its run directory: a row
for each input path that existed at that run, captioned (or failed) in this run or
carried forward from an earlier one. Deleted files drop out. The newest complete run's
catalog alone answers "the current caption of every image"; --incremental reads it, and
only it, to decide what to read again.

Columns (schema()): path, path_bytes, size, modified, sha256, status (captioned |
failed), caption, score, flags (the caption's quality flags), width, height (as
displayed), model, decode (the beam settings as JSON), captioned_run (the run that
produced the caption or error), stage, error, message. A failed row has no caption,
score, flags, width or height. Rows carried from a catalog written before flags, width
and height existed hold nulls there (conform()).

Paths that are not valid UTF-8 (local files named in Latin-1, say) are held in Python as
str with surrogate escapes (os.fsdecode). Parquet strings must be UTF-8, so such a row's
`path` is a display form (undecodable bytes as \\xNN) and `path_bytes` holds the exact
bytes; `path_bytes` is null for every other row. path_of(row) gives back the str.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

CATALOG_PREFIX = "catalog"
ROW_GROUP_ROWS = 50_000

COLUMNS = (
    "path", "path_bytes", "size", "modified", "sha256", "status", "caption", "score", "flags", "width", "height",
    "model", "decode", "captioned_run", "stage", "error", "message",
)
# Columns that catalogs of format batch_caption.run/2 lack: `conform` gives them as nulls.
ADDED_COLUMNS = ("flags", "width", "height")
# What --incremental needs of an earlier row to decide whether to read a file again.
DECISION_COLUMNS = ("path", "path_bytes", "size", "modified", "sha256", "status", "model", "decode")


def schema():
    """The catalog's Arrow schema (pyarrow is imported only by code that reads or writes)."""
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()),
        ("path_bytes", pa.binary()),
        ("size", pa.int64()),
        ("modified", pa.float64()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float64()),
        ("flags", pa.list_(pa.string())),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("model", pa.string()),
        ("decode", pa.string()),
        ("captioned_run", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("message", pa.string()),
    ])


def conform(table):
    """An Arrow table of catalog rows, maybe from an older catalog -> the table in this
    schema: columns in its order, the ones the old file lacks as nulls."""
    import pyarrow as pa

    target = schema()
    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in target]
    return pa.Table.from_arrays(columns, names=target.names).cast(target)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(text: str | None) -> str | None:
    """`text` with undecodable bytes (surrogate escapes) shown as \\xNN."""
    if text is None or is_utf8(text):
        return text
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def path_columns(path: str) -> tuple[str, bytes | None]:
    """-> (path, path_bytes) for a row: the exact bytes only when the path is not UTF-8."""
    if is_utf8(path):
        return path, None
    return utf8_text(path), os.fsencode(path)


def path_of(row: dict[str, Any]) -> str:
    """A row's path as the str the job uses (surrogate escapes for non-UTF-8 bytes)."""
    raw = row.get("path_bytes")
    return os.fsdecode(raw) if raw is not None else row["path"]


def decode_key(decode: dict[str, Any] | str | None) -> str:
    """The beam settings in one canonical JSON string (the `decode` column)."""
    if decode is None:
        return ""
    if isinstance(decode, str):
        decode = json.loads(decode)
    return json.dumps(decode, sort_keys=True, separators=(",", ":"))


def captioned_row(record: dict[str, Any], size: int | None) -> dict[str, Any]:
    """Caption record of this run (records.caption_record) -> its catalog row."""
    path, raw = path_columns(record["path"])
    return {
        "path": path, "path_bytes": raw, "size": size if size is not None else record.get("bytes"),
        "modified": record.get("modified"), "sha256": record.get("sha256"), "status": "captioned",
        "caption": record["caption"], "score": record["score"], "flags": list(record.get("flags") or []),
        "width": record.get("width"), "height": record.get("height"), "model": record["model"],
        "decode": decode_key(record.get("decode")), "captioned_run": record["run_id"],
        "stage": None, "error": None, "message": None,
    }


def failed_row(record: dict[str, Any], size: int | None, modified: float | None, sha256: str | None,
               model: str, decode: dict[str, Any] | str) -> dict[str, Any]:
    """Error record of this run (records.error_record) -> its catalog row. A failed file
    keeps the model and decode settings it failed under: a change of either retries it."""
    path, raw = path_columns(record["path"])
    return {
        "path": path, "path_bytes": raw, "size": size, "modified": modified, "sha256": sha256,
        "status": "failed", "caption": None, "score": None, "flags": None, "width": None, "height": None,
        "model": model, "decode": decode_key(decode),
        "captioned_run": record["run_id"], "stage": record["stage"], "error": record["error"],
        "message": utf8_text(record["message"]),
    }


class RowWriter:
    """Streams rows into Parquet on the open binary stream `f`, ROW_GROUP_ROWS at a time,
    so memory holds one row group at most. close() writes a valid file even with no rows."""

    def __init__(self, f):
        import pyarrow.parquet as pq

        self._schema = schema()
        # Page checksums: a later run's check (storage/run_dirs.check_catalog) finds a damaged page.
        self._writer = pq.ParquetWriter(f, self._schema, compression="zstd", write_page_checksum=True)
        self._batch: list[dict[str, Any]] = []
        self.rows = 0

    def write(self, row) -> None:
        """One row (a dict), or a pyarrow Table of rows with this schema."""
        with self._failing_abandons():
            if isinstance(row, dict):
                self._batch.append(row)
                if len(self._batch) >= ROW_GROUP_ROWS:
                    self._flush()
                return
            if self._batch:
                self._flush()
            self._writer.write_table(row)
            self.rows += row.num_rows

    @contextlib.contextmanager
    def _failing_abandons(self):
        """A write or close that fails (a full disk) leaves the file unfinished for good:
        pyarrow's writer is marked closed, so that its __del__ does not try to write the
        footer again, later, into a closed stream (a traceback after the run's error)."""
        try:
            yield
        except BaseException:
            self._writer.is_open = False
            self._batch = []
            raise

    def _flush(self) -> None:
        import pyarrow as pa

        self._writer.write_table(pa.Table.from_pylist(self._batch, schema=self._schema))
        self.rows += len(self._batch)
        self._batch = []

    def close(self) -> None:
        with self._failing_abandons():
            if self._batch or self.rows == 0:
                self._flush()
            self._writer.close()

    def abandon(self) -> None:
        """Leaves the file unfinished (its bundle failed): nothing more is written."""
        self._writer.is_open = False
        self._batch = []


def write_rows(f, rows: Iterable[dict[str, Any]]) -> int:
    """Writes rows as Parquet into the open binary stream `f`; -> the number of rows."""
    writer = RowWriter(f)
    for row in rows:
        writer.write(row)
    writer.close()
    return writer.rows


def read_rows(f, columns: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of one catalog file (an open binary stream), a row group at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(f)
    names = list(columns) if columns is not None else None
    for i in range(parquet.num_row_groups):
        yield from parquet.read_row_group(i, columns=names).to_pylist()
