"""The run's progress: a bar on a terminal, a plain line at an interval in logs.

Where the counts come from depends on the runner. Beam's DirectRunner gives the driver no
metrics until the pipeline has finished, so there the stages count as they go: matching
adds the total (each distinct path once), writing adds each finished image. In memory
they run in the driver's process and feed its Reporter (one per process, shared by the
DoFn instances in it). The multi-processing DirectRunner runs them in worker processes:
before the pipeline runs the driver opens a `Channel` (progress_channel.py), a private
temporary directory named to the workers in their environment (CHANNEL); a worker's
`reporter()` is then a `Sender`, which draws nothing and appends what it counted
(digests of the matched paths, finished images by kind) as one JSON line to a file of
its own, at most every SEND_INTERVAL seconds and at exit; a driver thread tails the
files into the Reporter, taking whole lines only (a line a crashed worker left half
written is never read), and the directory goes when the run ends, however it ends. A
runner whose `run()` returns while the job runs elsewhere (Dataflow, Flink, Spark) is
followed from the driver instead: `follow` polls the job's Beam counters (matched;
captioned, failed_*, skipped) into the Reporter. Only the driver draws; the run's
summary line comes from the manifest, the same on every runner.

On a terminal (stderr a TTY, TERM not dumb) the Reporter draws a rich progress bar:
count / total (once known), rate and ETA; elsewhere it prints a line every `interval`
seconds. Rate and ETA count from the first finished image.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from batch_caption.pipeline.progress_channel import CHANNEL, Sender

LOG_INTERVAL = 15.0  # seconds between plain lines in logs
POLL_INTERVAL = 5.0  # seconds between metric queries of a remote job

_lock = threading.Lock()
_reporter: "Reporter | Sender | None" = None


def on_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


class Reporter:
    """Counts finished images (captioned, failed or skipped) and shows `done, rate, ETA`.

    The rate is measured from the first finished image on: everything before it (pipeline
    start, model load, filling the first batch) is paid once, and counting it would make
    the first ETAs of a long job many times too long.

    bar: draw a progress bar (default: when `stream` is a terminal); else a line every
    `interval` seconds (default LOG_INTERVAL).
    """

    def __init__(self, total: int | None = None, interval: float | None = None, stream=None, clock=time.monotonic,
                 bar: bool | None = None):
        self.total = total
        self.interval = LOG_INTERVAL if interval is None else interval
        self.stream = stream or sys.stderr
        self.by_kind: dict[str, int] = {}  # "captioned", "failed", "skipped" -> count
        self._expected: set[str] = set()  # paths counted in total
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._first: float | None = None  # when the first image finished
        self._first_done = 0  # images counted at that moment
        self._counted: float | None = None  # when the count last changed
        self._lock = threading.Lock()
        self._bar_wanted = on_terminal(self.stream) if bar is None else bar
        self._bar = None  # rich Progress, started with the first count
        self._task = None

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
            self._show(self._clock())

    def add(self, n: int = 1, kind: str = "captioned") -> None:
        """n more images finished as `kind` (each matched path ends captioned, failed or
        skipped, so the count reaches the total)."""
        with self._lock:
            self._count({**self.by_kind, kind: self.by_kind.get(kind, 0) + n}, self.total)

    def set_counts(self, by_kind: dict[str, int], total: int | None) -> None:
        """The counts as a whole, from the job's metrics (`follow`)."""
        with self._lock:
            self._count(dict(by_kind), total or self.total)

    def _count(self, by_kind: dict[str, int], total: int | None) -> None:
        before = self.done
        self.by_kind, self.total = by_kind, total
        now = self._clock()
        if self.done > before:
            self._counted = now
            if self._first is None:
                self._first, self._first_done = now, self.done
        self._show(now)

    def _show(self, now: float) -> None:
        if self._bar_wanted:
            self._draw(now)
        elif self._first is not None and now - self._last >= self.interval:
            self._last = now
            print(self.line(now), file=self.stream, flush=True)

    def _draw(self, now: float) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("[batch_caption]", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}", markup=False), console=Console(file=self.stream),
                                 transient=False)
            self._task = self._bar.add_task("images", total=self.total, detail="")
            self._bar.start()
        self._bar.update(self._task, completed=self.done, total=self.total, detail=self.detail(now))

    def close(self) -> None:
        """Draws the bar a last time (the rate as of the last count) and leaves it on the
        terminal."""
        with self._lock:
            if self._bar is not None:
                self._draw(self._counted or self._clock())
                self._bar.stop()
                self._bar = None

    def rate(self, now: float | None = None) -> float | None:
        """Images/s since the first finished image; None until there is a span to measure."""
        now = self._clock() if now is None else now
        if self._first is None or now <= self._first or self.done <= self._first_done:
            return None
        return (self.done - self._first_done) / (now - self._first)

    def _timing(self, now: float) -> list[str]:
        """The rate (or the wait for the first image), and the ETA once the total is known."""
        rate = self.rate(now)
        parts = []
        if rate is not None:
            parts.append(f"{rate:.1f} img/s")
        elif self._first is not None:
            parts.append(f"first after {self._first - self._start:.1f} s")
        if self.total:
            left = max(self.total - self.done, 0)
            parts.append(f"ETA {left / rate:.0f} s" if rate else ("ETA 0 s" if not left else "ETA ?"))
        return parts

    def _kinds(self) -> str | None:
        """'5 captioned, 2 failed, 3 skipped'; None while every image was captioned."""
        others = {k: n for k, n in self.by_kind.items() if k != "captioned" and n}
        if not others:
            return None
        return ", ".join(f"{n:,} {k}" for k, n in {"captioned": self.by_kind.get("captioned", 0), **others}.items())

    def detail(self, now: float | None = None) -> str:
        """What the bar shows after the count."""
        kinds = self._kinds()
        return ", ".join(([kinds] if kinds else []) + self._timing(self._clock() if now is None else now))

    def line(self, now: float | None = None) -> str:
        """The plain line: '[batch_caption] 4/10 images captioned, 3.0 img/s, ETA 2 s'."""
        done = f"{self.done:,}/{self.total:,}" if self.total else f"{self.done:,}"
        kinds = self._kinds()
        head = f"[batch_caption] {done} images " + (f"done ({kinds})" if kinds else "captioned")
        return ", ".join([head, *self._timing(self._clock() if now is None else now)])


