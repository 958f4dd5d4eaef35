"""Paths and whole-file I/O for local paths and URLs (gs://, s3://, ...) alike.

The one place the package joins paths and reads, writes, lists or deletes whole files.
Remote paths go through Beam's FileSystems, imported only when a remote path is touched,
so entry points that only see local paths (train, evaluate) start without Beam.
"""

from __future__ import annotations

import contextlib
import os
import uuid


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (scheme://...) rather than a local path."""
    return "://" in path


def join(base: str, *names: str) -> str:
    """base/name/...: os.path.join for local paths, "/" for URLs."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def basename(path: str) -> str:
    """The last part of a local path or URL ("" for a bare scheme root)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def _filesystems():
    from apache_beam.io.filesystems import FileSystems

    from batch_caption import gcs

    gcs.configure_for_emulator()
    return FileSystems


def open_read(path: str):
    """A binary stream of the file at `path`, read as stored (no decompression)."""
    if not is_remote(path):
        return open(path, "rb")
    return _filesystems().open(path, compression_type="uncompressed")


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    with _filesystems().open(path, compression_type="uncompressed") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """Writes `data` to `path` whole or not at all: a local file is written under a
    temporary name and renamed over `path` (a reader never sees it half written, and a
    crash leaves the old file); an object store's upload appears at once when it ends."""
    if not is_remote(path):
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        temp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
        return
    with _filesystems().create(path, mime_type=mime_type, compression_type="uncompressed") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"), mime_type="text/plain")


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    return _filesystems().exists(path)


def matched(pattern: str) -> list[str]:
    """Every file `pattern` matches, in FileSystems' glob syntax for every scheme."""
    return [m.path for r in _filesystems().match([pattern]) for m in r.metadata_list]


def delete(paths: list[str]) -> None:
    """Deletes files (and local directories, recursively); an empty list does nothing."""
    if paths:
        _filesystems().delete(list(paths))


def delete_matching(pattern: str) -> None:
    """Deletes every file `pattern` matches; none: nothing."""
    delete(matched(pattern))
