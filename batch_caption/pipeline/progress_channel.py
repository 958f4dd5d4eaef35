"""How worker processes of the multi-processing DirectRunner send the driver their
progress counts (progress.py's docstring has the whole design).

    Channel       the driver's end: a private temporary directory, named to the workers in
                  their environment (CHANNEL), whose files a thread tails into a Reporter
    Sender        a worker's reporter: appends its counts to a file of its own in there
    path_digest   what a worker sends for a matched path

A file holds one JSON object a line, the counts since the line before: {"expect": [path
digests], "captioned": n, "failed": n, "skipped": n} (each key only when it has some).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time

CHANNEL = "BATCH_CAPTION_PROGRESS_DIR"  # a worker process's environment: where to send counts
SEND_INTERVAL = 0.5  # seconds: a worker process appends its counts at most this often
TAIL_INTERVAL = 0.25  # seconds between the driver's reads of the workers' files


def path_digest(path: str) -> str:
    """What a worker process sends the driver for a matched path: 8 bytes of its BLAKE2b,
    in hex (the driver counts each distinct one once, as Reporter.expect does paths)."""
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


class Sender:
    """A worker process's reporter under the multi-processing DirectRunner: draws nothing,
    and appends what it counted since its last line to its own file in the driver's
    channel `directory`, one JSON line ({"expect": [path digests], kind: n, ...}) at most
    every `interval` seconds (a background thread), and at exit. A write that fails (the
    driver gone, its directory with it) drops those counts: progress never fails the job."""

    def __init__(self, directory: str, interval: float = SEND_INTERVAL):
        self.path = os.path.join(directory, f"{os.getpid()}-{secrets.token_hex(4)}.jsonl")
        self.interval = interval
        self._expect: list[str] = []
        self._by_kind: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        atexit.register(self.flush)

    def expect(self, paths) -> None:
        digests = [path_digest(p) for p in paths]
        with self._lock:
            self._expect += digests
            self._start()

    def add(self, n: int = 1, kind: str = "captioned") -> None:
        with self._lock:
            self._by_kind[kind] = self._by_kind.get(kind, 0) + n
            self._start()

    def close(self) -> None:
        self.flush()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_every_interval, name="batch_caption-progress",
                                            daemon=True)
            self._thread.start()

    def _send_every_interval(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> None:
        """Appends the counts not sent yet (nothing when there are none)."""
        with self._lock:
            if not self._expect and not self._by_kind:
                return
            record = {"expect": self._expect, **self._by_kind} if self._expect else dict(self._by_kind)
            self._expect, self._by_kind = [], {}
            line = memoryview((json.dumps(record, separators=(",", ":")) + "\n").encode())
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    while line:
                        line = line[os.write(fd, line):]
                finally:
                    os.close(fd)
            except OSError:
                pass


class Channel:
    """The driver's end of the worker processes' counts (multi-processing DirectRunner), as
    a context manager around the pipeline's run: on entry a private temporary directory,
    named in this process's environment (CHANNEL) for the workers it starts, and a thread
    that reads the files in it every `interval` seconds into `reporter`; on exit (the
    workers have sent their last counts by then) a last read, the environment as it was,
    and the directory removed."""

    def __init__(self, reporter, interval: float = TAIL_INTERVAL):
        self.reporter = reporter
        self.interval = interval
        self.directory: str | None = None
        self._taken: dict[str, int] = {}  # file name -> bytes read (whole lines)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tail, name="batch_caption-progress", daemon=True)
        self._saved: str | None = None

    def __enter__(self) -> "Channel":
        self.directory = tempfile.mkdtemp(prefix="batch_caption-progress-")
        self._saved = os.environ.get(CHANNEL)
        os.environ[CHANNEL] = self.directory
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.read()
        finally:
            if self._saved is None:
                os.environ.pop(CHANNEL, None)
            else:
                os.environ[CHANNEL] = self._saved
            shutil.rmtree(self.directory, ignore_errors=True)

    def _tail(self) -> None:
        while not self._stop.wait(self.interval):
            self.read()

    def read(self) -> None:
        """Feeds the reporter the whole lines appended since the last read; a line still
        without its newline waits for the next read, one that is not a record is dropped."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return
        for name in names:
            start = self._taken.get(name, 0)
            try:
                with open(os.path.join(self.directory, name), "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            self._taken[name] = start + end
            for line in data[:end].splitlines():
                self._feed(line)

    def _feed(self, line: bytes) -> None:
        record = _parse(line)
        if record is None:
            return
        expect, by_kind = record
        if expect:
            self.reporter.expect(expect)
        for kind, n in by_kind.items():
            if n:
                self.reporter.add(n, kind)


def _parse(line: bytes) -> tuple[list[str], dict[str, int]] | None:
    """A Sender's line -> (path digests, kind -> n); None for anything else."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    expect = record.pop("expect", [])
    if not isinstance(expect, list) or not all(isinstance(d, str) for d in expect):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in record.values()):
        return None
    return expect, record
