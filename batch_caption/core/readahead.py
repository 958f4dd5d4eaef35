"""A DoFn base that works ahead of its consumer in a small thread pool.

File reads, sha256, Pillow's decode and resize and TensorFlow all release the GIL, so a
pool can read and decode the next images while the current batch is captioned. On the
in-memory DirectRunner every step of a fused stage otherwise runs one after the other in
the one bundle thread; on a cloud runner the threads also overlap storage latency.
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam


class ReadAheadFn(beam.DoFn):
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
