"""Image bytes -> fixed-size RGB ``uint8`` array, or a typed, explained error.

The pipeline reads each file's bytes and calls :func:`decode_image` once per
image, *before* batching, so one bad file becomes one error record instead of
taking a whole batch down.  Every failure caused by the data is raised as a
subclass of :class:`ImageDecodeError`; the error record is
``error = type(exc).__name__`` and ``message = str(exc)`` (a full sentence).
Programming errors (``data`` is not bytes, ``config`` is not an
:class:`ImageConfig`, bugs) are *not* converted and propagate as usual.

Training-data preparation calls this same function with the same
:class:`ImageConfig`, so every choice below is part of the model contract:
changing the filter, the draft rule or the background changes the pixels the
model sees and must be treated like a model change.

Choices
-------
Squash, don't crop.
    The output is ``image_size x image_size`` and the whole picture is resized
    to it ignoring the aspect ratio.  The captioner was trained on squashed
    images, and a caption describes the whole picture: a centre crop can cut
    away the very object the caption is about.

Resize filter: ``PIL.Image.Resampling.BICUBIC`` (:data:`RESAMPLE`), no
``reducing_gap``.
    Pillow's resampling filters are true convolutions whose support widens
    with the scale factor, so BICUBIC is properly anti-aliased when shrinking
    (unlike e.g. ``tf.image.resize`` without ``antialias``).  No
    ``reducing_gap``: the result is the exact filter, not an approximation
    whose output depends on the reduction factor.

JPEG draft mode (``ImageConfig.draft``, on by default).
    libjpeg can decode straight to 1/2, 1/4 or 1/8 scale in the DCT domain,
    which skips most of the inverse-DCT and colour-conversion work: a 12 MP
    photo decodes 2-5x faster (entropy decoding is still paid in full) and
    needs a fraction of the memory.  The scale
    is picked by Pillow's :meth:`~PIL.Image.Image.draft` so that *both* axes
    stay ``>= DRAFT_REDUCING_GAP * image_size`` (the largest power-of-two
    factor ``f`` in {1, 2, 4, 8} with ``f <= min(w, h) // target``, where
    ``target = DRAFT_REDUCING_GAP * image_size``).  Because the output is a
    square squash, the constraint is on each axis separately, which also makes
    it independent of EXIF rotation; for a 6000x100 panorama the short axis is
    already below the target, so it is decoded at full size.  The gap of 2 is
    the same one :meth:`PIL.Image.Image.thumbnail` uses: the final BICUBIC
    step still shrinks by >= 2x, which removes most of the aliasing that DCT
    scaling alone leaves (on a 4000x3000 test photo the mean absolute
    difference to a full decode is ~0.3 grey levels, max ~3, versus ~0.6 /
    max ~11 when decoding right down to ``image_size``).

Transparency is composited over ``ImageConfig.background`` (white).
    Most transparent images in the wild (logos, product shots, clip art,
    stickers) are designed to be shown on a white page.  Dropping alpha
    instead would expose whatever colour happens to be stored under fully
    transparent pixels (often black, sometimes garbage).

High bit depth.
    ``I;16*`` (16-bit greyscale PNG/TIFF) is scaled ``v -> round(v / 257)``;
    ``I`` (32-bit int; what Pillow gives for 16-bit PGM, for instance) is
    taken as 16-bit data the same way after clipping to [0, 65535]; ``F``
    (float) is taken as [0, 1] if its finite maximum is <= 1 and as [0, 255]
    otherwise (clipped; NaN -> 0).  Pillow's own ``convert`` *clips* these
    modes to 0..255, which turns an ordinary mid-grey 16-bit PNG pure white.
    16-bit RGB(A)/LA PNGs are already reduced to 8 bits by Pillow on open
    (high byte).  ICC profiles are ignored (pixels are taken as sRGB), as in
    most training pipelines.

EXIF orientation.
    Applied (the same 8 transposes as :func:`PIL.ImageOps.exif_transpose`,
    read from EXIF or XMP via :meth:`~PIL.Image.Image.getexif`), after the
    resize, where the image is small; with the square squash this is the same
    image, up to rounding, as rotating first.  ``DecodedImage.width/height``
    are the *original full-resolution* size as displayed, i.e. the header
    size with width and height swapped for orientations 5-8 -- never the
    draft size.

Size limit (``ImageConfig.max_image_pixels``, default 100,000,000).
    Checked on the header size right after identification, before any pixel
    is decoded (decompression-bomb guard: a 30000x30000 PNG can be a few
    hundred KB).  100 MP admits every real camera up to ~100 MP while bounding
    worst-case memory per decode at roughly 0.4 GB (RGBA), which matters when
    a worker runs several decode threads.  Pillow has its own process-global
    guard (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default); this module
    never reads or changes it.  When Pillow's guard fires first -- hard error
    above 2x its limit (~179 MP), or its ``DecompressionBombWarning`` when the
    process turns warnings into errors -- that is reported as
    :class:`ImageTooLargeError` as well.  Consequences: a ``max_image_pixels``
    above ~179 MP only takes effect if the process also raises Pillow's
    global, and images between 89.5 MP and the limit decode fine but make
    Pillow emit a ``DecompressionBombWarning`` (logged, harmless).

Formats (``ImageConfig.formats``).
    By default only the usual raster formats are tried (:data:`DEFAULT_FORMATS`).
    Pillow can also open e.g. EPS, which runs Ghostscript on untrusted input,
    and several formats whose weak signatures could make junk "decode";
    ``formats=None`` allows everything this Pillow build can open.

First frame only for animated GIF / WebP / APNG (Pillow opens frame 0).
Truncated files are errors: this module never sets Pillow's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` (if some other code sets it, Pillow will
fill the missing part with grey instead of raising).
"""

