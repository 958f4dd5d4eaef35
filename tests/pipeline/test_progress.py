"""progress.py: the bar on a terminal, plain lines in logs, counts from a remote job's
metrics, and from the worker processes of the multi-processing DirectRunner
(progress_channel.py)."""

from __future__ import annotations

import io
import json
import os
import re
import time

import pytest
from apache_beam.runners.runner import PipelineState
from helpers import varied_images
from PIL import Image

from batch_caption import run
from batch_caption.pipeline import progress
from batch_caption.pipeline.progress import Reporter
from batch_caption.pipeline.progress_channel import CHANNEL, Channel, Sender, path_digest

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


def _plain(interval=0.0):
    return Reporter(stream=io.StringIO(), interval=interval)


def test_a_worker_processs_reporter_sends_its_counts_in_batches_and_draws_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(CHANNEL, str(tmp_path))
    monkeypatch.setattr(progress, "_reporter", None)  # a fresh process
    sender = progress.reporter()
    assert isinstance(sender, Sender) and progress.reporter() is sender
    sender.interval = 60.0  # its thread sends nothing during the test: only flush() does
    sender.expect(["a.jpg", "b.jpg"])
    for _ in range(3):
        sender.add(1)
    sender.add(2, "failed")
    assert not os.listdir(tmp_path)  # nothing written per image
    sender.flush()
    sender.flush()  # nothing new: no line
    sender.add(1, "skipped")
    sender.close()
    [name] = os.listdir(tmp_path)
    with open(tmp_path / name) as f:
        lines = [json.loads(line) for line in f]
    assert lines == [{"expect": [path_digest("a.jpg"), path_digest("b.jpg")], "captioned": 3, "failed": 2},
                     {"skipped": 1}]
    assert capsys.readouterr() == ("", "")


def test_a_sender_whose_driver_is_gone_drops_its_counts(tmp_path):
    sender = Sender(str(tmp_path / "gone"), interval=60.0)
    sender.add(1)
    sender.flush()  # no error: progress never fails the job


def test_the_channel_sums_several_writers_and_reads_whole_lines_only(monkeypatch):
    monkeypatch.delenv(CHANNEL, raising=False)
    reporter = _plain()
    with Channel(reporter, interval=60.0) as channel:  # only read() reads here
        directory = channel.directory
        assert os.environ[CHANNEL] == directory and os.listdir(directory) == []
        a, b = Sender(directory, interval=60.0), Sender(directory, interval=60.0)
        a.expect(["x", "y"])
        b.expect(["y", "z"])  # a path two workers matched counts once
        a.add(2)
        b.add(1, "failed")
        a.flush()
        b.flush()
        with open(os.path.join(directory, "crashed.jsonl"), "wb") as f:
            f.write(b'not a record\n["nor", "this"]\n{"expect": "xyz"}\n{"captioned": 5')  # the last line half written
        channel.read()
        assert (reporter.by_kind, reporter.total) == ({"captioned": 2, "failed": 1}, 3)
        with open(os.path.join(directory, "late.jsonl"), "wb") as f:
            f.write(b'{"captioned": 1')
        channel.read()
        with open(os.path.join(directory, "late.jsonl"), "ab") as f:
            f.write(b', "skipped": 2}\n')
        channel.read()
        assert reporter.by_kind == {"captioned": 3, "failed": 1, "skipped": 2}
        a.add(1)
        a.flush()
    # The last read on exit took a's last line, not the half line the crashed writer left.
    assert (reporter.by_kind, reporter.total) == ({"captioned": 4, "failed": 1, "skipped": 2}, 3)
    assert not os.path.exists(directory) and CHANNEL not in os.environ


def test_the_channel_feeds_the_reporter_while_the_run_goes_on(monkeypatch):
    monkeypatch.delenv(CHANNEL, raising=False)
    reporter = _plain()
    with Channel(reporter, interval=0.01) as channel:
        sender = Sender(channel.directory, interval=0.01)
        sender.expect(["a", "b"])
        sender.add(1)
        deadline = time.monotonic() + 10
        while reporter.done < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (reporter.done, reporter.total) == (1, 2)
    assert reporter.stream.getvalue().startswith("[batch_caption] 1/2 images captioned")


def test_the_channel_goes_however_the_run_ends(monkeypatch):
    monkeypatch.setenv(CHANNEL, "/an/outer/run")
    with pytest.raises(RuntimeError, match="pipeline failed"):
        with Channel(_plain()) as channel:
            with open(os.path.join(channel.directory, "w.jsonl"), "w") as f:
                f.write('{"captioned": 1}\n')
            raise RuntimeError("pipeline failed")
    assert not os.path.exists(channel.directory) and os.environ[CHANNEL] == "/an/outer/run"


@pytest.mark.slow
def test_multi_processing_workers_report_through_the_driver(tiny_bundle, tmp_path, monkeypatch, capfd):
    # Plain lines (not a terminal), one per count: the driver prints them, fed by the two
    # worker processes, before the summary; the workers print none, and the channel goes.
    src = tmp_path / "in"
    src.mkdir()
    for i, px in enumerate(varied_images(5, 64, seed=3)):
        Image.fromarray(px).save(src / f"{i}.png")
    channels = []
    enter = Channel.__enter__
    monkeypatch.setattr(Channel, "__enter__", lambda self: channels.append(enter(self)) or self)
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    shown = io.StringIO()
    monkeypatch.setattr("sys.stdout", shown)
    monkeypatch.setattr("sys.stderr", shown)
    code = run.main(["--input", str(src), "--input", str(src / "0.png"), "--output", str(tmp_path / "out"),
                     "--model", tiny_bundle, "--run_id", "mp", "--batch_size", "2",
                     "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    lines = shown.getvalue().splitlines()
    assert code == 0, lines
    assert lines[-1].startswith("run=mp: 5 inputs, 5 captioned, 0 failed in ")
    counted = [line for line in lines if re.match(r"\[batch_caption\] \d+/5 images captioned", line)]
    assert counted and lines.index(counted[0]) < len(lines) - 1
    assert counted[-1].startswith("[batch_caption] 5/5 images captioned") and "ETA 0 s" in counted[-1]
    assert not ANSI.search(shown.getvalue())
    assert "[batch_caption]" not in capfd.readouterr().err  # no worker drew anything
    [channel] = channels
    assert not os.path.exists(channel.directory) and CHANNEL not in os.environ
