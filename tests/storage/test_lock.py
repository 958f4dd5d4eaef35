"""The output lock: one holder at a time, locally and on a GCS emulator that enforces preconditions."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time

import pytest

from batch_caption.storage import files, lock
from batch_caption.storage.lock import LOCK_NAME, Holder, LockHeld, OutputLock, parse_age


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


def _exited_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)  # that process has exited


def _here(run_id: str, pid: int, token: str, **evidence) -> Holder:
    """A holder that ran in this boot and PID namespace, unless `evidence` says otherwise."""
    fields = {"boot_id": lock.boot_id(), "pid_ns": lock.pid_namespace(), "pid_start": 12345, **evidence}
    return Holder(run_id, socket.gethostname(), pid, 0.0, token, **fields)


def test_a_lock_whose_holder_died_on_this_host_is_taken_at_once(output):
    pid = _exited_pid()
    files.write_bytes(files.join(output, LOCK_NAME), _here("killed", pid, "t0").to_json())
    OutputLock(output, "next").acquire().release()
    other_host = Holder("elsewhere", "another-host", pid, 0.0, "t1")
    files.write_bytes(files.join(output, LOCK_NAME), other_host.to_json())
    with pytest.raises(LockHeld, match="run elsewhere on another-host"):
        OutputLock(output, "next").acquire()


def test_a_reused_pid_is_no_proof_of_life():
    me = _here("me", os.getpid(), "t", pid_start=lock.process_start(os.getpid()))
    assert not lock._died_here(me)
    assert lock._died_here(_here("before", os.getpid(), "t", pid_start=lock.process_start(os.getpid()) - 1))


@pytest.mark.parametrize("evidence", [
    {"pid_ns": "pid:[1]"},  # another PID namespace: its pids say nothing here
    {"boot_id": "00000000-0000-0000-0000-000000000000"},  # another machine or boot of the same name
    {"boot_id": "", "pid_ns": "", "pid_start": None},  # a lock without evidence (older code)
])
def test_a_live_lock_from_another_namespace_or_machine_is_never_broken(output, evidence):
    files.write_bytes(files.join(output, LOCK_NAME), _here("alive", _exited_pid(), "t0", **evidence).to_json())
    with pytest.raises(LockHeld, match="run alive on"):
        OutputLock(output, "next").acquire()
    assert Holder.from_json(files.read_bytes(files.join(output, LOCK_NAME))).run_id == "alive"


def _race(output: str, callers: int, rounds: int, break_older_than: float | None = None) -> None:
    """Each round: a dead holder's lock, `callers` threads that break it together (a
    barrier starts them); exactly one must win, and its lock must be the one left."""
    dead = _exited_pid()
    path = files.join(output, LOCK_NAME)
    for r in range(rounds):
        if break_older_than is None:  # dead by evidence
            files.write_bytes(path, _here(f"dead-{r}", dead, f"dead{r}").to_json())
        else:  # no evidence, but old: the lost machine's lock
            files.write_bytes(path, Holder(f"dead-{r}", "lost-host", 1, 0.0, f"dead{r}").to_json())
            old = time.time() - 2 * break_older_than
            os.utime(path, (old, old))
        barrier, outcomes = threading.Barrier(callers), []

        def contend(i, r=r):
            taker = OutputLock(output, f"r{r}-{i}")
            barrier.wait()
            try:
                taker.acquire(break_older_than=break_older_than)
                outcomes.append(taker)
            except LockHeld:
                pass

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), f"round {r}: a breaker hangs"
        assert len(outcomes) == 1, f"round {r}: {len(outcomes)} winners"
        assert Holder.from_json(files.read_bytes(path)).run_id == outcomes[0].holder.run_id
        outcomes[0].release()
        assert not files.exists(path)


def test_breakers_of_a_dead_lock_have_exactly_one_winner_locally(tmp_path):
    _race(str(tmp_path / "out"), callers=8, rounds=300)


def test_breakers_of_an_old_lock_have_exactly_one_winner_locally(tmp_path):
    _race(str(tmp_path / "out"), callers=6, rounds=150, break_older_than=3600)


def test_breakers_of_a_dead_lock_have_exactly_one_winner_on_gcs(gcs_emulator):
    _race(f"gs://{gcs_emulator}/locks/race", callers=6, rounds=15)