from __future__ import annotations

import io
import numbers
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DRAFT_REDUCING_GAP",
    "RESAMPLE",
    "DecodedImage",
    "EmptyImageError",
    "ImageConfig",
    "ImageDecodeError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "decode_image",
    "resize_pixels",
]

#: Default header pixel-count limit (see module docstring).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

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

#: Resampling filter for every resize in this module (train/serve contract).
RESAMPLE = Image.Resampling.BICUBIC

#: JPEG draft decoding keeps both axes >= DRAFT_REDUCING_GAP * image_size.
DRAFT_REDUCING_GAP = 2

_ORIENTATION_TAG = ExifTags.Base.Orientation  # 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}

# What Pillow raises for malformed data.  Deliberately no TypeError,
# AttributeError, NameError...: those are bugs and must surface.
_DATA_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,  # Pillow's "not a valid <format> file"
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


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
    """Width or height below ``ImageConfig.min_image_side`` (0 by default only)."""


# --------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class ImageConfig:
    """How to decode.  Shared by training-data prep and inference: keep equal.

    Attributes:
        image_size: output side length; output is ``image_size x image_size``.
        max_image_pixels: refuse images whose header says more pixels than
            this (before decoding).  See the module docstring.
        draft: use JPEG DCT-domain downscaling (faster; slightly different
            pixels from a full decode, so train and serve must agree).
        background: RGB colour transparent pixels are composited over.
        formats: Pillow format names to try, or ``None`` for every format
            Pillow can open.  Unknown names are a ``ValueError``.
        min_image_side: refuse images narrower or shorter than this
            (:class:`ImageTooSmallError`); the default 1 only refuses
            zero-sized images.  E.g. 8 drops 1x1 tracking pixels.
    """

    image_size: int
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    draft: bool = True
    background: Tuple[int, int, int] = (255, 255, 255)
    formats: Optional[Tuple[str, ...]] = DEFAULT_FORMATS
    min_image_side: int = 1

    def __post_init__(self) -> None:
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ValueError(
                f"ImageConfig.image_size must be a positive int, got {self.image_size!r}"
            )
        if not _is_int(self.max_image_pixels) or self.max_image_pixels < 1:
            raise ValueError(
                "ImageConfig.max_image_pixels must be a positive int, "
                f"got {self.max_image_pixels!r}"
            )
        if not isinstance(self.draft, bool):
            raise ValueError(f"ImageConfig.draft must be a bool, got {self.draft!r}")
        if not _is_int(self.min_image_side) or self.min_image_side < 1:
            raise ValueError(
                "ImageConfig.min_image_side must be a positive int, "
                f"got {self.min_image_side!r}"
            )
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "max_image_pixels", int(self.max_image_pixels))
        object.__setattr__(self, "min_image_side", int(self.min_image_side))
        object.__setattr__(self, "background", _check_background(self.background))
        object.__setattr__(self, "formats", _check_formats(self.formats))


def _check_background(value: object) -> Tuple[int, int, int]:
    msg = (
        "ImageConfig.background must be 3 ints in 0..255 (an RGB colour), "
        f"got {value!r}"
    )
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(msg)
    if len(value) != 3 or not all(_is_int(v) and 0 <= v <= 255 for v in value):
        raise ValueError(msg)
    return (int(value[0]), int(value[1]), int(value[2]))


