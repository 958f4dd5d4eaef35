"""The errors `decoding.decode_image` raises for bad data, and what counts as bad data.

Each error's class name is the error record's machine-readable reason and ``str(exc)``
its message, a complete sentence. Only a message is stored, so instances pickle.
"""

from __future__ import annotations

import struct
import zlib

from PIL import Image

__all__ = [
    "BOMB_ERRORS",
    "DATA_ERRORS",
    "EmptyImageError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "load_error",
    "reason",
]

# What Pillow raises for malformed data.  Deliberately no TypeError,
# AttributeError, NameError...: those are bugs and must surface.
DATA_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,  # Pillow's "not a valid <format> file"
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
)
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageDecodeError(Exception):
    """The bytes could not be turned into an image.

    ``str(exc)`` is a complete, human-readable sentence; the class name is the
    machine-readable reason.  Only a message is stored, so instances pickle.
    """

    def __init__(self, message: str) -> None:
        if not isinstance(message, str) or not message:
            raise ValueError("ImageDecodeError needs a non-empty message")
        super().__init__(message)

    @property
    def message(self) -> str:
        return self.args[0]


class EmptyImageError(ImageDecodeError):
    """The file has zero bytes."""


class UnsupportedImageError(ImageDecodeError):
    """Not an image, or a format / pixel mode this decoder does not handle."""


class TruncatedImageError(ImageDecodeError):
    """Recognised image whose header or pixel data is truncated or corrupt."""


class ImageTooLargeError(ImageDecodeError):
    """Pixel count over the limit (decompression-bomb guard)."""


class ImageTooSmallError(ImageDecodeError):
    """Width or height below ``ImageConfig.min_image_side`` (by default: a zero side)."""


def reason(e: BaseException) -> str:
    """The exception's text, or its class name when it has none."""
    text = str(e).strip()
    return text if text else type(e).__name__


def load_error(e: BaseException, what: str) -> ImageDecodeError:
    """A Pillow error raised while loading the pixels of `what` -> the error to report."""
    text = reason(e)
    lower = text.lower()
    if isinstance(e, OSError) and "not available" in lower:
        # e.g. "decoder jpeg2k not available": a build without the codec.
        return UnsupportedImageError(f"no decoder for this image ({what}): {text}")
    if isinstance(e, EOFError) or "truncated" in lower:
        return TruncatedImageError(f"image data is truncated ({what}): {text}")
    return TruncatedImageError(f"image data is corrupt ({what}): {text}")
