"""One writer per output: a lock object under --output, taken before a run touches it.

The lock is one small JSON object, OUTPUT/_LOCK, naming its holder (run id, host, pid,
start time, a random token). Taking it is a create that fails when the object exists: a
hard link to a fully written file on local disks, a create-only precondition
(ifGenerationMatch=0) on gs://, which Beam's FileSystems does not expose, so
google-cloud-storage is used directly. Release deletes the object only while it is still
the holder's own (same token locally, same generation on GCS), so a lock broken and
retaken by another run survives the first run's release.

A lock left by a run that died (SIGKILL, a lost machine) is broken when there is
evidence that holds across PID namespaces and machines: the holder ran in this kernel boot
(/proc/sys/kernel/random/boot_id) and in this PID namespace, and its pid is gone or now
names a process started at another time (/proc/<pid>/stat). A host name and a pid alone
are no evidence (another container, another machine of the same name on a shared disk).
Without evidence, a lock is broken only when a run passes `break_older_than` seconds and
the lock object is older than that.

Breaking is atomic: on GCS the delete is conditional on the generation read; locally the
one caller that creates the marker `_LOCK.<hash of version>.breaking` (create-only) may delete
that version, so the file it then finds under the lock's name is still the one it read,
and every other breaker of it gives up. A release goes the same way. Other schemes
(s3://, ...) have no create-only primitive here: their lock is checked, then written,
which narrows the race but does not close it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Callable

from batch_caption.storage import files, gcs

LOCK_NAME = "_LOCK"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock object says."""

    run_id: str
    host: str
    pid: int
    started: float  # seconds since the epoch, the holder's clock
    token: str
    # Evidence of the process, for telling whether it died ("" / None: unknown, as in
    # locks written before these fields, or where /proc has no such file).
    boot_id: str = ""  # the kernel boot's random id
    pid_ns: str = ""  # the PID namespace, e.g. "pid:[4026531836]"
    pid_start: int | None = None  # the process's start time, clock ticks since boot

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        """The holder, or None for an object that is not a lock this code wrote."""
        try:
            raw = json.loads(data)
            start = raw.get("pid_start")
            return cls(str(raw["run_id"]), str(raw["host"]), int(raw["pid"]), float(raw["started"]), str(raw["token"]),
                       str(raw.get("boot_id") or ""), str(raw.get("pid_ns") or ""),
                       None if start is None else int(start))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return f"run {self.run_id} on {self.host} (pid {self.pid}), started {started}"


class LockHeld(RuntimeError):
    """Another run holds the output's lock; the message names it."""

    def __init__(self, path: str, holder: Holder | None, age: float):
        who = holder.describe() if holder else "an unreadable lock object"
        super().__init__(f"{path} is held by {who}; lock age {_age_text(age)}")
        self.path = path
        self.holder = holder


