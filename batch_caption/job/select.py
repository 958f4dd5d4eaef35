"""SelectChanged (incremental runs): SourceFiles -> those to read; the rest skipped unread.

The listing is joined by path with the newest complete run's catalog, of which only what
the decision needs travels (size, mtime, sha256, failed, same settings, and a reference
to the row). Per path:

    not listed now                       deleted: counted, drops out of the catalog
    no earlier row                       read (new)
    other model or decode settings       read (re-caption)
    same size and mtime                  skipped unread; a failed file too, unless
                                         --retry_failed
    same size (or unknown), other mtime  read and hashed: equal content is skipped after
                                         reading, and the new mtime is recorded
    other size                           read

A skipped file carries its earlier row forward (job/write.py). Outputs written before
catalogs existed are read once from their caption records instead.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import apache_beam as beam

from batch_caption import catalog, gcs
from batch_caption.job.elements import CatalogRef, counter, path_key


class Previous(NamedTuple):
    """What the decision needs of an earlier row."""

    size: int | None
    modified: float | None
    sha256: str | None
    failed: bool
    same_settings: bool  # made by this run's model (or any, with --incremental_any_model) and decode settings
    ref: Any  # CatalogRef, or the row itself (outputs without catalogs)
    rank: tuple = ()  # outputs without catalogs: (run end time, run id); the newest record wins


class Settings(NamedTuple):
    """This run's model and decode settings, as the catalog stores them."""

    model: str
    decode: str  # catalog.decode_key
    any_model: bool = False

    def match(self, model: str | None, decode: str | None) -> bool:
        return (self.any_model or model == self.model) and decode == self.decode


class _ReadCatalogFn(beam.DoFn):
    """(file index, catalog file) -> (path key, Previous) per row, a row group at a time."""

    def __init__(self, settings: Settings):
        self._settings = settings

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, item):
        index, path = item
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path, compression_type="uncompressed") as f:
            for row_number, row in enumerate(catalog.read_rows(f, catalog.DECISION_COLUMNS)):
                yield path_key(catalog.path_of(row)), Previous(
                    row["size"], row["modified"], row["sha256"], row["status"] == "failed",
                    self._settings.match(row["model"], row["decode"]), CatalogRef(index, row_number))


class _ParseCaptionRecordFn(beam.DoFn):
    """Caption JSONL line of a run written without a catalog -> (path key, Previous)."""

    def __init__(self, settings: Settings, end_times: dict[str, str]):
        self._settings = settings
        self._end_times = end_times

    def process(self, line: str):
        try:
            r = json.loads(line)
            row = catalog.captioned_row(r, r.get("bytes"))
            previous = Previous(row["size"], row["modified"], row["sha256"], False,
                                self._settings.match(row["model"], row["decode"]), row,
                                (self._end_times.get(r["run_id"], ""), r["run_id"]))
        except (ValueError, KeyError, TypeError):
            counter("previous_records_unreadable").inc()
            return
        yield path_key(r["path"]), previous


class _DecideFn(beam.DoFn):
    """(path key, {files, previous}) -> the file to read; tags 'skipped' (SourceFiles that
    carry their row forward) and 'deleted' (path keys no longer listed)."""

    def __init__(self, retry_failed: bool):
        self._retry_failed = retry_failed

    def process(self, item):
        key, grouped = item
        files_now, previous = list(grouped["files"]), list(grouped["previous"])
        if not files_now:
            counter("deleted").inc()
            yield beam.pvalue.TaggedOutput("deleted", key)
            return
        f = files_now[0]
        if not previous:
            yield f
            return
        prev = max(previous, key=lambda p: p.rank)
        retry = prev.failed and self._retry_failed
        if not prev.same_settings or retry:
            yield f
        elif f.size is not None and f.size == prev.size and f.modified is not None and f.modified == prev.modified:
            counter("skipped").inc()
            yield beam.pvalue.TaggedOutput("skipped", f._replace(previous=prev.ref))
        elif f.size is None or f.size == prev.size:
            yield f._replace(previous_sha256=prev.sha256, previous=prev.ref)
        else:
            yield f


class SelectChanged(beam.PTransform):
    """SourceFiles -> those to read; tags 'skipped' (SourceFiles with `previous` set, to
    carry forward) and 'deleted' (path keys of earlier rows no longer listed).

    Args:
      catalog_files: the newest complete run's catalog files, in its manifest's order
        (CatalogRef.file indexes them); empty for outputs written without catalogs.
      legacy_caption_files, end_times: without a catalog, the caption JSONL files of every
        earlier complete run and each run's end time (the newest record of a path wins).
      settings: this run's model and decode settings.
      retry_failed: read files that failed before even when unchanged.
    """

    def __init__(self, catalog_files, settings: Settings, retry_failed: bool = False,
                 legacy_caption_files=(), end_times=None):
        super().__init__()
        self._catalog = list(catalog_files)
        self._legacy = list(legacy_caption_files)
        self._end_times = dict(end_times or {})
        self._settings = settings
        self._retry_failed = retry_failed

    def expand(self, listed):
        pipeline = listed.pipeline
        if self._catalog:
            previous = (
                pipeline
                | "CreateCatalogFiles" >> beam.Create(list(enumerate(self._catalog)))
                | "ReadCatalog" >> beam.ParDo(_ReadCatalogFn(self._settings))
            )
        else:
            previous = (
                pipeline
                | "CreatePreviousFiles" >> beam.Create(self._legacy)
                | "ReadPreviousRuns" >> beam.io.ReadAllFromText()
                | "ParsePrevious" >> beam.ParDo(_ParseCaptionRecordFn(self._settings, self._end_times))
            )
        decided = (
            {"files": listed | "KeyFilesByPath" >> beam.Map(lambda f: (path_key(f.path), f)), "previous": previous}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_DecideFn(self._retry_failed)).with_outputs("skipped", "deleted", main="files")
        )
        return {"files": decided.files, "skipped": decided.skipped, "deleted": decided.deleted}

