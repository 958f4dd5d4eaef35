"""Reading files whole up to a limit, in reads sized to the file."""

from __future__ import annotations

import hashlib
import io

import pytest
from helpers import special_files, within

from batch_caption.core import bounded_reads
from batch_caption.storage import files

_FILE = (bytes(range(256)) * 12)[:3000]


def _open_recording_reads(monkeypatch) -> list[int]:
    """Every files.open_read gives a buffered stream of _FILE; -> the sizes its reads ask for."""
    asked = []

    class Recording(io.BytesIO):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    monkeypatch.setattr(files, "open_read", lambda path: Recording(_FILE))
    return asked


@pytest.mark.parametrize("size_hint, limit, expected, reads", [
    (3000, 8 << 20, 3000, 1),  # the matched size
    (1000, 8 << 20, 3000, 2),  # the file grew since it was matched
    (0, 8 << 20, 3000, 2),
    (5000, 8 << 20, 3000, 1),  # it shrank
    (None, 8 << 20, 3000, 1),  # a path from a list file: no size
    (3000, 2001, 2001, 1),  # larger than the limit: limit bytes, no more
    (3000, 3000, 3000, 1),  # one byte over max_bytes (limit - 1): too large, as it should
    (3000, 3001, 3000, 1),  # exactly max_bytes
])
def test_reads_ask_for_what_the_file_holds_not_the_limit(monkeypatch, size_hint, limit, expected, reads):
    asked = _open_recording_reads(monkeypatch)
    got = bounded_reads.read_file("any", limit - 1, size_hint=size_hint)
    size, sha = len(got), hashlib.sha256(got).hexdigest()
    assert got == _FILE[:expected] and size == expected and sha == hashlib.sha256(_FILE[:expected]).hexdigest()
    # A buffered read(n) allocates n bytes first: never ask for the whole limit (256 MiB
    # by default) when the file is a few MB.
    assert max(asked) <= max(bounded_reads.READ_CHUNK_BYTES, (size_hint or 0) + 1)
    # A short read of a buffered stream is its end: no read past it (on GCS each is a request).
    assert len(asked) == reads


@pytest.mark.parametrize("max_bytes, size", [(8 << 20, 3000), (2000, 2001)])
def test_hashing_streams_the_file_and_stops_at_its_end_or_the_limit(monkeypatch, max_bytes, size):
    asked = _open_recording_reads(monkeypatch)
    assert bounded_reads.hash_file("any", max_bytes) == (size, hashlib.sha256(_FILE[:size]).hexdigest())
    assert len(asked) == 1  # the short (or limit-filling) read ends it: no request past the end


def test_a_stream_with_short_reads_is_read_to_its_end():
    data = bytes(range(256)) * 40

    class Trickle(io.RawIOBase):  # not buffered: a short read says nothing about the end
        def __init__(self):
            self.pos = 0

        def readable(self):
            return True

        def readinto(self, b):
            n = min(7, len(b), len(data) - self.pos)
            b[:n] = data[self.pos:self.pos + n]
            self.pos += n
            return n

    assert bounded_reads.read_stream(Trickle(), 1 << 20, len(data)) == data
    assert bounded_reads.read_stream(Trickle(), 100, None) == data[:100]


@pytest.mark.parametrize("name, kind", [
    ("fifo.png", "FIFO"), ("fifo_link.png", "FIFO"), ("zero_link.png", "character device"),
    ("socket.png", "socket"), ("dir.png", "directory"), ("dir_link.png", "directory"),
])
@pytest.mark.parametrize("read", ["read", "hash"])
def test_only_regular_files_are_read_and_nothing_blocks(tmp_path, name, kind, read):
    path = special_files(tmp_path)[name]
    fn = (lambda: bounded_reads.read_file(path, 1 << 20)) if read == "read" else (lambda: bounded_reads.hash_file(path, 1 << 20))
    with pytest.raises(files.NotARegularFile, match=kind):
        within(10, fn)
