"""Per-bundle shard files: written under the run's `_temporary/`, published by the manifest step.

Every bundle streams its elements into a file of its own with a unique name, so a retried
bundle never writes into another attempt's file; the files of the bundles that completed
reach the manifest step as a side input and are renamed there to
KIND-SSSSS-of-NNNNN.SUFFIX. What is left in `_temporary/` (attempts that failed) is deleted.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from batch_caption import catalog, records
from batch_caption.storage import files, gcs

TEMP_DIR_NAME = "_temporary"  # readers skip it: it never matches KIND-*


def temp_dir_of(run_dir: str) -> str:
    return files.join(run_dir, TEMP_DIR_NAME)


class _JsonLines:
    """Records as JSON lines (records.to_json_line)."""

    suffix, mime_type = ".jsonl", "text/plain"

    def __init__(self, f):
        self._f = f

    def write(self, record) -> None:
        self._f.write(records.to_json_line(record).encode("utf-8") + b"\n")

    def close(self) -> None:
        pass


class _CatalogRows:
    """Catalog rows as Parquet (catalog.RowWriter)."""

    suffix, mime_type = ".parquet", "application/vnd.apache.parquet"

    def __init__(self, f):
        self._writer = catalog.RowWriter(f)

    def write(self, row) -> None:
        self._writer.write(row)

    def close(self) -> None:
        self._writer.close()

    def abandon(self) -> None:
        self._writer.abandon()


FORMATS = {"jsonl": _JsonLines, "parquet": _CatalogRows}


class WriteShardFn(beam.DoFn):
    """element -> nothing per element; at the end of each bundle that had elements, the
    path of the temp file holding them."""

    def __init__(self, temp_dir: str, kind: str, fmt: str = "jsonl"):
        self._temp_dir = temp_dir
        self._kind = kind
        self._format = FORMATS[fmt]

    def setup(self):
        gcs.configure_for_emulator()

    def start_bundle(self):
        self._discard()
        self._file = self._writer = self._path = None

    def process(self, element):
        if self._file is None:
            self._path = files.join(self._temp_dir, f"{self._kind}-{uuid.uuid4().hex}{self._format.suffix}")
            self._file = FileSystems.create(self._path, mime_type=self._format.mime_type)
            self._writer = self._format(self._file)
        self._writer.write(element)

    def finish_bundle(self):
        if self._file is not None:
            self._writer.close()  # a failure leaves the file to _discard
            self._file.close()
            self._file = None
            yield WindowedValue(self._path, MIN_TIMESTAMP, [GlobalWindow()])

    def teardown(self):
        self._discard()

    def _discard(self):
        """The file of a bundle that failed (never handed on): closed and deleted, best
        effort (what is left is deleted with the temp directory)."""
        if getattr(self, "_file", None) is None:
            return
        try:
            getattr(self._writer, "abandon", lambda: None)()
            self._file.close()
            files.delete([self._path])
        except Exception:  # noqa: BLE001 - best effort: the run's end removes the directory
            pass
        self._file = None


def publish_shards(run_dir: str, kind: str, temp_files, fmt: str = "jsonl") -> list[str]:
    """Renames a kind's temp files to run_dir/KIND-SSSSS-of-NNNNN.SUFFIX (one empty shard
    when there are none); -> the final paths. Safe to repeat: a retried manifest step
    skips the files an earlier attempt already renamed. Two listings, not a lookup per
    file: a run on many workers can have thousands of bundles, so thousands of shards."""
    form = FORMATS[fmt]
    temp_files = sorted(temp_files)
    n = max(1, len(temp_files))
    final = [files.join(run_dir, f"{kind}-{i:05d}-of-{n:05d}{form.suffix}") for i in range(n)]
    if not temp_files:
        with FileSystems.create(final[0], mime_type=form.mime_type) as f:
            form(f).close()
        return final
    # Compared by name: a local listing may spell the directory in another form (absolute).
    pending = _names(files.join(temp_dir_of(run_dir), f"{kind}-*{form.suffix}"))
    done = _names(files.join(run_dir, f"{kind}-*-of-{n:05d}{form.suffix}"))
    moves = [(src, dst) for src, dst in zip(temp_files, final)
             if files.basename(src) in pending or files.basename(dst) not in done]
    if moves:
        FileSystems.rename([m[0] for m in moves], [m[1] for m in moves])
    return final


def _names(pattern: str) -> set[str]:
    return {files.basename(path) for path in files.matched(pattern)}


def remove_stale_temp_dirs(output: str) -> int:
    """Deletes the temp directory of every run under `output`; -> how many files it held.
    Called while holding the output's lock, so no run writes there: what is left is from
    runs that failed (on a full disk, say, which it would keep full)."""
    left = files.matched(files.join(output, f"run=*/{TEMP_DIR_NAME}/*"))
    files.delete(left)
    if not files.is_remote(output):  # the directories themselves
        for temp in glob.glob(os.path.join(glob.escape(output), "run=*", TEMP_DIR_NAME)):
            shutil.rmtree(temp, ignore_errors=True)
    return len(left)


def remove_temp_dir(run_dir: str) -> None:
    """Deletes what failed bundle attempts left in the temp directory, then the directory
    itself where the filesystem has one (an object store has only the files)."""
    temp = temp_dir_of(run_dir)
    files.delete_matching(files.join(temp, "*"))
    if files.exists(temp):
        files.delete([temp])

