"""SelectChanged (incremental runs): SourceFiles -> those new or changed since earlier runs."""

from __future__ import annotations

import json

import apache_beam as beam

from batch_caption.job.elements import counter


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
