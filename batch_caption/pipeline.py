"""The captioning job's composite transforms, in data-flow order.

    patterns / list files
      -> MatchImages      paths, deduplicated and reshuffled across workers
      -> ReadImages       bytes -> ImageExample (decoded, resized) | error record
      -> CaptionImages    RunInference(CaptionModelHandler) -> caption record | error record
      -> WriteRun         captions-*.jsonl, errors-*.jsonl, then manifest.json last

Every path that enters ReadImages leaves as exactly one caption or error record:
each DoFn either yields its output or yields an error record, and inference failures
come back from RunInference's dead-letter output per element.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from batch_caption import gcs, images, progress, quality, records
from batch_caption.inference import CaptionModelHandler, ImageExample, ModelLoadError
from batch_caption.model.config import DecodeConfig

NAMESPACE = "batch_caption"
ERRORS = "errors"


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


# --- MatchImages -----------------------------------------------------------------------


class SourceFile(NamedTuple):
    """One input file. size and modified (seconds since the epoch) come from matching and
    are None for paths read from list files; previous_sha256 is set in incremental runs
    to the content captioned before (unchanged content is then skipped after reading)."""

    path: str
    size: int | None = None
    modified: float | None = None
    previous_sha256: str | None = None


class _MatchPatternFn(beam.DoFn):
    """pattern -> every file it matches (an empty match is an error record)."""

    def __init__(self, run_id: str, report_progress: bool = False):
        self._run_id = run_id
        self._report = report_progress

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, pattern: str):
        try:
            metadata = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # BeamIOError wraps the filesystem's own error
            yield beam.pvalue.TaggedOutput(ERRORS, records.error_record(pattern, "match", e, run_id=self._run_id))
            return
        if not metadata:
            yield beam.pvalue.TaggedOutput(
                ERRORS, records.error_record(pattern, "match", "NoMatch", "pattern matched no file", run_id=self._run_id)
            )
        if self._report:
            _expect(m.path for m in metadata)
        for m in metadata:
            yield SourceFile(m.path, m.size_in_bytes, m.last_updated_in_seconds)


class _ReadPathListFn(beam.DoFn):
    """list file -> the files it names, one a line (blank lines and # comments skipped)."""

    def __init__(self, run_id: str, report_progress: bool = False):
        self._run_id = run_id
        self._report = report_progress

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, list_path: str):
        try:
            with FileSystems.open(list_path, compression_type="uncompressed") as f:
                text = f.read().decode("utf-8")
        except Exception as e:
            yield beam.pvalue.TaggedOutput(ERRORS, records.error_record(list_path, "match", e, run_id=self._run_id))
            return
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
            | "KeyByPath" >> beam.Map(lambda f: (f.path, f))
            | "DedupePaths" >> beam.CombinePerKey(_best_known)
            | "DropPathKey" >> beam.Values()
            # DedupePaths, a shuffle by path, also spreads the files across workers (one
            # pattern's matches all come from one worker); no Reshuffle needed after it.
            | "CountMatched" >> beam.Map(_count_matched)
        )
        errors = tuple(source[ERRORS] for source in sources) | "FlattenMatchErrors" >> beam.Flatten()
        return {"files": files, ERRORS: errors}


def _count_matched(f: SourceFile) -> SourceFile:
    counter("matched").inc()
    return f


# --- SelectChanged (incremental runs) --------------------------------------------------


class _ParsePreviousFn(beam.DoFn):
    """caption JSONL line of an earlier run -> (path, (run end time, record))."""

    def __init__(self, end_times: dict[str, str]):
        self._end_times = end_times

    def process(self, line: str):
        try:
            r = json.loads(line)
            yield r["path"], (self._end_times.get(r["run_id"], ""), r)
        except (ValueError, KeyError, TypeError):
            counter("previous_records_unreadable").inc()


def _newest(pairs):
    return max(pairs, key=lambda p: (p[0], p[1].get("run_id", "")))