def counts_from_metrics(counters: dict[str, int]) -> tuple[dict[str, int], int | None]:
    """The job's counters (name -> value) -> (by kind, total): every matched path ends
    captioned, failed (at read, decode or infer) or skipped."""
    failed = sum(n for name, n in counters.items() if name.startswith("failed_"))
    by_kind = {"captioned": counters.get("captioned", 0), "failed": failed, "skipped": counters.get("skipped", 0)}
    return by_kind, counters.get("matched") or None


def follow(result, query, reporter: Reporter, interval: float = POLL_INTERVAL):
    """Waits for the pipeline `result`; while it runs, feeds `reporter` from `query(result)`
    (the job's counters, name -> value) every `interval` seconds. Returns the final state.
    A runner that finished inside `run()` returns at once."""
    from apache_beam.runners.runner import PipelineState

    while True:
        state = result.wait_until_finish(duration=int(interval * 1000))
        if state is None or PipelineState.is_terminal(state):
            return state
        try:
            counters = query(result)
        except Exception:  # noqa: BLE001 - a metrics hiccup must not fail the run; the next poll retries
            continue
        reporter.set_counts(*counts_from_metrics(counters))


def reporter() -> "Reporter | Sender":
    """This process's reporter (created on first use; the total grows with `expect`): a
    Sender in a worker process of a driver's Channel, else a Reporter."""
    global _reporter
    with _lock:
        if _reporter is None:
            channel = os.environ.get(CHANNEL)
            _reporter = Sender(channel) if channel else Reporter()
        return _reporter


def reset() -> Reporter:
    """Starts a fresh count, drawn by this process (the driver calls this before each run)."""
    global _reporter
    with _lock:
        _reporter = Reporter()
        return _reporter
