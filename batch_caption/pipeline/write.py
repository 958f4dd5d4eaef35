"""WriteRun: the run's records -> its sinks (shards, catalog, ...), then its manifest, last.

captions-*.jsonl and errors-*.jsonl hold this run's records; catalog-*.parquet the whole
archive as of this run (carry.py). Each output is a Sink (sinks.py): every bundle
writes what it has, and the manifest step, which waits for every sink, has each sink
publish what it wrote and writes the manifest last, naming it, so a run directory with a
manifest is complete. The manifest's counts come from the records themselves, not from
metrics.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from batch_caption import quality, records
from batch_caption.core.elements import ERRORS
from batch_caption.pipeline import progress
from batch_caption.pipeline.carry import BuildCatalog
from batch_caption.pipeline.shards import remove_temp_dir
from batch_caption.pipeline.sinks import Sink, run_sinks
from batch_caption.pipeline.tallies import count, each
from batch_caption.storage import files, gcs


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the manifest says about the run besides counts and files."""

    run_id: str
    run_dir: str
    model: str
    model_path: str
    options: dict[str, Any]
    start_time: float
    decode: dict[str, Any] = dataclasses.field(default_factory=dict)  # the beam settings
    previous_runs: tuple[str, ...] = ()  # incremental: the earlier runs compared against
    previous_catalog: tuple[str, ...] = ()  # incremental: the earlier catalog's files
    max_failed_fraction: float = 1.0  # a larger failed share marks the manifest rejected


