"""Importing this module makes the job's shard files (pipeline/shards.py) fill a disk: once
they hold FULL_DISK_BYTES in all, every write raises OSError ENOSPC, as on a full disk
(the rest of the process writes as usual: the model still loads)."""

from __future__ import annotations

import errno
import os
import types

from apache_beam.io.filesystems import FileSystems

from batch_caption.pipeline import shards

_LIMIT = int(os.environ.get("FULL_DISK_BYTES", "0"))
_written = 0


class _Filling:
    """A created file whose writes fail once the disk is full."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        global _written
        if _written + len(data) > _LIMIT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _written += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


shards.FileSystems = types.SimpleNamespace(
    create=lambda path, **kwargs: _Filling(FileSystems.create(path, **kwargs)), rename=FileSystems.rename)
