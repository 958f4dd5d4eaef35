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
    """Counts finished images (captioned, failed or skipped) and prints `done, rate, ETA`
    lines.

    The rate is measured from the first finished image on: everything before it (pipeline
    start, model load, filling the first batch) is paid once, and counting it would make
    the first lines' ETA of a long job many times too long.
    """

    def __init__(self, total: int | None = None, interval: float = 5.0, stream=None, clock=time.monotonic):
        self.total = total
        self.interval = interval
        self.stream = stream or sys.stderr
        self.by_kind: dict[str, int] = {}  # "captioned", "failed", "skipped" -> count
        self._expected: set[str] = set()  # paths counted in total
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._first: float | None = None  # when the first image finished
        self._first_done = 0  # images counted at that moment
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        return sum(self.by_kind.values())

    def expect(self, paths) -> None:
        """Adds the paths not seen before to the known total (the job reads a path matched
        by two patterns, or named by a pattern and a list, once)."""
        with self._lock:
            new = set(paths) - self._expected
            self._expected |= new
            self.total = (self.total or 0) + len(new)

    def add(self, n: int = 1, kind: str = "captioned") -> None:
        """n more images finished as `kind` (each matched path ends captioned, failed or
        skipped, so the count reaches the total)."""
        with self._lock:
            self.by_kind[kind] = self.by_kind.get(kind, 0) + n
            now = self._clock()
            if self._first is None:
                self._first, self._first_done = now, self.done
            if now - self._last >= self.interval:
                self._last = now
                print(self.line(now), file=self.stream, flush=True)

    def rate(self, now: float | None = None) -> float | None:
        """Images/s since the first finished image; None until there is a span to measure."""
        now = self._clock() if now is None else now
        if self._first is None or now <= self._first or self.done <= self._first_done:
            return None
        return (self.done - self._first_done) / (now - self._first)

    def line(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        rate = self.rate(now)
        done = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        others = {k: n for k, n in self.by_kind.items() if k != "captioned" and n}
        if others:
            kinds = ", ".join(f"{n:,} {k}" for k, n in {"captioned": self.by_kind.get("captioned", 0), **others}.items())
            parts = [f"[batch_caption] {done} images done ({kinds})"]
        else:
            parts = [f"[batch_caption] {done} images captioned"]
        if rate is not None:
            parts.append(f"{rate:.1f} img/s")
        elif self._first is not None:
            parts.append(f"first after {self._first - self._start:.1f} s")
        if self.total:
            left = max(self.total - self.done, 0)
            parts.append(f"ETA {left / rate:.0f} s" if rate else ("ETA 0 s" if not left else "ETA ?"))
        return ", ".join(parts)


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
