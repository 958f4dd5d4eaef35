"""Which listed files are inputs: image files, not the notes, sidecars and system files
beside them.

A file is an input when its extension (case-insensitive) is on the list, or when it has
no extension and its first bytes are those of an image in a format on the list. A file
with another extension is skipped unopened. A file without an extension that cannot be read is an
input: reading it then gives its error record, so nothing unknown is left out.
"""

from __future__ import annotations

import dataclasses
import os
import re

from batch_caption.images import formats
from batch_caption.storage import files

HEAD_BYTES = 32  # what formats.sniff looks at
_EXTENSION = re.compile(r"^[a-z0-9][a-z0-9_+-]{0,15}$")


def parse_extensions(text: str) -> tuple[str, ...]:
    """"jpg,PNG,.webp" -> ("jpg", "png", "webp"); ValueError, saying what is wrong, for
    an empty list or an item that is not an extension."""
    items = [item.strip().lower().removeprefix(".") for item in text.split(",")] if text.strip() else []
    items = tuple(dict.fromkeys(items))  # in order, once each
    check_extensions(items)
    return items


def check_extensions(extensions: tuple[str, ...]) -> None:
    """ValueError naming the first item that is not a lower-case extension without its dot."""
    if not extensions:
        raise ValueError("no extension given: list them separated by commas, such as jpg,png")
    for item in extensions:
        if not item:
            raise ValueError("an empty item: extensions separated by commas, such as jpg,png")
        if not _EXTENSION.match(item):
            raise ValueError(f"{item!r} is not a file name extension: letters and digits, separated by commas, "
                             "such as jpg,png")


def extension_of(path: str) -> str:
    """The extension of the file name in `path`, lower case, without the dot; "" for none
    (a leading dot starts a name, not an extension: ".DS_Store")."""
    return os.path.splitext(files.basename(path))[1][1:].lower()


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """The listing's filter. extensions: lower case, without the dot; None: every file is
    an input (--all_files)."""

    extensions: tuple[str, ...] | None = formats.DEFAULT_EXTENSIONS

    def __post_init__(self):
        if self.extensions is not None:
            check_extensions(self.extensions)

    @property
    def _formats(self) -> frozenset[str]:
        """The format names whose files are inputs (sniffed in files without an extension)."""
        wanted = set(self.extensions or ())
        return frozenset(f for f, names in formats.EXTENSIONS.items() if wanted & set(names))

    def by_name(self, path: str) -> bool | None:
        """Whether `path` is an input by its name alone: None when it has no extension
        (only its bytes tell)."""
        if self.extensions is None:
            return True
        extension = extension_of(path)
        return (extension in self.extensions) if extension else None

    def wants(self, path: str) -> bool:
        """Whether `path` is an input; a file without an extension is opened for its first
        bytes (never a FIFO or device: files.read_head reads regular files only)."""
        known = self.by_name(path)
        if known is not None:
            return known
        try:
            head = files.read_head(path, HEAD_BYTES)
        except Exception:  # noqa: BLE001 - unreadable now: an input, whose read says why
            return True
        return formats.sniff(head) in self._formats
