"""The report's thumbnails: a run's images read and decoded the way the run decoded them.

The report reads each image again, after the run, when the file at its path may be
another file (replaced by another format, grown, removed). It goes through the job's own
reading (core/bounded_reads.py: uncompressed, capped at --max_file_bytes) and decoding
(images/decoding.py: the formats allow-list, the header pixel guard, no truncated files)
with the run's settings from its manifest's options, and the job's defaults for what the
manifest does not record. No format outside the allow-list is tried, so no Pillow plugin
that starts another program (EPS runs Ghostscript) is reached; a file that fails becomes
a one-line reason for its card.

decode_image squashes the whole picture into a square; the thumbnail takes its aspect
back from the displayed width and height, never larger than the image itself.
"""

from __future__ import annotations

import base64
import dataclasses
import io

from batch_caption.core import bounded_reads
from batch_caption.images.decoding import DEFAULT_MAX_IMAGE_PIXELS, RESAMPLE, ImageConfig, decode_image
from batch_caption.images.formats import is_int

# The job's options (JobConfig fields) that decide how it read and decoded an image, and
# their defaults (the job's own, kept where the job takes them from).
READ_DEFAULTS = {"max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS,
                 "max_file_bytes": bounded_reads.DEFAULT_MAX_FILE_BYTES, "draft": ImageConfig.draft}


class FileTooLargeError(Exception):
    """The file is over the run's --max_file_bytes (the job's error record says the same)."""


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How to read and decode a thumbnail: `image.image_size` is the longest side."""

    image: ImageConfig
    max_file_bytes: int


def run_decoding(manifest: dict | None, size: int) -> tuple[Decoding, str | None]:
    """(the run's decoding at thumbnail `size`, None), or (the job's defaults, why the
    manifest's options were not usable)."""
    options = (manifest or {}).get("options")
    recorded = {k: v for k, v in options.items() if k in READ_DEFAULTS} if isinstance(options, dict) else {}
    try:
        return _decoding({**READ_DEFAULTS, **recorded}, size), None
    except ValueError as e:
        note = f"the run's decoder options are not usable ({e}); thumbnails use the job's defaults"
        return _decoding(READ_DEFAULTS, size), note


def _decoding(settings: dict, size: int) -> Decoding:
    max_bytes = settings["max_file_bytes"]
    if not is_int(max_bytes) or max_bytes < 1:
        raise ValueError(f"max_file_bytes must be a positive int, got {max_bytes!r}")
    image = ImageConfig(image_size=size, max_image_pixels=settings["max_image_pixels"],
                               draft=settings["draft"])
    return Decoding(image, int(max_bytes))


def thumbnail(path: str, decoding: Decoding) -> tuple[str, int, int]:
    """(data: URI of a JPEG within size x size, width, height) of the image at `path`.
    Raises what reading or decoding raises."""
    from PIL import Image

    data = bounded_reads.read_file(path, decoding.max_file_bytes)
    if len(data) > decoding.max_file_bytes:
        raise FileTooLargeError(bounded_reads.too_large(decoding.max_file_bytes)[1])
    decoded = decode_image(data, decoding.image)
    scale = min(1.0, decoding.image.image_size / max(decoded.width, decoded.height))
    width, height = (max(1, round(side * scale)) for side in (decoded.width, decoded.height))
    img = Image.fromarray(decoded.pixels).resize((width, height), RESAMPLE)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"), width, height


def safe_thumbnail(path: str, decoding: Decoding) -> tuple[str, int, int] | str:
    """thumbnail(), or the reason it failed: one line, the error's class and message."""
    try:
        return thumbnail(path, decoding)
    except Exception as e:  # any unreadable image becomes a note on its card
        text = " ".join(str(e).split())
        return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
