"""MatchImages: patterns and list files -> one SourceFile per distinct input path."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from batch_caption import gcs, progress, records
from batch_caption.job.elements import ERRORS, SourceFile, counter, path_key


class _ListInputFn(beam.DoFn):
    """What the DoFns that list input files share: the run id, progress, the error record."""

    def __init__(self, run_id: str, report_progress: bool = False):
        self._run_id = run_id
        self._report = report_progress

    def setup(self):
        gcs.configure_for_emulator()

    def _error(self, source: str, error, message: str | None = None):
        return beam.pvalue.TaggedOutput(ERRORS, records.error_record(source, "match", error, message, run_id=self._run_id))


class ListingError(RuntimeError):
    """An input could not be listed at all: the run fails rather than pass for complete
    with the files it did not see (an incremental run would count them as deleted)."""


class _MatchPatternFn(_ListInputFn):
    """pattern -> every file it matches (an empty match is an error record). A listing
    that fails, after the filesystem client's own retries, fails the run."""

    def process(self, pattern: str):
        try:
            metadata = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # BeamIOError wraps the filesystem's own error
            raise ListingError(f"cannot list {pattern}: {e}") from e
        # Object stores' "folder" placeholders are objects whose names end in "/".
        metadata = [m for m in metadata if not m.path.endswith("/")]
        if not metadata:
            yield self._error(pattern, "NoMatch", "pattern matched no file")
        if self._report:
            _expect(m.path for m in metadata)
        for m in metadata:
            yield SourceFile(m.path, m.size_in_bytes, m.last_updated_in_seconds)


class _ReadPathListFn(_ListInputFn):
    """list file -> the files it names, one a line (blank lines and # comments skipped)."""

    def process(self, list_path: str):
        try:
            with FileSystems.open(list_path, compression_type="uncompressed") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except Exception as e:
            raise ListingError(f"cannot read --input_list {list_path}: {e}") from e
        paths = [line.strip() for line in text.splitlines()]
        paths = [p for p in paths if p and not p.startswith("#")]
        if self._report:
            _expect(paths)
        for path in paths:
            yield SourceFile(path)


def _expect(paths) -> None:
    # On the in-memory DirectRunner all matching ends (DedupePaths is a GroupByKey) before
    # any file is read, in this process: the progress line then knows the total, each
    # distinct path once, as DedupePaths keeps it.
    progress.reporter().expect(paths)


def _best_known(files) -> SourceFile:
    """The same path from a pattern and from a list: keep the one with metadata."""
    return max(files, key=lambda f: (f.size is not None, f.modified or 0.0))


class MatchImages(beam.PTransform):
    """PBegin -> SourceFile per distinct path, spread across workers; tag 'errors'.

    Args:
      patterns: file paths, globs or recursive directory globs ("dir/**"), any scheme.
      list_files: text files of paths, one a line.
      report_progress: give this process's progress line the matched paths (its total);
        only where matching runs in the driver's process (the in-memory DirectRunner).
    """

    def __init__(self, patterns, list_files, run_id: str, report_progress: bool = False):
        super().__init__()
        self._patterns = list(patterns)
        self._lists = list(list_files)
        self._run_id = run_id
        self._report = report_progress

    def expand(self, pbegin):
        # A branch only for inputs that exist: every transform costs time to build and
        # set up on every run, even with nothing to do.
        sources = []
        if self._patterns or not self._lists:
            sources.append(
                pbegin
                | "CreatePatterns" >> beam.Create(self._patterns)
                | "MatchPatterns" >> beam.ParDo(_MatchPatternFn(self._run_id, self._report)).with_outputs(ERRORS, main="files")
            )
        if self._lists:
            sources.append(
                pbegin
                | "CreateListFiles" >> beam.Create(self._lists)
                | "ReadListFiles" >> beam.ParDo(_ReadPathListFn(self._run_id, self._report)).with_outputs(ERRORS, main="files")
            )
        files = (
            tuple(source.files for source in sources)
            | "FlattenFiles" >> beam.Flatten()
            | "KeyByPath" >> beam.Map(lambda f: (path_key(f.path), f))
            | "DedupePaths" >> beam.CombinePerKey(_best_known)
            | "DropPathKey" >> beam.Values()
            # DedupePaths, a shuffle by path, also spreads the files across workers (one
            # pattern's matches all come from one worker).
            | "CountMatched" >> beam.Map(_count_matched)
        )
        errors = tuple(source[ERRORS] for source in sources) | "FlattenMatchErrors" >> beam.Flatten()
        return {"files": files, ERRORS: errors}


def _count_matched(f: SourceFile) -> SourceFile:
    counter("matched").inc()
    return f