class _DecideFn(beam.DoFn):
    """(path, {files, previous}) -> the file to caption, or a skip (tag 'skipped')."""

    def __init__(self, model_id: str, any_model: bool):
        self._model_id = model_id
        self._any_model = any_model

    def process(self, item):
        path, grouped = item
        files, previous = list(grouped["files"]), list(grouped["previous"])
        if not files:  # captioned before, gone now
            return
        f = files[0]
        if not previous:
            yield f
            return
        _, prev = _newest(previous)
        if prev.get("model") != self._model_id and not self._any_model:
            yield f  # another model: caption again
            return
        if f.size is not None and f.size == prev.get("bytes") and f.modified is not None and f.modified == prev.get("modified"):
            counter("skipped").inc()
            yield beam.pvalue.TaggedOutput("skipped", path)
            return
        yield f._replace(previous_sha256=prev.get("sha256"))  # changed, or unknown: compare content


class SelectChanged(beam.PTransform):
    """SourceFiles -> those new or changed since earlier runs; tag 'skipped' for the rest.

    A file is unchanged when the newest earlier caption record of its path has the same
    model id and the same size and modification time; files without that metadata (from
    list files) are read and skipped if their sha256 is unchanged (see ReadImages).

    Args:
      previous_files: caption JSONL files of earlier complete runs.
      end_times: run id -> that run's end time (ISO), to find the newest record per path.
    """

    def __init__(self, previous_files, end_times, model_id: str, any_model: bool = False):
        super().__init__()
        self._previous = list(previous_files)
        self._end_times = dict(end_times)
        self._model_id = model_id
        self._any_model = any_model

    def expand(self, files):
        previous = (
            files.pipeline
            | "CreatePreviousFiles" >> beam.Create(self._previous)
            | "ReadPreviousRuns" >> beam.io.ReadAllFromText()
            | "ParsePrevious" >> beam.ParDo(_ParsePreviousFn(self._end_times))
        )
        decided = (
            {"files": files | "KeyFilesByPath" >> beam.Map(lambda f: (f.path, f)), "previous": previous}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_DecideFn(self._model_id, self._any_model)).with_outputs("skipped", main="files")
        )
        return {"files": decided.files, "skipped": decided.skipped}


# --- ReadImages ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FileData:
    """A file on its way to decoding: `sources` are every path holding its bytes. `data` is
    None until the bytes are read: the dedupe shuffle carries paths and hashes only."""

    sources: tuple[SourceFile, ...]
    data: bytes | None
    sha256: str


