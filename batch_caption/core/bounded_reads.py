"""Reading files whole, up to a size limit, in reads sized to the file.

A file is read to at most `max_bytes + 1` bytes, so that more than `max_bytes` means too
large without reading all of a huge file. Reads ask for what the file holds, not for the
limit: a buffered read(n) allocates n bytes before reading, and the default limit is
hundreds of MB.

Only regular files are read: a local path is opened through files.open_regular, which
refuses FIFOs, devices, sockets and directories on the opened descriptor.
"""

from __future__ import annotations

import hashlib
import io

from batch_caption.storage import files

READ_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024  # --max_file_bytes of the job and of prepare


def too_large(max_bytes: int) -> tuple[str, str]:
    """(error name, message) for a file over `max_bytes`: what the job's error records and
    the report's cards say."""
    return "FileTooLargeError", f"file is larger than the limit of {max_bytes:,} bytes"


def read_file(path: str, max_bytes: int, size_hint: int | None = None) -> bytes:
    """The file's first max_bytes + 1 bytes (all of it if shorter). size_hint: the size
    matching reported, if any (the file may have changed since)."""
    with files.open_read(path) as f:
        return read_stream(f, max_bytes + 1, size_hint)


def hash_file(path: str, max_bytes: int) -> tuple[int, str]:
    """(size, sha256) of the file's first max_bytes + 1 bytes, streamed: no bytes kept."""
    with files.open_read(path) as f:
        digest, size = hashlib.sha256(), 0
        for chunk in chunks(f, max_bytes + 1, READ_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()


def read_stream(f, limit: int, size_hint: int | None) -> bytes:
    """The first `limit` bytes of `f` (all of it if shorter). The first read asks for the
    size hint + 1 (the + 1 notices a file that grew), later ones for READ_CHUNK_BYTES."""
    first = max(size_hint, 0) + 1 if size_hint is not None else READ_CHUNK_BYTES
    parts = list(chunks(f, limit, first))
    return parts[0] if len(parts) == 1 else b"".join(parts)


def chunks(f, limit: int, first: int):
    """`f`'s first `limit` bytes (all of it if shorter) in reads of `first` bytes, then of
    READ_CHUNK_BYTES."""
    # A buffered stream (local files, GCS's reader) returns fewer bytes than asked only at
    # the end, so a short read ends it: asking again would cost an object store a request.
    buffered = isinstance(f, io.BufferedIOBase)
    size, want = 0, first
    while size < limit:
        asked = min(want, limit - size)
        chunk = f.read(asked)
        if not chunk:
            return
        yield chunk
        size += len(chunk)
        if buffered and len(chunk) < asked:
            return
        want = READ_CHUNK_BYTES


def root_cause(e: BaseException) -> BaseException:
    """BeamIOError hides the real error (FileNotFoundError, IsADirectoryError) in a dict."""
    inner = getattr(e, "exception_details", None)
    if isinstance(inner, dict) and len(inner) == 1:
        return next(iter(inner.values()))
    return e