def _check_formats(value: object) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            "ImageConfig.formats must be a sequence of Pillow format names or "
            f"None, got {value!r}"
        )
    if not value:
        raise ValueError("ImageConfig.formats must not be empty (use None for all)")
    names = []
    for name in value:
        if not isinstance(name, str) or not name:
            raise ValueError(f"ImageConfig.formats: bad format name {name!r}")
        name = name.upper()
        if name not in names:
            names.append(name)
    Image.init()
    unknown = [n for n in names if n not in Image.OPEN and n not in DEFAULT_FORMATS]
    if unknown:
        raise ValueError(
            f"ImageConfig.formats: Pillow cannot open {', '.join(unknown)}; "
            f"known formats: {', '.join(sorted(Image.OPEN))}"
        )
    return tuple(names)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image.

    Attributes:
        pixels: C-contiguous ``uint8`` array ``[image_size, image_size, 3]`` (RGB).
        width, height: original full-resolution size as displayed (after EXIF
            orientation, before draft decoding and resizing).
        format: Pillow format name, e.g. ``"JPEG"``, ``"MPO"``, ``"PNG"``.
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3:
            raise ValueError("DecodedImage.pixels must be a uint8 array of shape [H, W, 3]")
        if not p.flags.c_contiguous:
            raise ValueError("DecodedImage.pixels must be C-contiguous")


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def decode_image(data: bytes, config: ImageConfig) -> DecodedImage:
    """Decode encoded image bytes to a squashed ``image_size``² RGB array.

    Args:
        data: the file's bytes (``bytes``, ``bytearray`` or ``memoryview``).
        config: decoding options; must be the same for training and serving.

    Returns:
        :class:`DecodedImage`.

    Raises:
        EmptyImageError, UnsupportedImageError, TruncatedImageError,
        ImageTooLargeError, ImageTooSmallError: all :class:`ImageDecodeError`,
            for problems with the data.
        TypeError: ``data`` is not bytes-like or ``config`` is not an
            :class:`ImageConfig` (a bug in the caller, never converted).
    """
    if not isinstance(config, ImageConfig):
        raise TypeError(f"config must be an ImageConfig, not {type(config).__name__}")
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise EmptyImageError("image file is empty (0 bytes)")

    formats = _enabled_formats(config.formats)
    try:
        im = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise _unidentified(data, config, formats) from None
    except _BOMB_ERRORS as e:
        raise ImageTooLargeError(
            f"image is too large to decode safely (limit {config.max_image_pixels:,} "
            f"pixels; Pillow's decompression-bomb guard refused it first: {e})"
        ) from e
    except _DATA_ERRORS as e:
        kind = _sniff(data) or "unknown format"
        raise TruncatedImageError(
            f"image header is truncated or corrupt ({kind}): {_reason(e)}"
        ) from e

    with im:
        fmt = im.format or "unknown"
        width, height = im.size
        _check_size(fmt, width, height, config)
        what = f"{fmt}, {width}x{height}"
        try:
            if config.draft and fmt in _DRAFT_FORMATS:
                target = DRAFT_REDUCING_GAP * config.image_size
                im.draft("RGB", (target, target))
            # One decoder call for the whole file: Pillow takes the GIL back between
            # blocks (64 KB by default, ~40 per 2.5 MB photo), and each take waits up
            # to the interpreter's switch interval while another thread runs Python,
            # such as the model's trace while it loads (PERFORMANCE.md, items 17 and 19).
            im.decodermaxblock = max(im.decodermaxblock, len(data))
            im.load()
        except _BOMB_ERRORS as e:
            raise ImageTooLargeError(
                f"image is too large to decode safely ({what}): {e}"
            ) from e
        except _DATA_ERRORS as e:
            raise _load_error(e, what) from e
        if im.size != (width, height) and fmt not in _DRAFT_FORMATS:
            # A few formats (GIF frames larger than the logical screen) grow
            # on load; re-check what was actually allocated.
            _check_size(fmt, *im.size, config)
        orientation = _orientation(im)

        try:
            rgb = _to_rgb(im, config.background)
        except ValueError as e:
            raise UnsupportedImageError(
                f"cannot convert pixel mode {im.mode} to RGB ({what}): {e}"
            ) from e
        except _DATA_ERRORS as e:
            raise TruncatedImageError(f"image data is corrupt ({what}): {_reason(e)}") from e

        # Inside the `with`: `rgb` may be `im` itself, unusable once closed.
        out = _resize(rgb, config.image_size)
        method = _TRANSPOSE.get(orientation)
        if method is not None:
            out = out.transpose(method)
        pixels = np.array(out, dtype=np.uint8, order="C")
    if orientation >= 5:
        width, height = height, width
    return DecodedImage(pixels=pixels, width=width, height=height, format=fmt)