class _WriteManifestFn(beam.DoFn):
    """The one trigger element -> the manifest, written last; side inputs: the summed
    tallies, then what each sink wrote, in the order of `sinks`."""

    def __init__(self, info: RunInfo, sinks: Sequence[Sink]):
        self._info = info
        self._sinks = tuple(sinks)

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, _, tallies, *written):
        info = self._info
        listed = {sink.name: sink.publish(list(w)) for sink, w in zip(self._sinks, written, strict=True)}
        remove_temp_dir(info.run_dir)  # with what failed attempts of any sink left there
        tally = {key: n for key, n in tallies}  # (kind, name) -> count; absent = 0
        n_captions = tally.get(("captioned", ""), 0)
        failed = {name: n for (kind, name), n in tally.items() if kind == "failed"}
        flagged = {name: n for (kind, name), n in tally.items() if kind == "flagged"}
        n_failed = sum(failed.values())
        carried = sum(tally.get((kind, ""), 0) for kind in ("skipped", "unlisted", "carried_not_image"))
        share = n_failed / (n_captions + n_failed) if n_captions + n_failed else 0.0
        ended = time.time()
        manifest = {
            "format": records.MANIFEST_FORMAT,
            "run_id": info.run_id,
            "model": info.model,
            "model_path": info.model_path,
            "counts": {
                "captioned": n_captions,
                "failed": n_failed,
                "failed_by_stage": {s: failed.get(s, 0) for s in records.STAGES},
                "inputs": n_captions + n_failed,
                "matched": tally.get(("matched", ""), 0),
                "skipped": tally.get(("skipped", ""), 0),
                "read": tally.get(("read", ""), 0),
                # Every skipped file keeps its earlier row; so does every unlisted one,
                # and every caption of a file the image filter leaves out tonight.
                "carried": carried,
                "deleted": tally.get(("deleted", ""), 0),
                "unlisted": tally.get(("unlisted", ""), 0),
                "links_skipped": tally.get(("links_skipped", ""), 0),
                "skipped_not_image": tally.get(("skipped_not_image", ""), 0),
                "carried_not_image": tally.get(("carried_not_image", ""), 0),
                "catalog_rows": n_captions + n_failed - failed.get("match", 0) + carried,
                "flagged": {f: flagged.get(f, 0) for f in quality.FLAGS},
            },
            "options": info.options,
            "previous_runs": list(info.previous_runs),
            "files": listed,
            "start_time": _iso(info.start_time),
            "end_time": _iso(ended),
            "end_seconds": round(ended, 6),  # orders runs that end within one second
        }
        if share > info.max_failed_fraction:
            manifest["rejected"] = (f"{n_failed:,} of {n_captions + n_failed:,} inputs failed ({share:.1%}), "
                                    f"over --max_failed_fraction {info.max_failed_fraction:g}")
        text = json.dumps(manifest, indent=2, sort_keys=True)
        files.write_bytes(files.join(info.run_dir, records.MANIFEST_NAME), text.encode("utf-8"))
        yield manifest


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class WriteRun(beam.PTransform):
    """{"captions", "errors", "skipped", "carry", "read", "links_skipped", "not_image",
    "tallies"} -> what every sink writes, then the manifest (the PCollection of its one
    dict).

    "skipped" are SourceFiles found unchanged one by one and "carry" batched references
    to the rows of files skipped unread (both carried forward); "read" the files this run
    reads; "links_skipped" and "not_image" paths the listing passed over; "tallies"
    ((kind, name), n) counts from the stages (matched, skipped, deleted).
    sinks: outputs besides the run's own (sinks.run_sinks), each listed in the manifest
      under its name, after every sink completed.
    With `report_progress` the tallies feed this process's progress line: every matched
    path counts once.
    """

    def __init__(self, info: RunInfo, report_progress: bool = False, sinks: Sequence[Sink] = ()):
        super().__init__()
        self._info = info
        self._report = report_progress
        self._sinks = run_sinks(info.run_dir) + tuple(sinks)
        names = [sink.name for sink in self._sinks]
        if len(set(names)) < len(names):
            raise ValueError(f"two sinks share a name: {names}")

    def expand(self, outputs):
        info = self._info
        # The catalog's rows once, for whichever sinks write them.
        rows = outputs | "BuildCatalog" >> BuildCatalog(info.previous_catalog, info.model, info.decode)
        inputs = {**outputs, **rows}
        written = [inputs | sink.label >> sink.write() for sink in self._sinks]
        # Every count of the manifest from one combine over (kind, name) keys: each
        # transform is a fixed cost of pipeline construction and stage setup on every run.
        report = self._report
        tallies = (
            (
                count(outputs["captions"], "TallyCaptions", lambda r: _caption_tallies(r, report)),
                count(outputs[ERRORS], "TallyErrors", lambda r: _error_tally(r, report)),
                count(outputs["skipped"], "TallySkipped", lambda f: _skip_tally(f, report)),
                count(outputs["read"], "TallyRead", each("read")),
                count(outputs["links_skipped"], "TallyLinksSkipped", each("links_skipped")),
                count(outputs["not_image"], "TallyNotImages", each("skipped_not_image")),
                outputs["tallies"],
            )
            | "FlattenTallies" >> beam.Flatten()
            | "SumTallies" >> beam.CombinePerKey(sum)
        )
        return (
            outputs["captions"].pipeline
            | "ManifestTrigger" >> beam.Impulse()  # one element, so the manifest is written once
            | "WriteManifest"
            >> beam.ParDo(
                _WriteManifestFn(info, self._sinks),
                beam.pvalue.AsList(tallies),
                *(beam.pvalue.AsList(w) for w in written),
            )
        )


def _caption_tallies(record, report: bool):
    if report:
        progress.reporter().add(1, "captioned")
    return [("captioned", "")] + [("flagged", flag) for flag in record["flags"]]


def _error_tally(record, report: bool):
    # A match error is about a pattern or list file, not one of the matched paths that
    # make the progress total.
    if report and record["stage"] != "match":
        progress.reporter().add(1, "failed")
    return (("failed", record["stage"]),)


def _skip_tally(_, report: bool):
    if report:
        progress.reporter().add(1, "skipped")
    return (("skipped", ""),)