# Hashing, reading and decoding run in small thread pools, ahead of the consumer: file
# reads, sha256, Pillow's decode and resize and TensorFlow all release the GIL, so the next
# images are read and decoded while the current batch is captioned. On the in-memory
# DirectRunner every step of a fused stage otherwise runs one after the other in the one
# bundle thread; on a cloud runner the threads also overlap storage latency.
DECODE_THREADS = 2
DECODE_LOOKAHEAD = 32  # images in flight per DoFn instance; >= the batch size hides decoding
READ_CHUNK_BYTES = 1 << 20


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the CPUs it may run on (its affinity mask, where the OS
    has one), fewer under a container's CPU quota (docker --cpus, Kubernetes limits),
    which the affinity mask does not show."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cpus, quota)) if quota else cpus


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota of this process's cgroup (v2 cpu.max, or v1 cpu.cfs_quota_us over
    cpu.cfs_period_us) rounded up to whole CPUs; None without a quota or a cgroup."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)  # "max" (v2) -> ValueError: no quota
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 says -1 for none
        return None
    return -(-quota_us // period_us)


class _AheadFn(beam.DoFn):
    """Base of DoFns that work up to `lookahead` elements ahead in `threads` threads.

    Subclasses define `_work(element)`, which runs in a pool thread and returns data
    errors as values (Beam metrics and outputs belong to the bundle's thread; anything it
    raises is a bug and fails the bundle), and `_emit(element, result)`, which runs in the
    bundle's thread in input order and yields outputs. Every output keeps the window and
    timestamp of the element it came from. threads=0 works inline.
    """

    def __init__(self, threads: int, lookahead: int):
        self._threads = threads
        self._lookahead = max(1, lookahead)

    def setup(self):
        self._pool = None
        if self._threads > 0:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=type(self).__name__.strip("_"))

    def start_bundle(self):
        self._pending = collections.deque()

    def _work(self, element):
        raise NotImplementedError

    def _emit(self, element, result):
        raise NotImplementedError

    # WindowParam makes Beam call process once per window, so each kept element (and the
    # output made from it later) carries exactly one window.
    def process(self, element, windowed=beam.DoFn.WindowedValueParam, _window=beam.DoFn.WindowParam):
        if self._pool is None:
            yield from self._outputs(element, self._work(element), windowed)
            return
        self._pending.append((element, self._pool.submit(self._work, element), windowed))
        while len(self._pending) > self._lookahead:
            yield from self._next()

    def finish_bundle(self):
        while self._pending:
            yield from self._next()

    def _next(self):
        element, future, windowed = self._pending.popleft()
        yield from self._outputs(element, future.result(), windowed)

    def _outputs(self, element, result, windowed):
        """_emit's outputs as WindowedValues of their element (finish_bundle has none)."""
        for out in self._emit(element, result):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, windowed.with_value(out.value))
            else:
                yield windowed.with_value(out)

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _read(path: str, max_bytes: int, keep: bool, size_hint: int | None = None) -> tuple[bytes | None, int, str]:
    """-> (bytes if keep else None, size, sha256); reads at most max_bytes + 1 bytes, so a
    size > max_bytes means too large. Without keep the file streams through sha256.
    size_hint: the size matching reported, if any (a file may have changed since)."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        if keep:
            data = _read_at_most(f, max_bytes + 1, size_hint)
            return data, len(data), hashlib.sha256(data).hexdigest()
        digest, size = hashlib.sha256(), 0
        for chunk in _chunks(f, max_bytes + 1, READ_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        return None, size, digest.hexdigest()


def _read_at_most(f, limit: int, size_hint: int | None) -> bytes:
    """The first `limit` bytes of `f` (all of it if shorter). Not one f.read(limit): a
    buffered read(n) allocates n bytes before reading, and at the default limit of 256 MiB
    that cost ~2.3 ms of CPU per 2.5 MB photo (4x the read itself). The first read asks for
    the matched size + 1 (the + 1 notices a file that grew), later ones for 1 MiB."""
    first = max(size_hint, 0) + 1 if size_hint is not None else READ_CHUNK_BYTES
    parts = list(_chunks(f, limit, first))
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _chunks(f, limit: int, first: int):
    """`f`'s first `limit` bytes (all of it if shorter) in reads of `first` bytes, then of
    READ_CHUNK_BYTES."""
    # A buffered stream (local files, GCS's reader) returns fewer bytes than asked only at
    # the end, so a short read ends it: asking again would cost an object store a request.
    buffered = isinstance(f, io.BufferedIOBase)
    size, want = 0, first
    while size < limit:
        asked = min(want, limit - size)
        chunk = f.read(asked)
        if not chunk:
            return
        yield chunk
        size += len(chunk)
        if buffered and len(chunk) < asked:
            return
        want = READ_CHUNK_BYTES


def _too_large(max_bytes: int) -> tuple[str, str]:
    return "FileTooLargeError", f"file is larger than the limit of {max_bytes:,} bytes"


def _source(item) -> SourceFile:
    return SourceFile(item) if isinstance(item, str) else item


class _FileFn(_AheadFn):
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

    def _read_errors(self, sources, error, message=None):
        """One error record (stage read) per path holding the file."""
        for source in sources:
            self._failed_read.inc()
            yield beam.pvalue.TaggedOutput(
                ERRORS, records.error_record(source.path, "read", error, message, run_id=self._run_id))


class _HashFileFn(_FileFn):
    """SourceFile (or path) -> FileData without bytes (the file streamed through sha256),
    an error record (stage read), or a skip (tag 'skipped') when the content equals
    previous_sha256. What then goes through the dedupe shuffle is paths and hashes, never
    file contents (the in-memory runner holds a GroupByKey's whole output at once)."""

    def __init__(self, max_file_bytes: int, run_id: str, threads: int = 2 * DECODE_THREADS, lookahead: int = 16):
        super().__init__(max_file_bytes, run_id, threads, lookahead)

    def setup(self):
        super().setup()
        self._hashed = counter("hashed_for_dedupe")

    def _work(self, item):
        try:
            return _read(_source(item).path, self._max_bytes, keep=False)
        except Exception as e:  # missing, a directory, permissions, network: all data
            return _root_cause(e)

    def _emit(self, item, result):
        source = _source(item)
        if isinstance(result, BaseException):
            yield from self._read_errors((source,), result)
            return
        _, size, sha = result
        self._hashed.inc()
        self._bytes_read.inc(size)
        if size > self._max_bytes:
            yield from self._read_errors((source,), *_too_large(self._max_bytes))
            return
        if source.previous_sha256 == sha:
            self._skipped.inc()
            yield beam.pvalue.TaggedOutput("skipped", source.path)
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
        f = _source(item)
        if f.size is None:
            yield beam.pvalue.TaggedOutput("unknown_size", f)
        else:
            yield f.size, f


def _split_by_size(item):
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


class _Read(NamedTuple):
    """What _ReadDecodeFn's pool thread made of one input (see _ReadDecodeFn._work)."""

    file: FileData  # its bytes dropped once decoded: a lookahead of big photos stays small
    decoded: Any = None  # images.DecodedImage | images.ImageDecodeError
    size: int = 0  # bytes decoded
    read_error: tuple[Any, str | None] | None = None  # (exception or error name, message)
    skipped: bool = False
    bytes_read: int = 0  # counted for first reads only (a re-read after dedupe was counted when hashed)


class _ReadDecodeFn(_FileFn):
    """FileData, SourceFile or path -> ImageExample, or an error record (stage read or
    decode) for each of its paths, or a skip (tag 'skipped') when a SourceFile's content
    equals its previous_sha256.

    A FileData without bytes (after the dedupe shuffle) is read from its first path; a file
    rewritten since it was hashed keeps its group, and its records get the new hash. Up to
    `lookahead` inputs are read and decoded ahead by `threads` threads (0: inline), at most
    `max_decodes` of them decoding at once (default: the CPU count).
    """

    def __init__(self, image_config: images.ImageConfig, max_file_bytes: int, run_id: str,
                 threads: int = DECODE_THREADS, lookahead: int = DECODE_LOOKAHEAD, max_decodes: int | None = None):
        super().__init__(max_file_bytes, run_id, threads, lookahead)
        self._config = image_config
        self._max_decodes = max_decodes

    def setup(self):
        super().setup()
        self._decoded = counter("decoded")
        self._failed = counter("failed_decode")
        # Many threads hide storage latency, but decoding is CPU and memory (a 12 MP PNG is
        # 36 MB of pixels): more decodes at once than cores only add memory.
        self._decode_slots = threading.BoundedSemaphore(self._max_decodes or available_cpus())

    def _work(self, item) -> _Read:
        first_read = not isinstance(item, FileData)
        fd = FileData((_source(item),), None, "") if first_read else item
        counted = 0
        if fd.data is None:
            try:
                source = fd.sources[0]
                data, size, sha = _read(source.path, self._max_bytes, keep=True, size_hint=source.size)
            except Exception as e:  # missing, deleted since hashed, permissions, network: all data
                return _Read(fd, read_error=(_root_cause(e), None))
            counted = size if first_read else 0
            if size > self._max_bytes:
                return _Read(fd, read_error=_too_large(self._max_bytes), bytes_read=counted)
            if first_read and fd.sources[0].previous_sha256 == sha:
                return _Read(fd, skipped=True, bytes_read=counted)
            fd = FileData(fd.sources, data, sha)
        try:
            with self._decode_slots:
                decoded = images.decode_image(fd.data, self._config)
        except images.ImageDecodeError as e:
            # Kept as a value without its traceback and chained errors: their frames lead
            # back to this one, which holds the error (a cycle only the GC frees, keeping
            # the file's bytes alive until then; one made while the first model load has
            # the GC off and freezes would stay). The records use its class and message.
            decoded = e.with_traceback(None)
            decoded.__cause__ = decoded.__context__ = None
        return _Read(FileData(fd.sources, None, fd.sha256), decoded, len(fd.data), bytes_read=counted)

    def _emit(self, item, read: _Read):
        self._bytes_read.inc(read.bytes_read)
        fd = read.file
        if read.skipped:
            self._skipped.inc()
            yield beam.pvalue.TaggedOutput("skipped", fd.sources[0].path)
            return
        if read.read_error is not None:
            yield from self._read_errors(fd.sources, *read.read_error)
            return
        if isinstance(read.decoded, images.ImageDecodeError):
            for source in fd.sources:
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(
                    ERRORS, records.error_record(source.path, "decode", read.decoded, run_id=self._run_id))
            return
        self._decoded.inc()
        decoded = read.decoded
        yield ImageExample(
            path=fd.sources[0].path,
            pixels=decoded.pixels,
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
            sha256=fd.sha256,
            size_bytes=read.size,
            sources=fd.sources,
        )


def _root_cause(e: BaseException) -> BaseException:
    """BeamIOError hides the real error (FileNotFoundError, IsADirectoryError) in a dict."""
    inner = getattr(e, "exception_details", None)
    if isinstance(inner, dict) and len(inner) == 1:
        return next(iter(inner.values()))
    return e


class ReadImages(beam.PTransform):
    """PCollection[SourceFile | path] -> PCollection[ImageExample]; tags 'errors' and
    'skipped' (paths whose content equals their previous_sha256).

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
        in-memory DirectRunner), where it cost ~0.3 s per run.
    """

    def __init__(self, image_config: images.ImageConfig, max_file_bytes: int, run_id: str, dedupe: bool = False,
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

    def expand(self, files):
        to_decode, errors, skipped = files, [], []
        if self._dedupe:
            # Only files of the same size can hold the same bytes: the others go straight to
            # decoding, read once instead of twice (hashing reads a file whole).
            keyed = files | "KeyBySize" >> beam.ParDo(_KeyBySizeFn()).with_outputs("unknown_size", main="sized")
            by_size = (
                keyed.sized
                | "GroupSameSize" >> beam.GroupByKey()
                | "SplitBySize" >> beam.ParDo(_split_by_size).with_outputs("same_size", main="unique")
            )
            same_size = by_size.same_size
            if self._spread:  # one size group comes out on one worker
                same_size = same_size | "SpreadSameSize" >> beam.Reshuffle()
            to_hash = (same_size, keyed.unknown_size) | "FlattenToHash" >> beam.Flatten()
            hash_fn = _HashFileFn(self._max_bytes, self._run_id, 2 * self._threads, 16 * self._threads)
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
            _ReadDecodeFn(self._config, self._max_bytes, self._run_id, self._threads, self._lookahead)
        ).with_outputs(ERRORS, "skipped", main="images")
        if errors:
            errors = (*errors, decoded[ERRORS]) | "FlattenReadErrors" >> beam.Flatten()
            skipped = (*skipped, decoded.skipped) | "FlattenSkipped" >> beam.Flatten()
        else:
            errors, skipped = decoded[ERRORS], decoded.skipped
        return {"images": decoded.images, ERRORS: errors, "skipped": skipped}


# --- CaptionImages ---------------------------------------------------------------------


class _ToCaptionRecordFn(beam.DoFn):
    """PredictionResult(example, n-best, model id) -> caption record."""

    def __init__(self, run_id: str, decode: DecodeConfig, low_score_threshold: float):
        self._run_id = run_id
        self._decode = decode.to_dict()
        self._threshold = low_score_threshold

    def setup(self):
        self._captioned = counter("captioned")
        self._failed = counter("failed_infer")

    def process(self, result):
        example = result.example
        for path, modified in example.source_paths():
            try:
                record = records.caption_record(
                    example,
                    result.inference,
                    model_id=result.model_id,
                    run_id=self._run_id,
                    decode=self._decode,
                    low_score_threshold=self._threshold,
                    path=path,
                    modified=modified,
                )
            except ValueError as e:  # no caption, or a non-finite score: the model's failure
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, records.error_record(path, "infer", e, run_id=self._run_id))
                continue
            self._captioned.inc()
            yield record