def resize_pixels(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Squash an ``[H, W, 3]`` (or ``[H, W]`` grey) ``uint8`` array to
    ``[image_size, image_size, 3]`` with the same filter as :func:`decode_image`.

    Returns a new C-contiguous ``uint8`` array.  Wrong input raises
    ``TypeError`` / ``ValueError`` (these are caller bugs, not data errors).
    """
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"pixels must be a numpy array, not {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, not {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels must have shape [H, W, 3] or [H, W], got {pixels.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    if not _is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    im = Image.fromarray(np.ascontiguousarray(pixels))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(_resize(im, int(image_size)), dtype=np.uint8, order="C")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _resize(im: Image.Image, size: int) -> Image.Image:
    return im.resize((size, size), RESAMPLE)


def _enabled_formats(formats: Optional[Tuple[str, ...]]) -> Optional[Tuple[str, ...]]:
    """Config formats this Pillow build can open (Image.open raises KeyError
    for a name it has no plugin for)."""
    if formats is None:
        return None
    Image.init()  # idempotent; registers all plugins (Image.open may do it too)
    return tuple(f for f in formats if f in Image.OPEN)


def _check_size(fmt: str, width: int, height: int, config: ImageConfig) -> None:
    if min(width, height) < config.min_image_side:
        raise ImageTooSmallError(
            f"image is {width}x{height} ({fmt}); both sides must be at least "
            f"{config.min_image_side} pixel(s)"
        )
    pixels = width * height
    if pixels > config.max_image_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {pixels:,} pixels ({fmt}), over the "
            f"limit of {config.max_image_pixels:,}; refusing to decode it "
            f"(possible decompression bomb)"
        )


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text if text else type(e).__name__


def _load_error(e: BaseException, what: str) -> ImageDecodeError:
    text = _reason(e)
    lower = text.lower()
    if isinstance(e, OSError) and "not available" in lower:
        # e.g. "decoder jpeg2k not available": a build without the codec.
        return UnsupportedImageError(f"no decoder for this image ({what}): {text}")
    if isinstance(e, EOFError) or "truncated" in lower:
        return TruncatedImageError(f"image data is truncated ({what}): {text}")
    return TruncatedImageError(f"image data is corrupt ({what}): {text}")


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


def _sniff(data: bytes) -> Optional[str]:
    """Best-effort format name from magic bytes (only for error messages)."""
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
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12])
    return None


def _unidentified(
    data: bytes, config: ImageConfig, formats: Optional[Tuple[str, ...]]
) -> ImageDecodeError:
    kind = _sniff(data)
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
    if formats is not None and kind not in formats and not (kind == "JPEG" and "MPO" in formats):
        return UnsupportedImageError(
            f"{kind} images are not enabled (ImageConfig.formats = {config.formats})"
        )
    return TruncatedImageError(
        f"data starts like a {kind} file but its header could not be parsed "
        f"(truncated or corrupt, {len(data):,} bytes)"
    )


def _orientation(im: Image.Image) -> int:
    """EXIF/XMP orientation 1..8; anything missing, corrupt or out of range is 1."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except _DATA_ERRORS:
        return 1
    if _is_int(value) and 1 <= value <= 8:
        return int(value)
    return 1


def _to_rgb(im: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
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


def _high_bit_to_8bit(im: Image.Image) -> Image.Image:
    """I;16* / I / F -> L (or LA when a transparent value is set)."""
    raw = np.asarray(im)
    if im.mode == "F":
        values = raw.astype(np.float64)
        peak = float(np.max(values, where=np.isfinite(values), initial=0.0))
        scale = 255.0 if peak <= 1.0 else 1.0
        values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    else:
        values = np.clip(raw, 0, 65535).astype(np.uint32)
        grey = ((values + 128) // 257).astype(np.uint8)
    grey_im = Image.fromarray(grey)  # mode L
    transparent = im.info.get("transparency")
    if _is_int(transparent):
        alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (grey_im, Image.fromarray(alpha)))
    return grey_im
