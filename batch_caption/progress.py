"""A progress line for runs on one machine (the DirectRunner in memory).

Beam's DirectRunner gives the driver no metrics until the pipeline has finished, so
progress is reported from inside the workers: one reporter per process (several DoFn
instances in a process share it), printing to stderr at most every `interval` seconds.
"""

from __future__ import annotations

import sys
import threading
import time

_lock = threading.Lock()
_reporter: "Reporter | None" = None


class Reporter:
    """Counts finished images and prints `done, rate, ETA` lines."""

    def __init__(self, total: int | None = None, interval: float = 5.0, stream=None):
        self.total = total
        self.interval = interval
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._last = self._start
        self._lock = threading.Lock()

    def expect(self, n: int = 1) -> None:
        """Adds n to the known total."""
        with self._lock:
            self.total = (self.total or 0) + n

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"[batch_caption] {self.done:,} images captioned, {rate:.1f} img/s"
        if self.total:
            left = max(self.total - self.done, 0)
            eta = f"{left / rate:.0f} s" if rate > 0 else "?"
            text = f"[batch_caption] {self.done:,}/{self.total:,} images captioned, {rate:.1f} img/s, ETA {eta}"
        return text


def reporter() -> Reporter:
    """This process's reporter (created on first use; the total grows with `expect`)."""
    global _reporter
    with _lock:
        if _reporter is None:
            _reporter = Reporter()
        return _reporter


def reset() -> None:
    """Starts a fresh count (the driver calls this before each run)."""
    global _reporter
    with _lock:
        _reporter = Reporter()