class FailedBatchToErrorsFn(beam.DoFn):
    """(failed batch, exception) from RunInference's dead letters -> one record per image."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, failure):
        batch, exc = failure
        name, message = _describe_failure(exc)
        if _is_model_load_failure(exc):
            # The model, not these images: fail the run (as a load in setup did) rather
            # than write every image of the run as an error.
            lines = _failure_parts(exc)[1]
            raise ModelLoadError(message + ("\n" + "".join(lines) if lines else ""))
        for example in batch:
            for path, _ in example.source_paths():
                counter("failed_infer").inc()
                yield records.error_record(path, "infer", name, message, run_id=self._run_id)


def _failure_parts(exc) -> tuple[type | None, list[str]]:
    """(exception class, traceback lines) of RunInference's dead-letter exception info,
    (exception type, repr, traceback lines); (None, []) for anything else."""
    if isinstance(exc, tuple) and exc and isinstance(exc[0], type):
        return exc[0], list(exc[2]) if len(exc) > 2 and isinstance(exc[2], (list, tuple)) else []
    return None, []


def _is_model_load_failure(exc) -> bool:
    kind = type(exc) if isinstance(exc, BaseException) else _failure_parts(exc)[0]
    return kind is not None and issubclass(kind, ModelLoadError)


def _describe_failure(exc) -> tuple[str, str]:
    """RunInference's dead letters carry (exception type, repr, traceback lines), not the
    exception itself (it may not pickle): recover the class name and the message."""
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc) or type(exc).__name__
    kind, lines = _failure_parts(exc)
    if kind is not None:
        name = kind.__name__
        last = lines[-1].strip() if lines else ""
        # traceback names classes outside builtins with their module: "pkg.mod.Name: msg".
        prefixes = (name + ": ", f"{kind.__module__}.{kind.__qualname__}: ")
        prefix = next((x for x in prefixes if last.startswith(x)), None)
        message = last[len(prefix):] if prefix else (str(exc[1]) if len(exc) > 1 else name)
        return name, message
    return type(exc).__name__, str(exc)


class CaptionImages(beam.PTransform):
    """PCollection[ImageExample] -> caption records; tag 'errors' for inference failures."""

    def __init__(
        self,
        handler: CaptionModelHandler,
        decode: DecodeConfig,
        run_id: str,
        low_score_threshold: float = quality.DEFAULT_LOW_SCORE,
    ):
        super().__init__()
        self._handler = handler
        self._decode = decode
        self._run_id = run_id
        self._threshold = low_score_threshold

    def expand(self, examples):
        predictions, dead = examples | "RunInference" >> RunInference(self._handler).with_exception_handling()
        out = predictions | "ToCaptionRecords" >> beam.ParDo(
            _ToCaptionRecordFn(self._run_id, self._decode, self._threshold)
        ).with_outputs(ERRORS, main="captions")
        failed = dead.failed_inferences | "FailedBatchesToErrors" >> beam.ParDo(FailedBatchToErrorsFn(self._run_id))
        errors = (out[ERRORS], failed) | "FlattenInferErrors" >> beam.Flatten()
        return {"captions": out.captions, ERRORS: errors}


# --- WriteRun --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the manifest says about the run besides counts and files."""

    run_id: str
    run_dir: str
    model: str
    model_path: str
    options: dict[str, Any]
    start_time: float
    previous_runs: tuple[str, ...] = ()  # incremental: the earlier runs compared against


