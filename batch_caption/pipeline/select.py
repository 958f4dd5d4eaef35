"""SelectChanged (incremental runs): SourceFiles -> those to read; the rest skipped unread.

The listing is joined by path with the newest complete run's catalog, of which only what
the decision needs travels (size, mtime, sha256, failed, same settings, the row's place).
Per path:

    not listed now                       deleted: counted, drops out of the catalog
    ... under a directory whose listing  unlisted: counted, its row carried unchanged (the
        failed                           file is unknown, not gone)
    listed, but not an input (the image  a caption's row carried unchanged, counted as
        filter, image_files.py)      carried_not_image; a failed row drops out
    no earlier row                       read (new)
    other model or decode settings       read (re-caption)
    same size and mtime                  skipped unread; a failed file too, unless
                                         --retry_failed
    same size (or unknown), other mtime  read and hashed: equal content is skipped after
                                         reading, and the new mtime is recorded
    other size                           read

The join runs on batches: both sides are cut into `partitions` by a hash of the path and
each partition is joined in memory, so a night over millions of unchanged files moves
thousands of elements through the runner, not millions. A skipped file carries its
earlier row forward by reference (carry.py). Outputs written before catalogs existed
are read once from their caption records instead, file by file.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np

from batch_caption import catalog
from batch_caption.core.elements import CatalogRef, SourceFile, counter, path_key
from batch_caption.pipeline import progress
from batch_caption.pipeline.match import best_known
from batch_caption.pipeline.tallies import TAG, TallyFn
from batch_caption.storage import gcs

BATCH_FILES = 4096  # files per element on the listing side of the join


class Settings(NamedTuple):
    """This run's model and decode settings, as the catalog stores them."""

    model: str
    decode: str  # catalog.decode_key
    any_model: bool = False

    def match(self, model: str | None, decode: str | None) -> bool:
        return (self.any_model or model == self.model) and decode == self.decode


def partition_of(key: bytes, partitions: int) -> int:
    return zlib.crc32(key) % partitions


