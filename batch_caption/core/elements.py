"""What the pipelines' stages hand each other (the captioning job's, and dataset
preparation's read), and the names their outputs and metrics share.

    SourceFile    MatchImages -> SelectChanged -> ReadImages: one input path
    FileData      inside ReadImages: one content, every path holding it
    ImageExample  ReadImages -> CaptionImages: one decoded image, every path holding it

Every stage also has an ERRORS output of error records (records.error_record).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
from apache_beam.metrics import Metrics

NAMESPACE = "batch_caption"  # of the job's metrics
ERRORS = "errors"  # the tag of every stage's error records


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


class SourceFile(NamedTuple):
    """One input file. size and modified (seconds since the epoch) come from matching and
    are None for paths read from list files. In incremental runs, previous_sha256 is the
    content the earlier catalog holds for the path (equal content is skipped after
    reading), and previous what carries its earlier catalog row forward when the file is
    skipped: a CatalogRef, or the row itself for outputs written without catalogs."""

    path: str
    size: int | None = None
    modified: float | None = None
    previous_sha256: str | None = None
    previous: Any = None


class CatalogRef(NamedTuple):
    """A row of the earlier catalog: the index of its file in the run's list, its row number."""

    file: int
    row: int


def path_key(path: str) -> bytes:
    """A path as a shuffle key: its bytes, so that names that are not UTF-8 (held with
    surrogate escapes) group like any other; a str key would have to encode as UTF-8."""
    return path.encode("utf-8", "surrogateescape")


def as_source(item: SourceFile | str) -> SourceFile:
    """ReadImages also takes bare paths (dataset preparation passes those)."""
    return SourceFile(item) if isinstance(item, str) else item


@dataclasses.dataclass(frozen=True, eq=False)
class FileData:
    """A file on its way to decoding: `sources` are every path holding its bytes. `data` is
    None until the bytes are read (the dedupe shuffle carries paths and hashes only);
    `sha256` is None until the file is hashed or read."""

    sources: tuple[SourceFile, ...]
    data: bytes | None = None
    sha256: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class ImageExample:
    """One decoded input image on its way to the model.

    pixels: uint8 [S, S, 3], squashed to the model's input size.
    width, height: original size as displayed (after EXIF orientation).
    sources: every input file holding these exact bytes (SourceFile: path, size,
      modified); empty means just `path`. Each gets its own record.
    """

    path: str
    pixels: np.ndarray
    width: int
    height: int
    format: str
    sha256: str
    size_bytes: int
    sources: tuple = ()

    def source_files(self) -> tuple[SourceFile, ...]:
        """Every file with these bytes (just `path` when sources is empty)."""
        return self.sources or (SourceFile(self.path),)