class _WriteManifestFn(beam.DoFn):
    def __init__(self, info: RunInfo):
        self._info = info

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, _, caption_files, error_files, tallies):
        info = self._info
        caption_files = _publish_shards(info.run_dir, "captions", caption_files)
        error_files = _publish_shards(info.run_dir, "errors", error_files)
        _remove_temp_dir(info.run_dir)
        tally = {key: n for key, n in tallies}  # (kind, name) -> count; absent = 0
        n_captions = tally.get(("captioned", ""), 0)
        n_matched = tally.get(("matched", ""), 0)
        n_skipped = tally.get(("skipped", ""), 0)
        failed = {name: n for (kind, name), n in tally.items() if kind == "failed"}
        flagged = {name: n for (kind, name), n in tally.items() if kind == "flagged"}
        manifest = {
            "format": records.MANIFEST_FORMAT,
            "run_id": info.run_id,
            "model": info.model,
            "model_path": info.model_path,
            "counts": {
                "captioned": n_captions,
                "failed": sum(failed.values()),
                "failed_by_stage": {s: failed.get(s, 0) for s in records.STAGES},
                "inputs": n_captions + sum(failed.values()),
                "matched": n_matched,
                "skipped": n_skipped,
                "flagged": {f: flagged.get(f, 0) for f in quality.FLAGS},
            },
            "options": info.options,
            "previous_runs": list(info.previous_runs),
            "files": {
                "captions": sorted(_basename(f) for f in caption_files),
                "errors": sorted(_basename(f) for f in error_files),
            },
            "start_time": _iso(info.start_time),
            "end_time": _iso(time.time()),
        }
        path = FileSystems.join(info.run_dir, records.MANIFEST_NAME)
        with FileSystems.create(path) as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
        yield manifest


