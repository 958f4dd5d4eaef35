"""What image bytes are, and how any Pillow pixel mode becomes 8-bit RGB.

Format names (the default set, the plugins this Pillow build has, their file name
extensions, magic-byte sniffing), EXIF orientation, and mode conversion: alpha
composited over a background, 16-bit and float greys scaled rather than clipped.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
from PIL import ExifTags, Image

from batch_caption.images.errors import DATA_ERRORS, ImageDecodeError, TruncatedImageError, UnsupportedImageError

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_FORMATS",
    "DRAFT_FORMATS",
    "EXTENSIONS",
    "TRANSPOSE",
    "enabled_formats",
    "ico_frame_sizes",
    "is_int",
    "orientation",
    "sniff",
    "to_rgb",
    "unidentified",
]

#: Formats tried by default, by Pillow format name.  "MPO" is how Pillow
#: names the multi-picture JPEGs many phones write (decoded like JPEG).
#: Names that this Pillow build cannot open (e.g. AVIF) are skipped.
DEFAULT_FORMATS: Tuple[str, ...] = (
    "JPEG",
    "MPO",
    "PNG",
    "GIF",
    "WEBP",
    "BMP",
    "TIFF",
    "AVIF",
    "PPM",
    "ICO",
)

#: File name extensions (lower case, without the dot) by format name: every format the
#: decoder tries by default, and the image formats `sniff` knows besides (HEIF,
#: JPEG 2000), whose files get an error record that says why they cannot be decoded
#: rather than being left out as not images.
EXTENSIONS: dict[str, Tuple[str, ...]] = {
    "JPEG": ("jpg", "jpeg", "jpe", "jfif"),
    "MPO": ("mpo",),
    "PNG": ("png", "apng"),
    "GIF": ("gif",),
    "WEBP": ("webp",),
    "BMP": ("bmp", "dib"),
    "TIFF": ("tif", "tiff"),
    "AVIF": ("avif", "avifs"),
    "PPM": ("ppm", "pgm", "pbm", "pnm", "pfm"),
    "ICO": ("ico",),
    "HEIF": ("heic", "heif"),
    "JPEG2000": ("jp2", "j2k", "jpc", "jpf", "jpx", "j2c"),
}
#: The extensions of every format above: the job's inputs by default.
DEFAULT_EXTENSIONS: Tuple[str, ...] = tuple(sorted(e for names in EXTENSIONS.values() for e in names))

_ORIENTATION_TAG = ExifTags.Base.Orientation  # 0x0112
#: EXIF orientation -> the transpose that shows the image upright.
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Formats Pillow can decode at reduced scale (JPEG draft mode).
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}


def is_int(value: object) -> bool:
    """An integer, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def enabled_formats(formats: Optional[Tuple[str, ...]]) -> Optional[Tuple[str, ...]]:
    """Config formats this Pillow build can open (Image.open raises KeyError
    for a name it has no plugin for)."""
    if formats is None:
        return None
    Image.init()  # idempotent; registers all plugins (Image.open may do it too)
    return tuple(f for f in formats if f in Image.OPEN)


# Signatures of formats worth naming when Pillow cannot identify the data.
_FTYP_BRANDS = {
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"heic": "HEIF",
    b"heix": "HEIF",
    b"hevc": "HEIF",
    b"hevx": "HEIF",
    b"heim": "HEIF",
    b"heis": "HEIF",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
}


