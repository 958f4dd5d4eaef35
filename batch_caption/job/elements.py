"""What the job's stages hand each other, and the names their outputs and metrics share.

    SourceFile    MatchImages -> SelectChanged -> ReadImages: one input path
    FileData      inside ReadImages: one content, every path holding it
    ImageExample  ReadImages -> CaptionImages: one decoded image, every path holding it

Every stage also has an ERRORS output of error records (records.error_record).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from apache_beam.metrics import Metrics

NAMESPACE = "batch_caption"  # of the job's metrics
ERRORS = "errors"  # the tag of every stage's error records


def counter(name: str):
    return Metrics.counter(NAMESPACE, name)


class SourceFile(NamedTuple):
    """One input file. size and modified (seconds since the epoch) come from matching and
    are None for paths read from list files; previous_sha256 is set in incremental runs
    to the content captioned before (unchanged content is then skipped after reading)."""

    path: str
    size: int | None = None
    modified: float | None = None
    previous_sha256: str | None = None


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

    def source_paths(self) -> list[tuple[str, float | None]]:
        """(path, modification time or None) of every file with these bytes."""
        return [(s.path, s.modified) for s in self.sources] or [(self.path, None)]
