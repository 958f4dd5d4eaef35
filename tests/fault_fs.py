"""A Beam filesystem for `faulty:///abs/path` that is the local disk with object-store
writes (a created file appears whole when closed) and that SIGKILLs its process at the
Nth change (a closed create, a rename, a delete): FAULT_KILL_AT=N. FAULT_COUNT_FILE=path
records how many changes a process made, to learn the kill points of a whole run.

Importing this module registers the scheme (Beam finds FileSystem subclasses).
"""

from __future__ import annotations

import atexit
import os
import signal
import uuid

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem

SCHEME = "faulty"
_PREFIX = SCHEME + "://"
_changes = 0


def _local(path: str) -> str:
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else path


def _change() -> None:
    """Counts one change; at FAULT_KILL_AT the process dies here, before making it."""
    global _changes
    _changes += 1
    if _changes == int(os.environ.get("FAULT_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


@atexit.register
def _record() -> None:
    path = os.environ.get("FAULT_COUNT_FILE")
    if path:
        with open(path, "w") as f:
            f.write(str(_changes))


class _WholeOnClose:
    """A write stream whose file appears at its name only when closed, as an object does."""

    def __init__(self, target: str):
        self._target = target
        self._temp = f"{target}.{uuid.uuid4().hex}.upload"
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        self._f = open(self._temp, "wb")
        self.closed = False

    def write(self, data) -> int:
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self._f.close()
        _change()
        os.replace(self._temp, self._target)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FaultyFileSystem(LocalFileSystem):
    @classmethod
    def scheme(cls):
        return SCHEME

    def join(self, basepath, *paths):
        return _PREFIX + os.path.join(_local(basepath), *paths)

    def split(self, path):
        head, tail = os.path.split(os.path.abspath(_local(path)))
        return _PREFIX + head, tail

    def has_dirs(self):
        return False  # an object store: no directories to create or delete

    def mkdirs(self, path):
        pass

    def _list(self, dir_or_prefix):
        for m in super()._list(_local(dir_or_prefix)):
            yield FileMetadata(_PREFIX + m.path, m.size_in_bytes, m.last_updated_in_seconds)

    def create(self, path, mime_type="application/octet-stream", compression_type=None):
        return _WholeOnClose(_local(path))

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        return open(_local(path), "rb")

    def rename(self, source_file_names, destination_file_names):
        _change()
        super().rename([_local(p) for p in source_file_names], [_local(p) for p in destination_file_names])

    def exists(self, path):
        return super().exists(_local(path))

    def size(self, path):
        return super().size(_local(path))

    def last_updated(self, path):
        return super().last_updated(_local(path))

    def checksum(self, path):
        return super().checksum(_local(path))

    def metadata(self, path):
        m = super().metadata(_local(path))
        return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    def delete(self, paths):
        _change()
        super().delete([_local(p) for p in paths])
