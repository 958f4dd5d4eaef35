"""Paths and whole-file I/O for local paths and URLs (gs://, s3://, ...) alike.

The one place the package joins paths and reads, writes, lists or deletes whole files.
Remote paths go through Beam's FileSystems, imported only when a remote path is touched,
so entry points that only see local paths (train, evaluate) start without Beam.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import uuid


class NotARegularFile(OSError):
    """A local path that is a FIFO, device, socket or directory: never read (a FIFO
    would block the reader forever, a device would stream without end)."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a stat mode names, in words ("a FIFO (named pipe)", "a regular file", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "not a file")


def not_regular(path: str, mode: int) -> NotARegularFile:
    """The error for `path`, whose stat mode is not a regular file's."""
    return NotARegularFile(f"not a regular file: {path} is {kind_of(mode)}; not read")


def open_regular(path: str) -> io.BufferedReader:
    """A binary stream of the local regular file at `path`. The check is made on the
    opened descriptor (no race with a rename): it is opened non-blocking, so that opening
    a FIFO does not wait for a writer, then fstat'ed; anything but a regular file raises
    NotARegularFile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:  # a socket cannot be opened at all (ENXIO): say what it is
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise e from None
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode) from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        # O_NONBLOCK means nothing to a regular file's reads; cleared all the same.
        os.set_blocking(fd, True)
        return io.BufferedReader(io.FileIO(fd, "rb", closefd=True))
    except BaseException:
        os.close(fd)
        raise


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

    from batch_caption.storage import gcs

    gcs.configure_for_emulator()
    return FileSystems


def open_read(path: str):
    """A binary stream of the file at `path`, read as stored (no decompression). A local
    path must be a regular file (open_regular)."""
    if not is_remote(path):
        return open_regular(path)
    return _filesystems().open(path, compression_type="uncompressed")


def read_head(path: str, n: int) -> bytes:
    """The first `n` bytes of the file at `path` (all of it when shorter). A gs:// object
    is read in one ranged request (Beam's reader would fetch a 16 MiB chunk); a local
    path must be a regular file (open_regular)."""
    if not path.startswith("gs://"):
        with open_read(path) as f:
            return f.read(n)
    from google.api_core.exceptions import RequestRangeNotSatisfiable

    from batch_caption.storage import gcs

    bucket, _, name = path[len("gs://"):].partition("/")
    try:
        return gcs.shared_client().bucket(bucket).blob(name).download_as_bytes(start=0, end=n - 1)
    except RequestRangeNotSatisfiable:  # an empty object
        return b""


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
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