TEMP_DIR_NAME = "_temporary"  # readers skip it: it never matches captions-* / errors-*


def temp_dir_of(run_dir: str) -> str:
    return FileSystems.join(run_dir, TEMP_DIR_NAME)


class _WriteShardFn(beam.DoFn):
    """record -> nothing per record; at the end of each bundle that had records, the path
    of the temp file holding them as JSONL (one file per bundle attempt, a unique name, so
    a retried bundle never writes into the file of another attempt)."""

    def __init__(self, temp_dir: str, kind: str):
        self._temp_dir = temp_dir
        self._kind = kind

    def setup(self):
        gcs.configure_for_emulator()

    def start_bundle(self):
        self._discard()
        self._file = self._path = None

    def process(self, record):
        if self._file is None:
            self._path = FileSystems.join(self._temp_dir, f"{self._kind}-{uuid.uuid4().hex}.jsonl")
            self._file = FileSystems.create(self._path, mime_type="text/plain")  # as WriteToText's
        self._file.write(records.to_json_line(record).encode("utf-8") + b"\n")

    def finish_bundle(self):
        if self._file is not None:
            f, self._file = self._file, None
            f.close()
            yield WindowedValue(self._path, MIN_TIMESTAMP, [GlobalWindow()])

    def teardown(self):
        self._discard()

    def _discard(self):
        """The file of a bundle that failed (never handed on): closed and deleted, best
        effort (what is left is deleted with the temp directory)."""
        if getattr(self, "_file", None) is None:
            return
        try:
            self._file.close()
            FileSystems.delete([self._path])
        except Exception:  # noqa: BLE001 - best effort: the run's end removes the directory
            pass
        self._file = None


