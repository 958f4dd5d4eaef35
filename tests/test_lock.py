"""The output lock: one holder at a time, locally and on a GCS emulator that enforces preconditions."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from batch_caption import files
from batch_caption.lock import LOCK_NAME, Holder, LockHeld, OutputLock, parse_age


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "gcs"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("gcs_emulator")  # enforces preconditions, as GCS does
    return f"gs://{bucket}/locks/{request.node.name.replace('[', '_').rstrip(']')}"


def test_second_run_is_refused_with_the_holder_named(output):
    first = OutputLock(output, "night-1").acquire()
    with pytest.raises(LockHeld) as e:
        OutputLock(output, "night-2").acquire()
    assert "run night-1 on" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert e.value.holder.run_id == "night-1"
    first.release()
    OutputLock(output, "night-2").acquire().release()
    assert not files.exists(files.join(output, LOCK_NAME))


def test_context_manager_releases_on_error(output):
    with pytest.raises(RuntimeError):
        with OutputLock(output, "a"):
            raise RuntimeError("boom")
    with OutputLock(output, "b") as lock:
        assert lock.held
    assert not lock.held


def test_stale_lock_is_broken_only_past_the_age(output):
    clock = Clock()
    OutputLock(output, "dead").acquire()  # never released: the run was killed
    clock.t = _lock_time(output) + 100
    with pytest.raises(LockHeld):
        OutputLock(output, "early", clock=clock).acquire(break_older_than=3600)
    clock.t = _lock_time(output) + 7200
    late = OutputLock(output, "late", clock=clock).acquire(break_older_than=3600)
    assert Holder.from_json(files.read_bytes(files.join(output, LOCK_NAME))).run_id == "late"
    late.release()


def test_release_leaves_a_lock_that_another_run_took_over(output):
    clock = Clock()
    slow = OutputLock(output, "slow").acquire()
    clock.t = _lock_time(output) + 10
    OutputLock(output, "taker", clock=clock).acquire(break_older_than=5)
    slow.release()  # its lock was broken: it must not delete the taker's
    assert Holder.from_json(files.read_bytes(files.join(output, LOCK_NAME))).run_id == "taker"


def test_an_unreadable_lock_object_still_blocks(output):
    files.write_bytes(files.join(output, LOCK_NAME), b"\x00not json")
    with pytest.raises(LockHeld, match="unreadable lock object"):
        OutputLock(output, "x").acquire()


def _lock_time(output: str) -> float:
    """The store's own time of the lock object (what the age is measured from)."""
    lock = OutputLock(output, "probe")
    return lock._store.read().modified


def _contend(output: str, run_id: str, start, results) -> None:
    start.wait()
    try:
        OutputLock(output, run_id).acquire()
        results.put(("won", run_id))
    except LockHeld as e:
        results.put(("lost", e.holder.run_id if e.holder else None))


@pytest.mark.parametrize("n", [6])
def test_runs_started_together_exactly_one_wins(output, n):
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(output, f"run-{i}", start, results)) for i in range(n)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = [who for kind, who in outcomes if kind == "won"]
    assert len(winners) == 1, outcomes
    assert all(who == winners[0] for kind, who in outcomes if kind == "lost"), outcomes
    assert json.loads(files.read_bytes(files.join(output, LOCK_NAME)))["run_id"] == winners[0]


def test_parse_age():
    assert parse_age("90s") == 90 and parse_age("45m") == 2700 and parse_age("6h") == 21600
    assert parse_age("2d") == 172800 and parse_age("30") == 30
    for bad in ("", "h", "-1h", "0", "soon"):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_a_lock_whose_holder_died_on_this_host_is_taken_at_once(output):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    holder = Holder("killed", __import__("socket").gethostname(), pid, 0.0, "t0")
    files.write_bytes(files.join(output, LOCK_NAME), holder.to_json())
    OutputLock(output, "next").acquire().release()
    other_host = Holder("elsewhere", "another-host", pid, 0.0, "t1")
    files.write_bytes(files.join(output, LOCK_NAME), other_host.to_json())
    with pytest.raises(LockHeld, match="run elsewhere on another-host"):
        OutputLock(output, "next").acquire()
