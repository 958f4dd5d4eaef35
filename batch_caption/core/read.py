"""ReadImages: SourceFiles -> decoded, resized ImageExamples (or error records, or skips).

    [dedupe]  KeyBySize -> GroupSameSize -> SplitBySize: a file of a size of its own goes
              straight to decoding; the others are hashed (streamed), grouped by sha256
              and merged, so identical bytes are read and decoded once
    ReadAndDecode  reads (what is not read yet), decodes and resizes in a read-ahead pool

Every input leaves as one ImageExample naming all its paths, an error record per path,
or a skip (incremental runs: content equal to previous_sha256).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from typing import Any, NamedTuple

import apache_beam as beam

from batch_caption import records
from batch_caption.core import bounded_reads, model_loading
from batch_caption.core.cpus import available_cpus
from batch_caption.core.elements import ERRORS, FileData, ImageExample, SourceFile, as_source, counter
from batch_caption.core.readahead import ReadAheadFn
from batch_caption.images import decoding
from batch_caption.storage import gcs

DECODE_THREADS = 2
DECODE_LOOKAHEAD = 32  # images in flight per DoFn instance; >= the batch size hides decoding


class _FileFn(ReadAheadFn):
    """What the DoFns that read files share: the size limit, the run id, the read counters."""

    def __init__(self, max_file_bytes: int, run_id: str, threads: int, lookahead: int):
        super().__init__(threads, lookahead)
        self._max_bytes = max_file_bytes
        self._run_id = run_id

    def setup(self):
        super().setup()
        gcs.configure_for_emulator()
        self._bytes_read = counter("bytes_read")
        self._failed_read = counter("failed_read")
        self._skipped = counter("skipped")

    def process(self, element, windowed=beam.DoFn.WindowedValueParam, _window=beam.DoFn.WindowParam):
        model_loading.work_ahead()  # a file to read: images to caption soon, the model may load
        yield from super().process(element, windowed, _window)

    def _read_errors(self, sources, error, message=None):
        """One error record (stage read) per path holding the file."""
        for source in sources:
            self._failed_read.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, file_error(source, "read", error, message, self._run_id))


def file_error(source: SourceFile, stage: str, error, message: str | None, run_id: str, sha256: str | None = None):
    """The error record of one input file, with what is known of it."""
    return records.error_record(source.path, stage, error, message, run_id=run_id,
                                size=source.size, modified=source.modified, sha256=sha256)


# Decoding is CPU and memory (a 12 MP PNG is 36 MB of pixels): however many threads read
# ahead, in however many DoFn instances, at most this many decodes run at once per process.
_decode_slots: dict[int, threading.BoundedSemaphore] = {}
_decode_slots_lock = threading.Lock()


def decode_slots(n: int) -> threading.BoundedSemaphore:
    with _decode_slots_lock:
        if n not in _decode_slots:
            _decode_slots[n] = threading.BoundedSemaphore(n)
        return _decode_slots[n]


class _RefuseTooLargeFn(beam.DoFn):
    """SourceFile (or path) -> itself, or an error record (stage read) when its matched
    size is over the limit: refused without a byte read."""

    def __init__(self, max_file_bytes: int, run_id: str):
        self._max_bytes = max_file_bytes
        self._run_id = run_id

    def process(self, item):
        source = as_source(item)
        if source.size is not None and source.size > self._max_bytes:
            counter("failed_read").inc()
            error = file_error(source, "read", *bounded_reads.too_large(self._max_bytes), self._run_id)
            yield beam.pvalue.TaggedOutput(ERRORS, error)
        else:
            yield item


class HashFileFn(_FileFn):
    """SourceFile -> FileData without bytes (the file streamed through sha256), an error
    record (stage read), or a skip (tag 'skipped') when the content equals
    previous_sha256. What then goes through the dedupe shuffle is paths and hashes, never
    file contents (the in-memory runner holds a GroupByKey's whole output at once)."""

    def __init__(self, max_file_bytes: int, run_id: str, threads: int = 2 * DECODE_THREADS, lookahead: int = 16):
        super().__init__(max_file_bytes, run_id, threads, lookahead)

    def setup(self):
        super().setup()
        self._hashed = counter("hashed_for_dedupe")

    def _work(self, source: SourceFile):
        try:
            return bounded_reads.hash_file(source.path, self._max_bytes)
        except Exception as e:  # missing, a directory, permissions, network: all data
            return bounded_reads.root_cause(e)

    def _emit(self, source: SourceFile, result):
        if isinstance(result, BaseException):
            yield from self._read_errors((source,), result)
            return
        size, sha = result
        self._hashed.inc()
        self._bytes_read.inc(size)
        if size > self._max_bytes:
            yield from self._read_errors((source,), *bounded_reads.too_large(self._max_bytes))
            return
        if source.previous_sha256 == sha:
            self._skipped.inc()
            yield beam.pvalue.TaggedOutput("skipped", source)
            return
        yield FileData((source,), None, sha)


# Declared: Beam infers the main output of a DoFn that also yields TaggedOutput as
# (KV | TaggedOutput), which the GroupByKey after it refuses. The value stays Any, so the
# files are encoded as before (a NamedTuple type could make Beam pick a schema coder).
@beam.typehints.with_output_types(tuple[int, Any])
class _KeyBySizeFn(beam.DoFn):
    """SourceFile (or path) -> (size, file), or the file (tag 'unknown_size': a path from a
    list file has no size; it is hashed without joining one big group)."""

    def process(self, item):
        f = as_source(item)
        if f.size is None:
            yield beam.pvalue.TaggedOutput("unknown_size", f)
        else:
            yield f.size, f


def split_by_size(item):
    """(size, files) -> the file alone when no other has its size (main output), or each
    file (tag 'same_size') to be hashed. The group is streamed, not listed: many files can
    share a size (copies of one file, uncompressed images of one shape)."""
    _, group = item
    files = iter(group)
    first, second = next(files), next(files, None)
    if second is None:
        yield first
        return
    for f in itertools.chain((first, second), files):
        yield beam.pvalue.TaggedOutput("same_size", f)


def _merge_same_content(item) -> FileData:
    """(sha256, [FileData]) -> one FileData naming every path (read and decoded once)."""
    _, group = item
    group = sorted(group, key=lambda d: d.sources[0].path)
    if len(group) > 1:
        counter("duplicate_content").inc(len(group) - 1)
    return FileData(tuple(s for d in group for s in d.sources), group[0].data, group[0].sha256)


# What ReadDecodeFn's pool thread makes of one file, one type per outcome. `file` never
# holds the bytes (a lookahead of big photos stays small); bytes_read counts first reads
# only (a file read again after the dedupe shuffle was counted when hashed).
class _Unreadable(NamedTuple):
    file: FileData
    error: Any  # the exception, or an error name
    message: str | None = None
    bytes_read: int = 0


class _Unchanged(NamedTuple):
    file: FileData
    bytes_read: int


class _Undecodable(NamedTuple):
    file: FileData
    error: decoding.ImageDecodeError
    bytes_read: int


class _Decoded(NamedTuple):
    file: FileData
    image: decoding.DecodedImage
    size: int  # bytes decoded
    bytes_read: int


class ReadDecodeFn(_FileFn):
    """FileData, SourceFile or path -> ImageExample, or an error record (stage read or
    decode) for each of its paths, or a skip (tag 'skipped') when a file not hashed before
    has the content of its previous_sha256.

    A FileData without bytes (after the dedupe shuffle) is read from its first path; a file
    rewritten since it was hashed keeps its group, and its records get the new hash. Up to
    `lookahead` inputs are read and decoded ahead by `threads` threads (0: inline), at most
    `max_decodes` of them decoding at once (default: the CPU count).
    """

    def __init__(self, image_config: decoding.ImageConfig, max_file_bytes: int, run_id: str,
                 threads: int = DECODE_THREADS, lookahead: int = DECODE_LOOKAHEAD, max_decodes: int | None = None):
        super().__init__(max_file_bytes, run_id, threads, lookahead)
        self._config = image_config
        self._max_decodes = max_decodes

    def setup(self):
        super().setup()
        self._decoded = counter("decoded")
        self._failed = counter("failed_decode")
        self._decode_slots = decode_slots(self._max_decodes or available_cpus())

    def _work(self, item: FileData | SourceFile | str):
        fd = item if isinstance(item, FileData) else FileData((as_source(item),))
        first_read = fd.sha256 is None
        counted = 0
        if fd.data is None:
            source = fd.sources[0]
            try:
                data = bounded_reads.read_file(source.path, self._max_bytes, size_hint=source.size)
            except Exception as e:  # missing, deleted since hashed, permissions, network: all data
                return _Unreadable(fd, bounded_reads.root_cause(e))
            counted = len(data) if first_read else 0
            if len(data) > self._max_bytes:
                return _Unreadable(fd, *bounded_reads.too_large(self._max_bytes), bytes_read=counted)
            sha = hashlib.sha256(data).hexdigest()
            if first_read and source.previous_sha256 == sha:
                return _Unchanged(fd, counted)
            fd = FileData(fd.sources, data, sha)
        without_bytes = FileData(fd.sources, None, fd.sha256)
        try:
            with self._decode_slots:
                decoded = decoding.decode_image(fd.data, self._config)
        except decoding.ImageDecodeError as e:
            # Kept as a value without its traceback and chained errors: their frames lead
            # back to this one, which holds the error (a cycle only the GC frees, keeping
            # the file's bytes alive until then; one made while the first model load has
            # the GC off and freezes would stay). The records use its class and message.
            error = e.with_traceback(None)
            error.__cause__ = error.__context__ = None
            return _Undecodable(without_bytes, error, counted)
        return _Decoded(without_bytes, decoded, len(fd.data), counted)

    def _emit(self, item, result):
        self._bytes_read.inc(result.bytes_read)
        sources = result.file.sources
        if isinstance(result, _Unchanged):
            self._skipped.inc()
            yield beam.pvalue.TaggedOutput("skipped", sources[0])
        elif isinstance(result, _Unreadable):
            yield from self._read_errors(sources, result.error, result.message)
        elif isinstance(result, _Undecodable):
            for source in sources:
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(
                    ERRORS, file_error(source, "decode", result.error, None, self._run_id, result.file.sha256))
        else:
            self._decoded.inc()
            image = result.image
            yield ImageExample(
                path=sources[0].path,
                pixels=image.pixels,
                width=image.width,
                height=image.height,
                format=image.format,
                sha256=result.file.sha256,
                size_bytes=result.size,
                sources=sources,
            )


class ReadImages(beam.PTransform):
    """PCollection[SourceFile | path] -> PCollection[ImageExample]; tags 'errors',
    'skipped' (SourceFiles whose content equals their previous_sha256) and 'read' (the
    inputs whose bytes are read: all but those refused by their matched size).

    Args:
      dedupe: decode identical bytes once. Files are grouped by size; those whose size
        another file shares (or is unknown) are hashed (streamed), grouped by sha256 (only
        paths and hashes are shuffled) and one file of each group is read again and
        decoded; the example then names every path in `sources`, and each gets its own
        record. A file of a size of its own is read and decoded once, like without dedupe.
        (So a listed path, which has no size, is not compared with such a file: identical
        bytes there are decoded twice, each path still getting its one record.)
      lookahead: images read and decoded ahead of the consumer (give the model's batch
        size, so a whole batch decodes while the previous one is captioned).
      decode_threads: threads reading and decoding per DoFn instance (0: inline); hashing for
        dedupe uses twice as many (it is mostly waiting for bytes), 8 files ahead each.
      spread_hashing: Reshuffle the files of shared sizes before hashing them: one size
        group comes out on one worker. Pointless where one process does everything (the
        in-memory DirectRunner).
    """

    def __init__(self, image_config: decoding.ImageConfig, max_file_bytes: int, run_id: str, dedupe: bool = False,
                 lookahead: int = DECODE_LOOKAHEAD, decode_threads: int = DECODE_THREADS,
                 spread_hashing: bool = True):
        super().__init__()
        self._config = image_config
        self._max_bytes = max_file_bytes
        self._run_id = run_id
        self._dedupe = dedupe
        self._lookahead = lookahead
        self._threads = decode_threads
        self._spread = spread_hashing

    def expand(self, given):
        checked = given | "RefuseTooLarge" >> beam.ParDo(
            _RefuseTooLargeFn(self._max_bytes, self._run_id)).with_outputs(ERRORS, main="files")
        files = checked.files
        to_decode, errors, skipped = files, [checked[ERRORS]], []
        if self._dedupe:
            # Only files of the same size can hold the same bytes: the others go straight to
            # decoding, read once instead of twice (hashing reads a file whole).
            keyed = files | "KeyBySize" >> beam.ParDo(_KeyBySizeFn()).with_outputs("unknown_size", main="sized")
            by_size = (
                keyed.sized
                | "GroupSameSize" >> beam.GroupByKey()
                | "SplitBySize" >> beam.ParDo(split_by_size).with_outputs("same_size", main="unique")
            )
            same_size = by_size.same_size
            if self._spread:  # one size group comes out on one worker
                same_size = same_size | "SpreadSameSize" >> beam.Reshuffle()
            to_hash = (same_size, keyed.unknown_size) | "FlattenToHash" >> beam.Flatten()
            hash_fn = HashFileFn(self._max_bytes, self._run_id, 2 * self._threads, 16 * self._threads)
            hashed = to_hash | "HashFiles" >> beam.ParDo(hash_fn).with_outputs(ERRORS, "skipped", main="data")
            to_decode = (
                by_size.unique,
                hashed.data
                | "KeyByContent" >> beam.Map(lambda d: (d.sha256, d))
                | "GroupSameContent" >> beam.GroupByKey()
                | "MergeSameContent" >> beam.Map(_merge_same_content),
            ) | "FlattenToDecode" >> beam.Flatten()
            errors.append(hashed[ERRORS])
            skipped.append(hashed.skipped)
        decoded = to_decode | "ReadAndDecode" >> beam.ParDo(
            ReadDecodeFn(self._config, self._max_bytes, self._run_id, self._threads, self._lookahead)
        ).with_outputs(ERRORS, "skipped", main="images")
        errors = (*errors, decoded[ERRORS]) | "FlattenReadErrors" >> beam.Flatten()
        if skipped:
            skipped = (*skipped, decoded.skipped) | "FlattenSkipped" >> beam.Flatten()
        else:
            skipped = decoded.skipped
        return {"images": decoded.images, ERRORS: errors, "skipped": skipped, "read": files}
