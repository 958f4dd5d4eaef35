"""WriteRun: caption and error records -> the run's JSONL shards, then its manifest.

Every bundle writes its records to a file of its own in the run's `_temporary`
directory; the manifest step, whose side inputs are the files of the bundles that
completed, gives them their final names (kind-SSSSS-of-NNNNN.jsonl, an empty shard for a
kind without records), deletes what is left there (attempts that failed) and writes the
manifest last. The manifest's counts come from the records themselves, not from metrics.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from batch_caption import files, gcs, progress, quality, records
from batch_caption.job.elements import ERRORS

TEMP_DIR_NAME = "_temporary"  # readers skip it: it never matches captions-* / errors-*


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


def temp_dir_of(run_dir: str) -> str:
    return files.join(run_dir, TEMP_DIR_NAME)


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
            self._path = files.join(self._temp_dir, f"{self._kind}-{uuid.uuid4().hex}.jsonl")
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
            files.delete([self._path])
        except Exception:  # noqa: BLE001 - best effort: the run's end removes the directory
            pass
        self._file = None


def publish_shards(run_dir: str, kind: str, temp_files) -> list[str]:
    """Renames a kind's temp files to run_dir/kind-SSSSS-of-NNNNN.jsonl (an empty shard
    when there are none); -> the final paths. Safe to repeat: a retried manifest step
    skips the files an earlier attempt already renamed. Two listings, not a lookup per
    file: a run on many workers can have thousands of bundles, so thousands of shards."""
    temp_files = sorted(temp_files)
    n = max(1, len(temp_files))
    final = [files.join(run_dir, f"{kind}-{i:05d}-of-{n:05d}.jsonl") for i in range(n)]
    if not temp_files:
        with FileSystems.create(final[0], mime_type="text/plain"):
            pass
        return final
    # Compared by name: a local listing may spell the directory in another form (absolute).
    pending = _names(files.join(temp_dir_of(run_dir), f"{kind}-*.jsonl"))
    done = _names(files.join(run_dir, f"{kind}-*-of-{n:05d}.jsonl"))
    moves = [(src, dst) for src, dst in zip(temp_files, final)
             if files.basename(src) in pending or files.basename(dst) not in done]
    if moves:
        FileSystems.rename([m[0] for m in moves], [m[1] for m in moves])
    return final


def _names(pattern: str) -> set[str]:
    return {files.basename(path) for path in files.matched(pattern)}


def remove_temp_dir(run_dir: str) -> None:
    """Deletes what failed bundle attempts left in the temp directory, then the directory
    itself where the filesystem has one (an object store has only the files)."""
    temp = temp_dir_of(run_dir)
    files.delete_matching(files.join(temp, "*"))
    if files.exists(temp):
        files.delete([temp])


class _WriteManifestFn(beam.DoFn):
    def __init__(self, info: RunInfo):
        self._info = info

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, _, caption_files, error_files, tallies):
        info = self._info
        caption_files = publish_shards(info.run_dir, "captions", caption_files)
        error_files = publish_shards(info.run_dir, "errors", error_files)
        remove_temp_dir(info.run_dir)
        tally = {key: n for key, n in tallies}  # (kind, name) -> count; absent = 0
        n_captions = tally.get(("captioned", ""), 0)
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
                "matched": tally.get(("matched", ""), 0),
                "skipped": tally.get(("skipped", ""), 0),
                "flagged": {f: flagged.get(f, 0) for f in quality.FLAGS},
            },
            "options": info.options,
            "previous_runs": list(info.previous_runs),
            "files": {
                "captions": sorted(files.basename(f) for f in caption_files),
                "errors": sorted(files.basename(f) for f in error_files),
            },
            "start_time": _iso(info.start_time),
            "end_time": _iso(time.time()),
        }
        text = json.dumps(manifest, indent=2, sort_keys=True)
        files.write_bytes(files.join(info.run_dir, records.MANIFEST_NAME), text.encode("utf-8"))
        yield manifest


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class WriteRun(beam.PTransform):
    """{"captions", "errors", "files", "skipped"} -> JSONL shards, then the manifest
    (the PCollection of its one dict).

    "files" is every distinct matched file, "skipped" the paths left out as unchanged;
    both only count. With `report_progress` the same tallies feed this process's progress
    line: every matched path counts once, captioned, failed or skipped.
    """

    def __init__(self, info: RunInfo, report_progress: bool = False):
        super().__init__()
        self._info = info
        self._report = report_progress

    def expand(self, outputs):
        temp_dir = temp_dir_of(self._info.run_dir)
        caption_files = outputs["captions"] | "WriteCaptions" >> beam.ParDo(_WriteShardFn(temp_dir, "captions"))
        error_files = outputs[ERRORS] | "WriteErrors" >> beam.ParDo(_WriteShardFn(temp_dir, "errors"))
        # Every count of the manifest from one combine over (kind, name) keys: each
        # transform is a fixed cost of pipeline construction and stage setup on every run.
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
        return (
            outputs["captions"].pipeline
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