def _publish_shards(run_dir: str, kind: str, temp_files) -> list[str]:
    """Renames a kind's temp files to run_dir/kind-SSSSS-of-NNNNN.jsonl (an empty shard
    when there are none); -> the final paths. Safe to repeat: a retried manifest step
    skips the files an earlier attempt already renamed. Two listings, not a lookup per
    file: a Dataflow run can have thousands of bundles, so thousands of shards."""
    temp_files = sorted(temp_files)
    n = max(1, len(temp_files))
    final = [FileSystems.join(run_dir, f"{kind}-{i:05d}-of-{n:05d}.jsonl") for i in range(n)]
    if not temp_files:
        with FileSystems.create(final[0], mime_type="text/plain"):
            pass
        return final
    # Compared by name: a local listing may spell the directory in another form (absolute).
    pending = _names(FileSystems.join(temp_dir_of(run_dir), f"{kind}-*.jsonl"))
    done = _names(FileSystems.join(run_dir, f"{kind}-*-of-{n:05d}.jsonl"))
    moves = [(src, dst) for src, dst in zip(temp_files, final) if _basename(src) in pending or _basename(dst) not in done]
    if moves:
        FileSystems.rename([m[0] for m in moves], [m[1] for m in moves])
    return final


def _names(pattern: str) -> set[str]:
    return {_basename(path) for path in _matched(pattern)}