def sniff(data: bytes) -> Optional[str]:
    """Best-effort format name from magic bytes (the first 32 are enough): for error
    messages, and to tell an image file without an extension from other files."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"f", b"F") and head[2:3].isspace():
        return "PPM"
    if head[:4] == _ICO_MAGIC and head[4:6] != b"\x00\x00":  # at least one image
        return "ICO"
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12])
    return None


def unidentified(
    data: bytes, configured: Optional[Tuple[str, ...]], enabled: Optional[Tuple[str, ...]]
) -> ImageDecodeError:
    """The error for data Pillow could not identify: not an image, a format this
    build cannot decode, a format not enabled, or a recognisable but corrupt header.

    configured: ImageConfig.formats; enabled: those this Pillow build can open.
    """
    kind = sniff(data)
    if kind is None:
        return UnsupportedImageError(
            f"data is not a recognised image format ({len(data):,} bytes, "
            f"starting {bytes(data[:16])!r})"
        )
    Image.init()
    if kind not in Image.OPEN:
        hint = " (e.g. install and register pillow-heif)" if kind == "HEIF" else ""
        return UnsupportedImageError(
            f"{kind} images cannot be decoded: this Pillow build has no {kind} "
            f"support{hint}"
        )
    if enabled is not None and kind not in enabled and not (kind == "JPEG" and "MPO" in enabled):
        return UnsupportedImageError(
            f"{kind} images are not enabled (ImageConfig.formats = {configured})"
        )
    return TruncatedImageError(
        f"data starts like a {kind} file but its header could not be parsed "
        f"(truncated or corrupt, {len(data):,} bytes)"
    )


def orientation(im: Image.Image) -> int:
    """EXIF/XMP orientation 1..8; anything missing, corrupt or out of range is 1."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except DATA_ERRORS:
        return 1
    if is_int(value) and 1 <= value <= 8:
        return int(value)
    return 1


def to_rgb(im: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB, alpha composited over ``background``."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        im = _high_bit_to_8bit(im)
    elif mode in _PREMULTIPLIED:
        im = im.convert(_PREMULTIPLIED[mode])
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, (0, 0), rgba)  # out = fg * a + bg * (1 - a)
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


#: Pixels converted at a time from 16-bit, int and float modes: the float64 arithmetic
#: then needs a few MB, whatever the image's size.
_CHUNK_PIXELS = 1 << 18


def _high_bit_to_8bit(im: Image.Image) -> Image.Image:
    """I;16* / I / F -> L (or LA when a transparent value is set), converted a block of
    rows at a time: beside the image, this holds its array (4 bytes a pixel at most), the
    8-bit result and the alpha (1 byte each), never a float64 copy of the whole image."""
    raw = np.asarray(im)
    rows = max(1, _CHUNK_PIXELS // max(1, raw.shape[1]))
    blocks = [raw[i:i + rows] for i in range(0, raw.shape[0], rows)]
    grey = np.empty(raw.shape, np.uint8)
    if im.mode == "F":
        peak = max((float(np.max(b, where=np.isfinite(b), initial=0.0)) for b in blocks), default=0.0)
        scale = 255.0 if peak <= 1.0 else 1.0
        for i, block in zip(range(0, raw.shape[0], rows), blocks):
            values = np.nan_to_num(block.astype(np.float64) * scale, nan=0.0, posinf=255.0, neginf=0.0)
            grey[i:i + rows] = np.rint(np.clip(values, 0.0, 255.0))
    else:
        for i, block in zip(range(0, raw.shape[0], rows), blocks):
            grey[i:i + rows] = (np.clip(block, 0, 65535).astype(np.uint32) + 128) // 257
    grey_im = Image.fromarray(grey)  # mode L
    transparent = im.info.get("transparency")
    if is_int(transparent):
        alpha = np.empty(raw.shape, np.uint8)
        for i, block in zip(range(0, raw.shape[0], rows), blocks):
            alpha[i:i + rows] = np.where(block == transparent, 0, 255)
        return Image.merge("LA", (grey_im, Image.fromarray(alpha)))
    return grey_im


_ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ico_frame_sizes(data: bytes) -> list[Tuple[int, int]]:
    """(width, height) of every image an ICO file holds, as its embedded PNG or bitmap
    header says (not as its directory says: Pillow allocates what the image says, and
    decodes while opening). [] for other data; an entry cut short is skipped (Pillow
    then reports the file)."""
    if not data.startswith(_ICO_MAGIC) or len(data) < 6:
        return []
    sizes = []
    for i in range(int.from_bytes(data[4:6], "little")):
        entry = data[6 + 16 * i:22 + 16 * i]
        if len(entry) < 16:
            break
        offset = int.from_bytes(entry[12:16], "little")
        head = data[offset:offset + 24]
        if head.startswith(_PNG_MAGIC) and len(head) >= 24:
            sizes.append((int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")))
        elif len(head) >= 12:  # a bitmap: its header's height counts the AND mask too
            width = abs(int.from_bytes(head[4:8], "little", signed=True))
            height = abs(int.from_bytes(head[8:12], "little", signed=True))
            sizes.append((width, height // 2 or height))
    return sizes
