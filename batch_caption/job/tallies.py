"""Counts for the manifest, summed per bundle where many elements share them.

A stage that decides about many files at once (a partition of the incremental join)
counts in a TallyFn and emits one ((kind, name), n) per kind at the end of each bundle,
on its 'tallies' output; WriteRun sums every stage's tallies per key.
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


def one(kind: str, name: str = ""):
    """A per-element tally: element -> ((kind, name), 1)."""
    return lambda _: ((kind, name), 1)
