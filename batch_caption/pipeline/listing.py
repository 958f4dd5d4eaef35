"""Listing a directory tree or a bucket prefix in pieces, so that several workers share it.

A `DIR/**` or `gs://BUCKET/PREFIX/**` input is listed one level first (plan): the files
at the top come out at once, and every subdirectory or sub-prefix becomes a piece, listed
whole by whichever worker gets it. No call holds the metadata of a whole archive.

Local trees: a subdirectory that cannot be listed becomes a `match` error record; a
symlink to a directory is followed when it leads outside the tree (loop-safe: each real
directory once per piece) and skipped, and counted, when it leads inside it (its files
are listed under their own paths) or to one of its ancestors (the whole tree again);
the job's own output directory is never entered; a symlink to nothing is passed on, so that reading it
gives its error record; sockets, pipes and devices, and symlinks to them, are error
records naming what they are, never read.
Object stores: "folder" placeholders (names ending in "/") are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import NamedTuple

from batch_caption.core.elements import SourceFile
from batch_caption.storage import files, gcs

_GCS_TREE = re.compile(r"^gs://(?P<bucket>[^/*?\[]+)/(?P<prefix>[^*?\[]*)\*\*$")


class Piece(NamedTuple):
    """Part of a tree to list whole: a local directory or a bucket prefix."""

    root: str  # the tree's top: a local directory's real path, or "gs://bucket"
    path: str  # the directory, or the prefix (ends with "/")


class Unlistable(NamedTuple):
    path: str
    error: BaseException


class NotAFile(NamedTuple):
    path: str
    kind: str  # what it is, in words: files.kind_of


class SkippedLink(NamedTuple):
    path: str


Found = SourceFile | Piece | Unlistable | NotAFile | SkippedLink


def tree_of(pattern: str) -> str | None:
    """"local" or "gcs" when `pattern` is a whole tree listed in pieces, else None."""
    if pattern.endswith(os.sep + "**") and not files.is_remote(pattern):
        top = pattern[:-3]
        if not set(top) & set("*?[") and os.path.isdir(top):
            return "local"
    if _GCS_TREE.match(pattern):
        return "gcs"
    return None


def plan(pattern: str, output: str | None = None) -> Iterator[Found]:
    """The top level of a tree: its files, and a Piece per subdirectory or sub-prefix.
    A top that cannot be listed raises (the run fails: nothing of it would be seen).
    Nothing under `output` (the job's own output) is listed."""
    if tree_of(pattern) == "local":
        top = pattern[:-3]
        found = _scan_local(top, os.path.realpath(top), piece=False, outside=Outside(output))
    else:
        m = _GCS_TREE.match(pattern)
        found = _scan_gcs(m["bucket"], m["prefix"], piece=False)
    yield from _outside_only(found, output)


def list_piece(piece: Piece, output: str | None = None) -> Iterator[Found]:
    """Everything under a Piece, streamed; nothing under `output`."""
    if piece.root.startswith("gs://"):
        found = _scan_gcs(piece.root[len("gs://"):], piece.path, piece=True)
    else:
        found = _scan_local(piece.path, piece.root, piece=True, outside=Outside(output))
    yield from _outside_only(found, output)


def _outside_only(found: Iterator[Found], output: str | None) -> Iterator[Found]:
    """`found` without the files and pieces in the output tree."""
    outside = Outside(output)
    for item in found:
        if isinstance(item, SourceFile) and not outside(item.path):
            continue
        if isinstance(item, Piece) and not outside.directory(
                f"{item.root}/{item.path}" if item.root.startswith("gs://") else item.path):
            continue
        yield item


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _overlaps(real: str, root: str) -> bool:
    """Whether a directory leads into the tree or to one of its ancestors (which holds the
    whole tree again): both are listed already."""
    return _inside(real, root) or _inside(root, real)


class Outside:
    """path -> whether it lies outside the output tree, which is never an input: the job
    would otherwise caption its own lock, manifests, catalogs and shards. Local paths are
    compared by the real path of their directory (cached), remote ones by prefix."""

    def __init__(self, output: str | None):
        self._remote = None if not output or not files.is_remote(output) else output.rstrip("/") + "/"
        self._real = None if not output or self._remote else os.path.realpath(output)
        self._dirs: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        if self._remote is not None:
            return not path.startswith(self._remote)
        if self._real is None or files.is_remote(path):
            return True
        directory = os.path.dirname(path)
        if directory not in self._dirs:
            if len(self._dirs) >= 4096:
                self._dirs.clear()
            self._dirs[directory] = not _inside(os.path.realpath(directory), self._real)
        return self._dirs[directory]

    def directory(self, path: str) -> bool:
        """Whether the directory (or prefix) `path` lies outside the output tree."""
        return self(path.rstrip("/" + os.sep) + ("/x" if files.is_remote(path) else os.sep + "x"))


def _scan_local(top: str, root: str, piece: bool, outside: Outside) -> Iterator[Found]:
    """One level (plan) or the whole subtree (piece) under `top`, depth first; a
    directory that is (or leads into) the output is not entered."""
    stack, followed = [top], {os.path.realpath(top)}
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if directory == top and not piece:
                raise
            yield Unlistable(directory, e)
            continue
        for entry in entries:
            yield from _local_entry(entry, root, followed, stack if piece else None, outside)


def _local_entry(entry: os.DirEntry, root: str, followed: set, stack: list | None,
                 outside: Outside) -> Iterator[Found]:
    try:
        if entry.is_dir(follow_symlinks=True):
            if not outside.directory(entry.path):
                return  # the job's own output
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if _overlaps(real, root) or real in followed:
                    yield SkippedLink(entry.path)
                    return
                followed.add(real)
            if stack is None:
                yield Piece(root, entry.path)
            else:
                stack.append(entry.path)
        elif entry.is_file(follow_symlinks=True):
            st = entry.stat(follow_symlinks=True)
            yield SourceFile(entry.path, st.st_size, st.st_mtime)
        elif entry.is_symlink():
            try:
                mode = os.stat(entry.path).st_mode
            except OSError:  # leads nowhere (or loops): reading it says so in a record
                yield SourceFile(entry.path)
            else:  # leads to a FIFO, device or socket
                yield NotAFile(entry.path, files.kind_of(mode))
        else:
            yield NotAFile(entry.path, files.kind_of(entry.stat(follow_symlinks=False).st_mode))
    except OSError as e:  # vanished or unreadable while listed
        yield Unlistable(entry.path, e)


def _scan_gcs(bucket: str, prefix: str, piece: bool) -> Iterator[Found]:
    blobs = gcs.client().list_blobs(bucket, prefix=prefix, delimiter=None if piece else "/")
    for blob in blobs:
        if not blob.name.endswith("/"):
            yield SourceFile(f"gs://{bucket}/{blob.name}", blob.size, blob.updated.timestamp() if blob.updated else None)
    if not piece:
        for sub in sorted(blobs.prefixes):
            yield Piece(f"gs://{bucket}", sub)

