"""Counts for the manifest, summed per bundle where many elements share them.

A stage that decides about many files at once (a partition of the incremental join)
counts in a TallyFn and emits one ((kind, name), n) per kind at the end of each bundle,
on its 'tallies' output; `count` does the same for any PCollection. WriteRun sums every
stage's tallies per key. Per-bundle sums keep a million-file run from moving a million
one-count elements into the sum.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

TAG = "tallies"


class TallyFn(beam.DoFn):
    """A DoFn that counts with tally() and emits the bundle's sums on the 'tallies' tag."""

    def start_bundle(self):
        self._tallies: dict[tuple[str, str], int] = {}

    def tally(self, kind: str, n: int = 1, name: str = "") -> None:
        if n:
            self._tallies[(kind, name)] = self._tallies.get((kind, name), 0) + n

    def finish_bundle(self):
        for key, n in self._tallies.items():
            yield beam.pvalue.TaggedOutput(TAG, WindowedValue((key, n), MIN_TIMESTAMP, [GlobalWindow()]))
        self._tallies = {}


class _CountFn(TallyFn):
    def __init__(self, keys):
        self._keys = keys

    def process(self, element):
        for kind, name in self._keys(element):
            self.tally(kind, 1, name)


def count(pcoll, label: str, keys):
    """The per-bundle counts of the (kind, name) keys that `keys(element)` lists for each
    element of `pcoll`: ((kind, name), n) elements, one per key and bundle."""
    return (pcoll | label >> beam.ParDo(_CountFn(keys)).with_outputs(TAG, main="nothing"))[TAG]


def each(kind: str, name: str = ""):
    """keys() for `count`: every element counts once as (kind, name)."""
    return lambda _: ((kind, name),)