def _age_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def boot_id() -> str:
    """This kernel boot's random id; "" where there is none to read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace, e.g. "pid:[4026531836]"; "" where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None when it cannot be read
    (no such process, or /proc hides it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The name in parentheses may hold spaces and ")": the fields follow the last ")".
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _died_here(holder: Holder) -> bool:
    """Whether there is evidence that the holder's process is gone: it ran in this boot and
    this PID namespace, and its pid is free or names a process started at another time.
    Its lock is then broken at once, whatever its age."""
    if not holder.boot_id or holder.boot_id != boot_id():
        return False
    if not holder.pid_ns or holder.pid_ns != pid_namespace():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, but another user's: its start time says whether it is the holder
        pass
    start = process_start(holder.pid)
    return start is not None and holder.pid_start is not None and start != holder.pid_start


def parse_age(text: str) -> float:
    """'90s', '45m', '6h', '2d' or plain seconds -> seconds; ValueError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not an age such as 90s, 45m, 6h or 2d") from None
    if not value > 0:
        raise ValueError(f"an age must be positive, got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class _Found:
    data: bytes
    version: str  # local: the holder's token; GCS: the object generation
    modified: float  # the store's time of the object, seconds since the epoch


class _AlreadyExists(Exception):
    pass


class _LocalStore:
    """A lock file on a local (or mounted) disk."""

    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes, token: str) -> str:
        """Written whole under a name of its own, then linked to the lock's name: link()
        fails when the name exists, and a reader never sees a half-written lock."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        own = f"{self.path}.{token}.new"
        with open(own, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(own, self.path)
        except FileExistsError:
            raise _AlreadyExists() from None
        except OSError:  # a filesystem without hard links: an exclusive create, then the write
            self._create_exclusive(data)
        finally:
            os.remove(own)
        return token

    def _create_exclusive(self, data: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise _AlreadyExists() from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def read(self) -> _Found | None:
        try:
            with files.open_regular(self.path) as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _Found(data, _local_version(data), modified)

    def delete(self, version: str) -> bool:
        """Deletes the lock if it is `version`, as the one caller that creates the marker of
        that version: nothing else may delete it meanwhile, and nothing can be created
        under the lock's name while it is there, so the lock checked is the lock deleted.
        A lock never moves out of the way, so none is ever lost putting it back."""
        # Named by a hash: a foreign lock's token may hold any character.
        marker = f"{self.path}.{hashlib.sha256(version.encode()).hexdigest()[:32]}.breaking"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:  # another caller is deleting this version
            return False
        try:
            found = self.read()
            if found is None or found.version != version:
                return False  # gone, or another lock since: a version never comes back
            os.remove(self.path)
            return True
        finally:
            os.remove(marker)


def _local_version(data: bytes) -> str:
    """A local lock's version: its holder's token, or for an object that is not a lock
    this code wrote, a hash of its bytes (never reused by another lock)."""
    holder = Holder.from_json(data)
    return holder.token if holder else "raw-" + hashlib.sha256(data).hexdigest()[:32]


class _GcsStore:
    """A lock object on Cloud Storage, created and deleted under generation preconditions."""

    def __init__(self, path: str):
        bucket, _, name = path[len("gs://"):].partition("/")
        self.path = path
        self._blob = gcs.client().bucket(bucket).blob(name)

    def create(self, data: bytes, token: str) -> str:
        from google.api_core import exceptions

        try:
            self._blob.upload_from_string(data, content_type="application/json", if_generation_match=0)
        except exceptions.PreconditionFailed:
            raise _AlreadyExists() from None
        return str(self._blob.generation)

    def read(self) -> _Found | None:
        from google.api_core import exceptions

        try:
            blob = self._blob.bucket.get_blob(self._blob.name)
            if blob is None:
                return None
            # Taken before the download, which may reset them. Replaced between the two
            # calls: the generation is stale, so a conditional delete of it fails.
            generation, updated = blob.generation, blob.updated
            data = blob.download_as_bytes()
        except exceptions.NotFound:  # released meanwhile
            return None
        return _Found(data, str(generation), updated.timestamp() if updated else time.time())

    def delete(self, version: str) -> bool:
        from google.api_core import exceptions

        found = self.read()  # also checked here: some emulators ignore the precondition on delete
        if found is None or found.version != version:
            return False
        try:
            self._blob.bucket.blob(self._blob.name).delete(if_generation_match=int(version))
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        return True


class _CheckThenWriteStore:
    """Schemes without a create-only write: check, then write (a narrow race remains)."""

    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes, token: str) -> str:
        if files.exists(self.path):
            raise _AlreadyExists()
        files.write_bytes(self.path, data, mime_type="application/json")
        return token

    def read(self) -> _Found | None:
        if not files.exists(self.path):
            return None
        data = files.read_bytes(self.path)
        holder = Holder.from_json(data)
        return _Found(data, holder.token if holder else "", holder.started if holder else 0.0)

    def delete(self, version: str) -> bool:
        found = self.read()
        if found is None or found.version != version:
            return False
        files.delete([self.path])
        return True


def _store(path: str):
    if path.startswith("gs://"):
        return _GcsStore(path)
    if files.is_remote(path) and not path.startswith("file://"):
        return _CheckThenWriteStore(path)
    return _LocalStore(path[len("file://"):] if path.startswith("file://") else path)


class OutputLock:
    """The lock of one output location, for one run.

    Usage: `with OutputLock(output, run_id).acquire(break_older_than=...)`: ...; or
    acquire() and release() in a try/finally. acquire raises LockHeld naming the holder.
    """

    def __init__(self, output: str, run_id: str, clock: Callable[[], float] = time.time):
        self.path = files.join(output, LOCK_NAME)
        self._store = _store(self.path)
        self._clock = clock
        self.holder = Holder(run_id, socket.gethostname(), os.getpid(), clock(), uuid.uuid4().hex,
                             boot_id(), pid_namespace(), process_start(os.getpid()))
        self._version: str | None = None

    def acquire(self, break_older_than: float | None = None) -> OutputLock:
        """Takes the lock, breaking one older than `break_older_than` seconds if given."""
        for _ in range(3):  # the lock may be released or broken between create and read
            try:
                self._version = self._store.create(self.holder.to_json(), self.holder.token)
                return self
            except _AlreadyExists:
                pass
            found = self._store.read()
            if found is None:
                continue
            age = self._clock() - found.modified
            holder = Holder.from_json(found.data)
            dead = holder is not None and _died_here(holder)
            if not dead and (break_older_than is None or age <= break_older_than):
                raise LockHeld(self.path, holder, age)
            if self._store.delete(found.version):
                who = holder.describe() if holder else "an unreadable lock object"
                _log.warning("broke the lock %s of %s, %s old", self.path, who, _age_text(age))
        found = self._store.read()
        holder = Holder.from_json(found.data) if found else None
        raise LockHeld(self.path, holder, self._clock() - found.modified if found else 0.0)

    @property
    def held(self) -> bool:
        return self._version is not None

    def release(self) -> None:
        """Deletes the lock if it is still this run's own; says so if it was taken over."""
        if self._version is None:
            return
        version, self._version = self._version, None
        if not self._store.delete(version):
            _log.warning("the lock %s was no longer this run's (broken by another run?)", self.path)

    def __enter__(self) -> OutputLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
