"""Listing a directory tree or a bucket prefix in pieces, so that several workers share it.

A `DIR/**` or `gs://BUCKET/PREFIX/**` input is listed one level first (plan): the files
at the top come out at once, and every subdirectory or sub-prefix becomes a piece, listed
whole by whichever worker gets it. No call holds the metadata of a whole archive.

Local trees: a subdirectory that cannot be listed becomes a `match` error record; a
symlink to a directory is followed when it leads outside the tree (loop-safe: each real
directory once per piece) and skipped, and counted, when it leads inside it (its files
are listed under their own paths); a symlink to nothing is passed on, so that reading it
gives its error record; sockets, pipes and devices, and symlinks to them, are error
records naming what they are, never read.
Object stores: "folder" placeholders (names ending in "/") are ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import NamedTuple

from batch_caption import files, gcs
from batch_caption.job.elements import SourceFile

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


def plan(pattern: str) -> Iterator[Found]:
    """The top level of a tree: its files, and a Piece per subdirectory or sub-prefix.
    A top that cannot be listed raises (the run fails: nothing of it would be seen)."""
    if tree_of(pattern) == "local":
        top = pattern[:-3]
        yield from _scan_local(top, os.path.realpath(top), piece=False)
    else:
        m = _GCS_TREE.match(pattern)
        yield from _scan_gcs(m["bucket"], m["prefix"], piece=False)


def list_piece(piece: Piece) -> Iterator[Found]:
    """Everything under a Piece, streamed."""
    if piece.root.startswith("gs://"):
        yield from _scan_gcs(piece.root[len("gs://"):], piece.path, piece=True)
    else:
        yield from _scan_local(piece.path, piece.root, piece=True)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _scan_local(top: str, root: str, piece: bool) -> Iterator[Found]:
    """One level (plan) or the whole subtree (piece) under `top`, depth first."""
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
            yield from _local_entry(entry, root, followed, stack if piece else None)


def _local_entry(entry: os.DirEntry, root: str, followed: set, stack: list | None) -> Iterator[Found]:
    try:
        if entry.is_dir(follow_symlinks=True):
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if _inside(real, root) or real in followed:
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

