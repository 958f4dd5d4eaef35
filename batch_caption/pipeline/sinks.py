"""The seam between a run's records and its outputs: a Sink writes, the manifest names it.

A Sink has a name and two halves:

    write()    a composite PTransform: the run's records -> a PCollection of what it
               wrote (temp file paths, one per bundle, or a completion marker)
    publish()  in the manifest step, once every sink's PCollection is complete: the
               whole of it -> the sink's entry, manifest["files"][name] (JSON: the
               names of its final files, or what else says what it wrote)

WriteRun applies every sink's write() to the same records, fused with the stages that
make them (no extra pass, no shuffle), hands each sink's output to the manifest step as a
side input, and writes the manifest last, naming what each sink wrote. A sink that fails
fails the run, and no manifest is written. The run's own outputs (captions, errors,
catalog) are `Shards` sinks; another output (a table, a summary file) is one more Sink.

write() gets a dict of PCollections: WriteRun's input ("captions" and ERRORS, this run's
caption and error records, and the rest WriteRun lists) and carry.ROWS, the catalog's
rows by where they come from (dicts of catalog.COLUMNS, or pyarrow Tables of carried
rows), built once whichever sinks read them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import apache_beam as beam

from batch_caption import catalog
from batch_caption.core.elements import ERRORS
from batch_caption.pipeline.carry import ROWS
from batch_caption.pipeline.shards import FORMATS, WriteShardFn, publish_shards, temp_dir_of
from batch_caption.storage import files


@dataclasses.dataclass(frozen=True)
class Sink:
    """One output of a run. Subclasses define write() and publish().

    name: the sink's key under the manifest's "files" (a plain word: it may name files).
    """

    name: str

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"a sink's name must be a plain word, not {self.name!r}")

    @property
    def label(self) -> str:
        """The step label of its write(): WriteCaptions for "captions"."""
        return "Write" + _camel(self.name)

    def write(self) -> beam.PTransform:
        """-> the PTransform: {key: PCollection} of the run's records -> what it wrote."""
        raise NotImplementedError

    def publish(self, written: list) -> Any:
        """Everything write() output (in no order) -> this sink's manifest entry. Runs in
        the manifest step, before the manifest is written; it may finish the output
        (rename temp files); it must be safe to repeat (a retried step)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Shards(Sink):
    """Some of the run's records -> NAME-SSSSS-of-NNNNN.SUFFIX in the run directory.

    Each of `keys` has a writer of its own, fused with the stage that makes its records:
    a Flatten in front of one writer would hold a whole run's records in memory on the
    in-memory runner. Every bundle writes a temp file (shards.py); publish() renames
    them and the manifest entry lists the final names.
    """

    run_dir: str
    keys: tuple[str, ...]  # which of the records it writes
    fmt: str = "jsonl"  # a key of shards.FORMATS

    def __post_init__(self):
        super().__post_init__()
        if not self.keys:
            raise ValueError(f"sink {self.name}: names no records to write")
        if self.fmt not in FORMATS:
            raise ValueError(f"sink {self.name}: format {self.fmt!r} is not one of {sorted(FORMATS)}")

    def write(self) -> beam.PTransform:
        return WriteShards(temp_dir_of(self.run_dir), self.name, self.keys, self.fmt)

    def publish(self, written: list) -> list[str]:
        return sorted(files.basename(f) for f in publish_shards(self.run_dir, self.name, written, self.fmt))


class WriteShards(beam.PTransform):
    """{key: PCollection} -> the temp files that `keys` were written to, one per bundle."""

    def __init__(self, temp_dir: str, kind: str, keys: tuple[str, ...], fmt: str):
        super().__init__()
        self._temp_dir, self._kind, self._keys, self._fmt = temp_dir, kind, keys, fmt

    def expand(self, records):
        written = tuple(
            records[key] | f"Write{_camel(key)}" >> beam.ParDo(WriteShardFn(self._temp_dir, self._kind, self._fmt))
            for key in self._keys
        )
        return written[0] if len(written) == 1 else written | "FlattenFiles" >> beam.Flatten()


def run_sinks(run_dir: str) -> tuple[Sink, ...]:
    """The run's own outputs: captions-*.jsonl, errors-*.jsonl, catalog-*.parquet."""
    return (
        Shards("captions", run_dir, ("captions",)),
        Shards(ERRORS, run_dir, (ERRORS,)),
        Shards(catalog.CATALOG_PREFIX, run_dir, ROWS, "parquet"),
    )


def _camel(key: str) -> str:
    return "".join(part.title() for part in key.split("_"))
