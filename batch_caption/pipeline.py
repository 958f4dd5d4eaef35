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

import dataclasses
import hashlib
import json
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from batch_caption import gcs, images, progress, quality, records
from batch_caption.inference import CaptionModelHandler, ImageExample
from batch_caption.model.config import DecodeConfig

NAMESPACE = "batch_caption"
ERRORS = "errors"


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


# --- MatchImages -----------------------------------------------------------------------


class _MatchPatternFn(beam.DoFn):
    """pattern -> every file path it matches (an empty match is an error record)."""

    def __init__(self, run_id: str):
        self._run_id = run_id

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
        for m in metadata:
            yield m.path


class _ReadPathListFn(beam.DoFn):
    """list file -> the paths it names, one a line (blank lines and # comments skipped)."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, list_path: str):
        try:
            with FileSystems.open(list_path, compression_type="uncompressed") as f:
                text = f.read().decode("utf-8")
        except Exception as e:
            yield beam.pvalue.TaggedOutput(ERRORS, records.error_record(list_path, "match", e, run_id=self._run_id))
            return
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


class MatchImages(beam.PTransform):
    """PBegin -> paths (str), each once, spread across workers; tag 'errors' for failures.

    Args:
      patterns: file paths, globs or recursive directory globs ("dir/**"), any scheme.
      list_files: text files of paths, one a line.
    """

    def __init__(self, patterns, list_files, run_id: str):
        super().__init__()
        self._patterns = list(patterns)
        self._lists = list(list_files)
        self._run_id = run_id

    def expand(self, pbegin):
        from_patterns = (
            pbegin
            | "CreatePatterns" >> beam.Create(self._patterns)
            | "MatchPatterns" >> beam.ParDo(_MatchPatternFn(self._run_id)).with_outputs(ERRORS, main="paths")
        )
        from_lists = (
            pbegin
            | "CreateListFiles" >> beam.Create(self._lists)
            | "ReadListFiles" >> beam.ParDo(_ReadPathListFn(self._run_id)).with_outputs(ERRORS, main="paths")
        )
        paths = (
            (from_patterns.paths, from_lists.paths)
            | "FlattenPaths" >> beam.Flatten()
            | "DedupePaths" >> beam.Distinct()
            | "CountMatched" >> beam.Map(_count_matched)
            # Python MatchAll does not rebalance: without this, one worker reads everything.
            | "SpreadPaths" >> beam.Reshuffle()
        )
        errors = (from_patterns[ERRORS], from_lists[ERRORS]) | "FlattenMatchErrors" >> beam.Flatten()
        return {"paths": paths, ERRORS: errors}


def _count_matched(path: str) -> str:
    counter("matched").inc()
    # On the in-memory DirectRunner matching finishes (Reshuffle is a barrier) before
    # any image is captioned, in this process: the progress line then knows the total.
    progress.reporter().expect(1)
    return path


# --- ReadImages ------------------------------------------------------------------------


class _ReadAndDecodeFn(beam.DoFn):
    """path -> ImageExample, or an error record (stage read or decode)."""

    def __init__(self, image_config: images.ImageConfig, max_file_bytes: int, run_id: str):
        self._config = image_config
        self._max_bytes = max_file_bytes
        self._run_id = run_id

    def setup(self):
        gcs.configure_for_emulator()
        self._bytes_read = counter("bytes_read")
        self._decoded = counter("decoded")
        self._failed = {s: counter(f"failed_{s}") for s in ("read", "decode")}

    def _error(self, path, stage, error, message=None):
        self._failed[stage].inc()
        return beam.pvalue.TaggedOutput(ERRORS, records.error_record(path, stage, error, message, run_id=self._run_id))

    def process(self, path: str):
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                data = f.read(self._max_bytes + 1)
        except Exception as e:  # missing, a directory, permissions, network: all data
            yield self._error(path, "read", _root_cause(e))
            return
        self._bytes_read.inc(len(data))
        if len(data) > self._max_bytes:
            yield self._error(path, "read", "FileTooLargeError", f"file is larger than the limit of {self._max_bytes:,} bytes")
            return
        try:
            decoded = images.decode_image(data, self._config)
        except images.ImageDecodeError as e:
            yield self._error(path, "decode", e)
            return
        self._decoded.inc()
        yield ImageExample(
            path=path,
            pixels=decoded.pixels,
            width=decoded.width,
            height=decoded.height,
            format=decoded.format,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )


def _root_cause(e: BaseException) -> BaseException:
    """BeamIOError hides the real error (FileNotFoundError, IsADirectoryError) in a dict."""
    inner = getattr(e, "exception_details", None)
    if isinstance(inner, dict) and len(inner) == 1:
        return next(iter(inner.values()))
    return e


class ReadImages(beam.PTransform):
    """PCollection[path] -> PCollection[ImageExample]; tag 'errors' for failures."""

    def __init__(self, image_config: images.ImageConfig, max_file_bytes: int, run_id: str):
        super().__init__()
        self._fn = _ReadAndDecodeFn(image_config, max_file_bytes, run_id)

    def expand(self, paths):
        out = paths | "ReadAndDecode" >> beam.ParDo(self._fn).with_outputs(ERRORS, main="images")
        return {"images": out.images, ERRORS: out[ERRORS]}


# --- CaptionImages ---------------------------------------------------------------------


class _ToCaptionRecordFn(beam.DoFn):
    """PredictionResult(example, n-best, model id) -> caption record."""

    def __init__(self, run_id: str, decode: DecodeConfig, low_score_threshold: float, report_progress: bool):
        self._run_id = run_id
        self._decode = decode.to_dict()
        self._threshold = low_score_threshold
        self._report = report_progress

    def setup(self):
        self._captioned = counter("captioned")
        self._failed = counter("failed_infer")
        self._progress = progress.reporter() if self._report else None

    def process(self, result):
        example = result.example
        try:
            record = records.caption_record(
                example,
                result.inference,
                model_id=result.model_id,
                run_id=self._run_id,
                decode=self._decode,
                low_score_threshold=self._threshold,
            )
        except ValueError as e:  # no caption, or a non-finite score: the model's failure
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, records.error_record(example.path, "infer", e, run_id=self._run_id))
            return
        self._captioned.inc()
        if self._progress:
            self._progress.add(1)
        yield record


class FailedBatchToErrorsFn(beam.DoFn):
    """(failed batch, exception) from RunInference's dead letters -> one record per image."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, failure):
        batch, exc = failure
        name, message = _describe_failure(exc)
        for example in batch:
            counter("failed_infer").inc()
            yield records.error_record(example.path, "infer", name, message, run_id=self._run_id)