def _matched(pattern: str) -> list[str]:
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def delete_matching(pattern: str) -> None:
    """Deletes every file `pattern` matches (any FileSystems scheme); none: nothing."""
    found = _matched(pattern)
    if found:
        FileSystems.delete(found)


def _remove_temp_dir(run_dir: str) -> None:
    """Deletes what failed bundle attempts left in the temp directory, then the directory
    itself where the filesystem has one (an object store has only the files)."""
    temp = temp_dir_of(run_dir)
    delete_matching(FileSystems.join(temp, "*"))
    if FileSystems.exists(temp):
        FileSystems.delete([temp])


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class WriteRun(beam.PTransform):
    """{"captions", "errors"} record PCollections -> JSONL shards, then the manifest.

    Every bundle writes its records to a file of its own in the run's `_temporary`
    directory; the manifest step, whose side inputs are the files of the bundles that
    completed, gives them their final names (kind-SSSSS-of-NNNNN.jsonl, an empty shard for
    a kind without records), deletes what is left there (attempts that failed) and writes
    the manifest last. The manifest's counts come from the records themselves, not from
    metrics. (Two WriteToText transforms did this in 24 of the job's 62 leaf transforms,
    38 without them, and each transform is a fixed cost of every run.) With
    `report_progress` the same tallies feed this process's progress line: every matched
    path counts once, captioned, failed or skipped.
    """

    def __init__(self, info: RunInfo, report_progress: bool = False):
        super().__init__()
        self._info = info
        self._report = report_progress

    def expand(self, outputs):
        """outputs: {"captions", "errors", "files" (every distinct matched file), "skipped"
        (paths left out as unchanged)}."""
        temp_dir = temp_dir_of(self._info.run_dir)
        caption_files = outputs["captions"] | "WriteCaptions" >> beam.ParDo(_WriteShardFn(temp_dir, "captions"))
        error_files = outputs[ERRORS] | "WriteErrors" >> beam.ParDo(_WriteShardFn(temp_dir, "errors"))
        # Every count of the manifest from one combine over (kind, name) keys: one
        # Count.Globally per count cost ~9 transforms each, and pipeline construction and
        # stage setup are a fixed cost per transform on every run.
        tallies = (
            (
                outputs["captions"] | "TallyCaptions" >> beam.FlatMap(_caption_tallies, self._report),
                outputs[ERRORS] | "TallyErrors" >> beam.Map(_error_tally, self._report),
                outputs["files"] | "TallyMatched" >> beam.Map(lambda _: ("matched", "")),
                outputs["skipped"] | "TallySkipped" >> beam.Map(_skip_tally, self._report),
            )
            | "FlattenTallies" >> beam.Flatten()
            | "CountTallies" >> beam.combiners.Count.PerElement()
        )
        pbegin = outputs["captions"].pipeline
        return (
            pbegin
            | "ManifestTrigger" >> beam.Impulse()  # one element, so the manifest is written once
            | "WriteManifest"
            >> beam.ParDo(
                _WriteManifestFn(self._info),
                beam.pvalue.AsList(caption_files),
                beam.pvalue.AsList(error_files),
                beam.pvalue.AsList(tallies),
            )
        )


def _caption_tallies(record, report: bool) -> list[tuple[str, str]]:
    if report:
        progress.reporter().add(1, "captioned")
    return [("captioned", "")] + [("flagged", flag) for flag in record["flags"]]


def _error_tally(record, report: bool) -> tuple[str, str]:
    # A match error is about a pattern or list file, not one of the matched paths that
    # make the progress total.
    if report and record["stage"] != "match":
        progress.reporter().add(1, "failed")
    return ("failed", record["stage"])


def _skip_tally(path, report: bool) -> tuple[str, str]:
    if report:
        progress.reporter().add(1, "skipped")
    return ("skipped", "")
