"""MatchImages: patterns and list files -> one SourceFile per distinct input path.

What a pattern lists passes the image filter (image_files.py); files named one by
one (a pattern without wildcards, a list file's lines) are inputs whatever their names.
"""

from __future__ import annotations

import os
import stat

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from batch_caption import records
from batch_caption.core.elements import ERRORS, SourceFile, counter, path_key
from batch_caption.pipeline import listing, progress
from batch_caption.pipeline.image_files import ImageFiles
from batch_caption.storage import files, gcs

_GLOB_CHARS = frozenset("*?[")


class _ListInputFn(beam.DoFn):
    """What the DoFns that list input files share: the run id, progress, the error record."""

    def __init__(self, run_id: str, report_progress: bool = False, output: str | None = None,
                 images: ImageFiles = ImageFiles()):
        self._run_id = run_id
        self._report = report_progress
        self._output = output  # the job's own output: never an input (listing.Outside)
        self._images = images  # which listed files are inputs

    def setup(self):
        gcs.configure_for_emulator()

    def _error(self, source: str, error, message: str | None = None):
        return beam.pvalue.TaggedOutput(ERRORS, records.error_record(source, "match", error, message, run_id=self._run_id))


class ListingError(RuntimeError):
    """An input could not be listed at all: the run fails rather than pass for complete
    with the files it did not see (an incremental run would count them as deleted)."""


class _MatchPatternFn(_ListInputFn):
    """pattern -> every image file it matches (an empty match is an error record), or for
    a whole tree (DIR/**, gs://BUCKET/PREFIX/**) its top level and a piece per subtree
    (tag 'pieces'; listing.py); tag 'not_image': the files the image filter skips.
    A listing that fails, after the filesystem client's own retries, fails the run."""

    def process(self, pattern: str):
        found = 0
        try:
            if listing.tree_of(pattern):
                for item in listing.plan(pattern, self._output):
                    found += 1
                    yield from self._found(item)
            else:
                metadata = FileSystems.match([pattern])[0].metadata_list
                # Object stores' "folder" placeholders are objects whose names end in "/".
                outside = listing.Outside(self._output)
                paths = [m for m in metadata if not m.path.endswith("/") and outside(m.path)]
                found = len(paths)
                named = not set(pattern) & _GLOB_CHARS  # one file, named by the user
                for m in paths:
                    kind = _not_regular(m.path)
                    item = listing.NotAFile(m.path, kind) if kind else SourceFile(
                        m.path, m.size_in_bytes, m.last_updated_in_seconds)
                    yield from self._found(item, named)
        except Exception as e:  # BeamIOError wraps the filesystem's own error
            raise ListingError(f"cannot list {pattern}: {e}") from e
        if not found:
            yield self._error(pattern, "NoMatch", "pattern matched no file")

    def _found(self, item, named: bool = False):
        """A listed item -> its output. named: the pattern names this one file, an input
        whatever its name; any other file passes the image filter first."""
        if isinstance(item, (SourceFile, listing.NotAFile)) and not named and not self._is_image(item):
            counter("skipped_not_image").inc()
            yield beam.pvalue.TaggedOutput("not_image", item.path)
        elif isinstance(item, SourceFile):
            if self._report:
                _expect((item.path,))
            yield item
        elif isinstance(item, listing.Piece):
            yield beam.pvalue.TaggedOutput("pieces", item)
        elif isinstance(item, listing.Unlistable):
            yield self._error(item.path, item.error)
            yield beam.pvalue.TaggedOutput("unlistable", item.path)
        elif isinstance(item, listing.NotAFile):
            yield self._error(item.path, "NotARegularFile", f"not a regular file: {item.kind}; not read")
        else:
            counter("links_skipped").inc()
            yield beam.pvalue.TaggedOutput("links_skipped", item.path)

    def _is_image(self, item) -> bool:
        # Only a regular file is opened to sniff; a FIFO or device without an extension
        # stays an error record.
        if isinstance(item, listing.NotAFile):
            return self._images.by_name(item.path) is not False
        return self._images.wants(item.path)


class _ListPieceFn(_MatchPatternFn):
    """listing.Piece -> everything under it (as _MatchPatternFn's outputs, without pieces)."""

    def process(self, piece):
        try:
            for item in listing.list_piece(piece, self._output):
                yield from self._found(item)
        except Exception as e:
            raise ListingError(f"cannot list {piece.path}: {e}") from e


class _ReadPathListFn(_ListInputFn):
    """list file -> the files it names, one a line (blank lines and # comments skipped)."""

    def process(self, list_path: str):
        try:
            with files.open_read(list_path) as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except Exception as e:
            raise ListingError(f"cannot read --input_list {list_path}: {e}") from e
        paths = [line.strip() for line in text.splitlines()]
        outside = listing.Outside(self._output)
        paths = [p for p in paths if p and not p.startswith("#") and outside(p)]
        if self._report:
            _expect(paths)
        for path in paths:
            yield SourceFile(path)


