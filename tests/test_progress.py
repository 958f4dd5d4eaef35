"""progress.py: the bar on a terminal, plain lines in logs, counts from a remote job's
metrics."""

from __future__ import annotations

import io
import re

from apache_beam.runners.runner import PipelineState

from batch_caption import progress
from batch_caption.progress import Reporter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_with_count_total_rate_and_eta(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    now = [0.0]
    stream = _Terminal()
    r = Reporter(stream=stream, clock=lambda: now[0])
    r.expect([f"p{i}" for i in range(10)])
    now[0] = 2.0
    r.add(1)
    now[0] = 3.0
    r.add(4)
    assert r.detail() == "4.0 img/s, ETA 1 s"
    now[0] = 4.0
    r.add(5, "failed")
    r.close()
    shown = ANSI.sub("", stream.getvalue())
    assert "[batch_caption]" in shown and "10/10" in shown
    assert "5 captioned, 5 failed, 4.5 img/s, ETA 0 s" in shown


def test_logs_get_a_plain_line_per_interval_from_the_first_image():
    now = [0.0]
    stream = io.StringIO()
    r = Reporter(total=100, interval=15.0, stream=stream, clock=lambda: now[0])
    r.expect(["a"])  # no line before an image has finished
    for t in (20.0, 25.0, 36.0):
        now[0] = t
        r.add(10)
    r.close()
    assert stream.getvalue().splitlines() == [
        "[batch_caption] 10/101 images captioned, first after 20.0 s, ETA ?",
        "[batch_caption] 30/101 images captioned, 1.2 img/s, ETA 57 s",
    ]


def test_counts_from_metrics_sum_the_failed_stages():
    by_kind, total = progress.counts_from_metrics(
        {"matched": 9, "captioned": 4, "failed_read": 1, "failed_decode": 2, "skipped": 1, "bytes_read": 99})
    assert by_kind == {"captioned": 4, "failed": 3, "skipped": 1} and total == 9
    assert progress.counts_from_metrics({})[1] is None


class _RemoteJob:
    """A PipelineResult of a job running elsewhere: RUNNING for `polls` waits, then DONE."""

    def __init__(self, counters):
        self.counters = counters
        self.waits = []

    def wait_until_finish(self, duration=None):
        self.waits.append(duration)
        return PipelineState.RUNNING if len(self.waits) <= len(self.counters) else PipelineState.DONE


def test_follow_feeds_the_reporter_from_a_running_jobs_counters():
    job = _RemoteJob([{"matched": 50}, {"matched": 200, "captioned": 150, "failed_infer": 10}])
    seen = []
    r = Reporter(stream=io.StringIO(), interval=0.0)
    original = r.set_counts
    r.set_counts = lambda by_kind, total: (seen.append((dict(by_kind), total)), original(by_kind, total))
    assert progress.follow(job, lambda result: job.counters[len(job.waits) - 1], r, interval=2.0) == PipelineState.DONE
    assert job.waits == [2000, 2000, 2000]
    assert seen == [({"captioned": 0, "failed": 0, "skipped": 0}, 50),
                    ({"captioned": 150, "failed": 10, "skipped": 0}, 200)]
    assert r.line().startswith("[batch_caption] 160/200 images done (150 captioned, 10 failed)")


def test_follow_returns_at_once_for_a_runner_that_finished_inside_run():
    class Finished:
        def wait_until_finish(self, duration=None):
            return PipelineState.DONE

    def never(_):
        raise AssertionError("no metrics query for a finished job")

    assert progress.follow(Finished(), never, Reporter(stream=io.StringIO())) == PipelineState.DONE