def partitions_for(rows: int) -> int:
    """Partitions of the join for a catalog of `rows` rows: ~16k rows each, 8 to 4096."""
    return max(8, min(4096, rows // 16384 + 1))


class CatalogPart(NamedTuple):
    """The rows of one catalog file that fall into one partition, as columns."""

    file: int
    rows: np.ndarray  # int64 row numbers in the file
    keys: list  # path keys (bytes)
    size: np.ndarray  # int64, -1: unknown
    modified: np.ndarray  # float64, nan: unknown
    sha256: list
    failed: np.ndarray  # bool
    same_settings: np.ndarray  # bool


class _ReadCatalogFn(beam.DoFn):
    """(file index, catalog file) -> (partition, CatalogPart), a row group at a time."""

    def __init__(self, settings: Settings, partitions: int):
        self._settings = settings
        self._partitions = partitions

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, item):
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        index, path = item
        with FileSystems.open(path, compression_type="uncompressed") as f:
            parquet = pq.ParquetFile(f)
            start = 0
            for group in range(parquet.num_row_groups):
                cols = parquet.read_row_group(group, columns=list(catalog.DECISION_COLUMNS)).to_pydict()
                n = len(cols["path"])
                keys = [path_key(catalog.path_of({"path": p, "path_bytes": b}))
                        for p, b in zip(cols["path"], cols["path_bytes"])]
                parts = np.fromiter((partition_of(k, self._partitions) for k in keys), np.int64, n)
                same = np.fromiter((self._settings.match(m, d) for m, d in zip(cols["model"], cols["decode"])), bool, n)
                size = np.array([-1 if s is None else s for s in cols["size"]], np.int64)
                modified = np.array([np.nan if m is None else m for m in cols["modified"]], np.float64)
                failed = np.array([s == "failed" for s in cols["status"]], bool)
                for p in np.unique(parts):
                    at = np.flatnonzero(parts == p)
                    yield int(p), CatalogPart(index, at + start, [keys[i] for i in at], size[at], modified[at],
                                              [cols["sha256"][i] for i in at], failed[at], same[at])
                start += n


class _BatchByPartitionFn(beam.DoFn):
    """SourceFile -> (partition, (path keys, sizes, mtimes)): up to BATCH_FILES files as
    three lists of plain values, which Beam's coder writes without pickling each file."""

    def __init__(self, partitions: int):
        self._partitions = partitions

    def start_bundle(self):
        self._buffers: dict[int, tuple[list, list, list]] = {}

    def process(self, f: SourceFile):
        key = path_key(f.path)
        p = partition_of(key, self._partitions)
        keys, sizes, mtimes = self._buffers.setdefault(p, ([], [], []))
        keys.append(key)
        sizes.append(f.size)
        mtimes.append(f.modified)
        if len(keys) >= BATCH_FILES:
            yield p, self._buffers.pop(p)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for p, batch in self._buffers.items():
            yield WindowedValue((p, batch), 0, [GlobalWindow()])
        self._buffers = {}


def _listed(batches) -> dict[bytes, SourceFile]:
    """The files of a partition's batches, one per path (the best known of repeats)."""
    listed: dict[bytes, SourceFile] = {}
    for keys, sizes, mtimes in batches:
        for key, size, mtime in zip(keys, sizes, mtimes):
            f = SourceFile(key.decode("utf-8", "surrogateescape"), size, mtime)
            seen = listed.get(key)
            listed[key] = f if seen is None else best_known((seen, f))
    return listed


class _DecidePartitionFn(TallyFn):
    """(partition, {files: [file batches], previous: [CatalogPart], not_image: [file
    batches]}) -> the files to read; tag 'carry': (catalog file index, (row numbers,
    mtimes now)) of the skipped files; tag 'tallies': matched, skipped and deleted counts."""

    def __init__(self, retry_failed: bool, report_progress: bool):
        self._retry_failed = retry_failed
        self._report = report_progress

    def process(self, item, unlistable=()):
        _, grouped = item
        listed = _listed(grouped["files"])
        not_image = {key for keys, _, _ in grouped.get("not_image", ()) for key in keys}
        unknown = _under(unlistable)
        carried: dict[int, tuple[list, list]] = {}
        skipped = deleted = unlisted = kept = n_read = 0
        for part in grouped["previous"]:
            for i, key in enumerate(part.keys):
                f = listed.pop(key, None)
                if f is None and key in not_image:  # there, but not an input tonight
                    # A caption is kept, so that a narrower filter forgets nothing; an
                    # error's row drops out, as the file is not an input.
                    if part.failed[i]:
                        continue
                    kept += 1
                    mtime = float("nan")  # the row keeps its mtime: a change is read once it is an input
                elif f is None and unknown(key):  # not seen, but not known to be gone
                    unlisted += 1
                    mtime = float("nan")  # the row keeps its mtime
                elif f is None:
                    deleted += 1
                    continue
                else:
                    decision = self._decide(f, part, i)
                    if decision is not None:
                        n_read += 1
                        yield decision
                        continue
                    skipped += 1
                    mtime = f.modified
                rows, mtimes = carried.setdefault(part.file, ([], []))
                rows.append(int(part.rows[i]))
                mtimes.append(mtime)
        for f in listed.values():  # no earlier row: new
            n_read += 1
            yield f
        for index, (rows, mtimes) in carried.items():
            yield beam.pvalue.TaggedOutput("carry", (index, (np.array(rows, np.int64), np.array(mtimes, np.float64))))
        self.tally("matched", skipped + n_read)
        counter("matched").inc(skipped + n_read)
        self.tally("skipped", skipped)
        self.tally("deleted", deleted)
        self.tally("unlisted", unlisted)
        self.tally("carried_not_image", kept)
        counter("skipped").inc(skipped)
        counter("deleted").inc(deleted)
        counter("unlisted").inc(unlisted)
        if self._report and skipped:
            progress.reporter().add(skipped, "skipped")

    def _decide(self, f: SourceFile, part: CatalogPart, i: int) -> SourceFile | None:
        """None: skip (carry the row); else the file to read, with what to compare."""
        if not part.same_settings[i] or (part.failed[i] and self._retry_failed):
            return f
        size = int(part.size[i]) if part.size[i] >= 0 else None
        modified = None if np.isnan(part.modified[i]) else float(part.modified[i])
        if f.size is not None and f.size == size and f.modified is not None and f.modified == modified:
            return None
        ref = CatalogRef(part.file, int(part.rows[i]))
        if f.size is None or f.size == size:
            return f._replace(previous_sha256=part.sha256[i], previous=ref)
        return f


def _under(paths):
    """path key -> whether it is one of `paths` or lies under one (they are what a
    listing could not read: directories, or entries that failed while listed)."""
    exact = {path_key(p) for p in paths}
    prefixes = tuple(path_key(p.rstrip("/" + os.sep) + os.sep) for p in paths)
    return lambda key: bool(exact) and (key in exact or key.startswith(prefixes))


class Previous(NamedTuple):
    """An earlier caption record, for outputs written without catalogs."""

    size: int | None
    modified: float | None
    sha256: str | None
    same_settings: bool
    row: dict[str, Any]  # the catalog row it becomes
    rank: tuple  # (run end time, run id): the newest record wins


class _ParseCaptionRecordFn(beam.DoFn):
    """Caption JSONL line of a run written without a catalog -> (path key, Previous)."""

    def __init__(self, settings: Settings, end_times: dict[str, str]):
        self._settings = settings
        self._end_times = end_times

    def process(self, line: str):
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or not isinstance(r.get("path"), str):
                raise ValueError("not a caption record")
            row = catalog.captioned_row(r, r.get("bytes"))
            previous = Previous(row["size"], row["modified"], row["sha256"],
                                self._settings.match(row["model"], row["decode"]), row,
                                (self._end_times.get(r["run_id"], ""), r["run_id"]))
        except (ValueError, KeyError, TypeError):
            counter("previous_records_unreadable").inc()
            return
        yield path_key(r["path"]), previous


class _DecideFromRecordsFn(TallyFn):
    """(path key, {files, previous}) -> the file to read; tag 'skipped': SourceFiles whose
    `previous` is the row to carry; tag 'tallies'. Deleted paths are not counted: the
    earlier records of all runs include files deleted long ago."""

    def process(self, item):
        _, grouped = item
        files, previous = list(grouped["files"]), list(grouped["previous"])
        if not files:
            return
        self.tally("matched")
        counter("matched").inc()
        f = best_known(files)
        if not previous:
            yield f
            return
        prev = max(previous, key=lambda p: p.rank)
        if not prev.same_settings:
            yield f
        elif f.size is not None and f.size == prev.size and f.modified is not None and f.modified == prev.modified:
            counter("skipped").inc()
            yield beam.pvalue.TaggedOutput("skipped", f._replace(previous=prev.row))
        elif f.size is None or f.size == prev.size:
            yield f._replace(previous_sha256=prev.sha256, previous=prev.row)
        else:
            yield f


class SelectChanged(beam.PTransform):
    """SourceFiles (a path may come more than once) -> the files to read, one per path;
    tags 'skipped' (SourceFiles to carry forward, `previous` set), 'carry' (batched row
    references of files skipped unread) and 'tallies' ((kind, name), n).

    Args:
      catalog_files: the newest complete run's catalog files, in its manifest's order
        (CatalogRef.file indexes them); empty for outputs written without catalogs.
      catalog_rows: how many rows they hold (sizes the join's partitions).
      legacy_caption_files, end_times: without a catalog, the caption JSONL files of every
        earlier complete run and each run's end time (the newest record of a path wins).
      settings: this run's model and decode settings.
      retry_failed: read files that failed before even when unchanged.
      unlistable: a PCollection of the paths whose listing failed (MatchImages'
        'unlistable'); the catalog rows under them are carried, not deleted.
      not_image: a PCollection of the listed paths that are not inputs (MatchImages'
        'not_image'); the catalog rows of their captions are carried, not deleted (an
        output written without catalogs builds its first catalog of inputs only).
    """

    def __init__(self, catalog_files, settings: Settings, retry_failed: bool = False,
                 legacy_caption_files=(), end_times=None, catalog_rows: int = 0, report_progress: bool = False,
                 unlistable=None, not_image=None):
        super().__init__()
        self._unlistable = unlistable
        self._not_image = not_image
        self._catalog = list(catalog_files)
        self._rows = catalog_rows
        self._legacy = list(legacy_caption_files)
        self._end_times = dict(end_times or {})
        self._settings = settings
        self._retry_failed = retry_failed
        self._report = report_progress

    def expand(self, listed):
        pipeline = listed.pipeline
        if not self._catalog:
            return self._from_records(listed)
        n = partitions_for(self._rows)
        unlistable = {} if self._unlistable is None else {"unlistable": beam.pvalue.AsList(self._unlistable)}
        previous = (
            pipeline
            | "CreateCatalogFiles" >> beam.Create(list(enumerate(self._catalog)))
            | "ReadCatalog" >> beam.ParDo(_ReadCatalogFn(self._settings, n))
        )
        joined = {"files": listed | "BatchByPartition" >> beam.ParDo(_BatchByPartitionFn(n)), "previous": previous}
        if self._not_image is not None:
            joined["not_image"] = (self._not_image | "NotImageFiles" >> beam.Map(SourceFile)
                                   | "BatchNotImagesByPartition" >> beam.ParDo(_BatchByPartitionFn(n)))
        decided = (
            joined
            | "JoinCatalog" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_DecidePartitionFn(self._retry_failed, self._report), **unlistable).with_outputs(
                "carry", TAG, main="files")
        )
        skipped = pipeline | "NoSkippedFiles" >> beam.Create([])
        return {"files": decided.files, "skipped": skipped, "carry": decided.carry, "tallies": decided[TAG]}

    def _from_records(self, listed):
        pipeline = listed.pipeline
        previous = (
            pipeline
            | "CreatePreviousFiles" >> beam.Create(self._legacy)
            | "ReadPreviousRuns" >> beam.io.ReadAllFromText()
            | "ParsePrevious" >> beam.ParDo(_ParseCaptionRecordFn(self._settings, self._end_times))
        )
        decided = (
            {"files": listed | "KeyFilesByPath" >> beam.Map(lambda f: (path_key(f.path), f)), "previous": previous}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_DecideFromRecordsFn()).with_outputs("skipped", TAG, main="files")
        )
        carry = pipeline | "NoCarriedRows" >> beam.Create([])
        return {"files": decided.files, "skipped": decided.skipped, "carry": carry, "tallies": decided[TAG]}