def _not_regular(path: str) -> str | None:
    """What a local matched path is, in words, when it is not a regular file (a glob
    matches FIFOs and devices too); None for a regular file, a remote path or one gone
    (reading it then says so). Reading checks again on the opened descriptor."""
    if files.is_remote(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else files.kind_of(mode)


def _expect(paths) -> None:
    # On the DirectRunner all matching ends (DedupePaths is a GroupByKey) before any file
    # is read: the progress line then knows the total, each distinct path once, as
    # DedupePaths keeps it (the driver counts the digests that worker processes send once).
    progress.reporter().expect(paths)


def best_known(files) -> SourceFile:
    """The same path from a pattern and from a list: keep the one with metadata."""
    return max(files, key=lambda f: (f.size is not None, f.modified or 0.0))


class MatchImages(beam.PTransform):
    """PBegin -> SourceFile per distinct path, spread across workers; tags 'errors',
    'links_skipped' (symlinks to directories inside a listed tree, whose files are listed
    under their own paths), 'unlistable' (the paths, mostly directories, that could not
    be listed: what was under them is unknown, not deleted) and 'not_image' (the paths of
    the listed files that `images` leaves out: they exist, but are not inputs).

    Args:
      patterns: file paths, globs or recursive directory globs ("dir/**"), any scheme.
      list_files: text files of paths, one a line.
      report_progress: give the progress line the matched paths (its total); only on the
        DirectRunner, where matching ends before any file is read (progress.py).
      dedupe_paths: keep one SourceFile per path (a path two inputs name is read once);
        off where the next stage groups by path anyway (SelectChanged).
      output: the job's output: nothing under it is an input (not listed, and dropped
        from globs and list files).
      images: which files that patterns list are inputs (list files' paths all are).
      spread_pieces: reshuffle a tree's subtrees over the workers before listing them
        (default: unless report_progress; off where one process runs everything).
    """

    def __init__(self, patterns, list_files, run_id: str, report_progress: bool = False, dedupe_paths: bool = True,
                 output: str | None = None, images: ImageFiles = ImageFiles(), spread_pieces: bool | None = None):
        super().__init__()
        self._spread = not report_progress if spread_pieces is None else spread_pieces
        self._output = output
        self._images = images
        self._dedupe = dedupe_paths
        self._patterns = list(patterns)
        self._lists = list(list_files)
        self._run_id = run_id
        self._report = report_progress

    def expand(self, pbegin):
        # A branch only for inputs that exist: every transform costs time to build and
        # set up on every run, even with nothing to do.
        sources, links, unlistable, not_image = [], [], [], []
        if self._patterns or not self._lists:
            args = (self._run_id, self._report, self._output, self._images)
            matched = (
                pbegin
                | "CreatePatterns" >> beam.Create(self._patterns)
                | "MatchPatterns" >> beam.ParDo(_MatchPatternFn(*args)).with_outputs(
                    ERRORS, "pieces", "links_skipped", "unlistable", "not_image", main="files")
            )
            pieces = matched.pieces
            if self._spread:  # spread the subtrees over the workers (one process: no need)
                pieces = pieces | "SpreadPieces" >> beam.Reshuffle()
            listed = pieces | "ListPieces" >> beam.ParDo(_ListPieceFn(*args)).with_outputs(
                ERRORS, "links_skipped", "unlistable", "not_image", main="files")
            sources += [matched, listed]
            links += [matched.links_skipped, listed.links_skipped]
            unlistable += [matched.unlistable, listed.unlistable]
            not_image += [matched.not_image, listed.not_image]
        if self._lists:
            sources.append(
                pbegin
                | "CreateListFiles" >> beam.Create(self._lists)
                | "ReadListFiles" >> beam.ParDo(_ReadPathListFn(self._run_id, self._report, self._output))
                .with_outputs(ERRORS, main="files")
            )
        files = tuple(source.files for source in sources) | "FlattenFiles" >> beam.Flatten()
        if self._dedupe:
            files = (
                files
                | "KeyByPath" >> beam.Map(lambda f: (path_key(f.path), f))
                | "DedupePaths" >> beam.CombinePerKey(best_known)
                | "DropPathKey" >> beam.Values()
                # DedupePaths, a shuffle by path, also spreads the files across workers (one
                # pattern's matches all come from one worker).
                | "CountMatched" >> beam.Map(_count_matched)
            )
        errors = tuple(source[ERRORS] for source in sources) | "FlattenMatchErrors" >> beam.Flatten()
        links = tuple(links) | "FlattenSkippedLinks" >> beam.Flatten(pipeline=pbegin.pipeline)
        unlistable = tuple(unlistable) | "FlattenUnlistable" >> beam.Flatten(pipeline=pbegin.pipeline)
        not_image = tuple(not_image) | "FlattenNotImages" >> beam.Flatten(pipeline=pbegin.pipeline)
        return {"files": files, ERRORS: errors, "links_skipped": links, "unlistable": unlistable,
                "not_image": not_image}


def _count_matched(f: SourceFile) -> SourceFile:
    counter("matched").inc()
    return f