def _describe_failure(exc) -> tuple[str, str]:
    """RunInference's dead letters carry (exception type, repr, traceback lines), not the
    exception itself (it may not pickle): recover the class name and the message."""
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc) or type(exc).__name__
    if isinstance(exc, tuple) and exc and isinstance(exc[0], type):
        name = exc[0].__name__
        lines = exc[2] if len(exc) > 2 and isinstance(exc[2], (list, tuple)) else []
        last = lines[-1].strip() if lines else ""
        message = last.split(": ", 1)[1] if last.startswith(name + ": ") else (str(exc[1]) if len(exc) > 1 else name)
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
        report_progress: bool = False,
    ):
        super().__init__()
        self._handler = handler
        self._decode = decode
        self._run_id = run_id
        self._threshold = low_score_threshold
        self._report = report_progress

    def expand(self, examples):
        predictions, dead = examples | "RunInference" >> RunInference(self._handler).with_exception_handling()
        out = predictions | "ToCaptionRecords" >> beam.ParDo(
            _ToCaptionRecordFn(self._run_id, self._decode, self._threshold, self._report)
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


class _WriteManifestFn(beam.DoFn):
    def __init__(self, info: RunInfo):
        self._info = info

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, _, caption_files, error_files, n_captions, error_stages, n_matched, flag_counts):
        info = self._info
        failed = {stage: n for stage, n in error_stages}
        flagged = dict(flag_counts)
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
                "skipped": 0,
                "flagged": {f: flagged.get(f, 0) for f in quality.FLAGS},
            },
            "options": info.options,
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


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class WriteRun(beam.PTransform):
    """{"captions", "errors"} record PCollections -> JSONL shards, then the manifest.

    The manifest is computed inside the pipeline from the records themselves (not from
    metrics) and written by a step whose side inputs are the written file names, so it
    runs only after every shard is finalised.
    """

    def __init__(self, info: RunInfo):
        super().__init__()
        self._info = info

    def expand(self, outputs):
        """outputs: {"captions", "errors", "paths"} (paths: every distinct matched path)."""
        run_dir = self._info.run_dir

        def write(pcoll, name):
            return (
                pcoll
                | f"Encode{name.title()}" >> beam.Map(records.to_json_line)
                | f"Write{name.title()}"
                >> beam.io.WriteToText(
                    FileSystems.join(run_dir, name),
                    file_name_suffix=".jsonl",
                    shard_name_template="-SSSSS-of-NNNNN",
                )
            )

        caption_files = write(outputs["captions"], "captions")
        error_files = write(outputs[ERRORS], "errors")
        n_captions = outputs["captions"] | "CountCaptions" >> beam.combiners.Count.Globally()
        error_stages = (
            outputs[ERRORS]
            | "ErrorStage" >> beam.Map(lambda r: r["stage"])
            | "CountErrorsByStage" >> beam.combiners.Count.PerElement()
        )
        pbegin = outputs["captions"].pipeline
        return (
            pbegin
            | "ManifestTrigger" >> beam.Create([None])
            | "WriteManifest"
            >> beam.ParDo(
                _WriteManifestFn(self._info),
                beam.pvalue.AsList(caption_files),
                beam.pvalue.AsList(error_files),
                beam.pvalue.AsSingleton(n_captions),
                beam.pvalue.AsList(error_stages),
                beam.pvalue.AsSingleton(outputs["paths"] | "CountMatched" >> beam.combiners.Count.Globally()),
                beam.pvalue.AsList(
                    outputs["captions"]
                    | "Flags" >> beam.FlatMap(lambda r: r["flags"])
                    | "CountFlags" >> beam.combiners.Count.PerElement()
                ),
            )
        )
