"""Image bytes -> fixed-size RGB ``uint8`` array, or a typed, explained error.

The captioning job calls :func:`decode_image` once per image, before batching, so one
bad file becomes one error record instead of failing a batch. Every failure while
decoding one image raises a subclass of :class:`ImageDecodeError` (whatever a decoder
raised on hostile data, ``MemoryError`` included); the error record is
``error = type(exc).__name__`` and ``message = str(exc)``. Wrong arguments (``data`` not
bytes, ``config`` not an :class:`ImageConfig`) are the caller's bug and raise TypeError.

Training-data preparation calls this same function with the same :class:`ImageConfig`,
so every choice below is part of the model contract: changing the filter, the draft
rule or the background changes the pixels the model sees.

* Squash, don't crop: the whole picture becomes ``image_size x image_size``.
* Resize filter :data:`RESAMPLE` (BICUBIC, anti-aliased when shrinking), exact.
* JPEG draft mode: decoded at 1/2, 1/4 or 1/8 scale while both axes stay
  ``>= DRAFT_REDUCING_GAP * image_size``; the final BICUBIC step still shrinks >= 2x.
* Transparency composited over ``ImageConfig.background`` (white).
* EXIF orientation applied after the resize; ``width``/``height`` are as displayed.
* ``max_image_pixels`` checked on the header size, before any pixel is decoded, and
  the longest side against :func:`max_side`; memory per decode stays within
  :data:`DECODE_BYTES_PER_PIXEL` bytes per pixel of the limit.
* Any failure while decoding one image (``MemoryError`` included) is that image's
  :class:`ImageDecodeError`.
* Only :data:`DEFAULT_FORMATS` by default; first frame of animations; truncated
  files are errors (Pillow's global ``LOAD_TRUNCATED_IMAGES`` is never set).

The error types live in :mod:`batch_caption.images.errors`, format sniffing and pixel
mode conversion in :mod:`batch_caption.images.formats`; both are re-exported here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from batch_caption.images.errors import (
    BOMB_ERRORS,
    DATA_ERRORS,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    ImageTooSmallError,
    TruncatedImageError,
    UnsupportedImageError,
    load_error,
    reason,
)
from batch_caption.images.formats import (
    DEFAULT_FORMATS,
    DRAFT_FORMATS,
    TRANSPOSE,
    enabled_formats,
    ico_frame_sizes,
    is_int,
    orientation,
    sniff,
    to_rgb,
    unidentified,
)

__all__ = [
    "DEFAULT_FORMATS",
    "DECODE_BYTES_PER_PIXEL",
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
    "max_side",
    "resize_pixels",
]

#: Default header pixel-count limit: every real camera, bounded memory per decode.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

#: Memory one decode may take, in bytes per pixel of ``max_image_pixels`` (beside the
#: file's bytes): Pillow's pixels (4 bytes each), the converted copies of a mode with
#: alpha or high bit depth, and the resize's filter weights (see :func:`max_side`).
DECODE_BYTES_PER_PIXEL = 24

#: Resampling filter for every resize in this module (train/serve contract).
RESAMPLE = Image.Resampling.BICUBIC

#: JPEG draft decoding keeps both axes >= DRAFT_REDUCING_GAP * image_size.
DRAFT_REDUCING_GAP = 2


@dataclass(frozen=True)
class ImageConfig:
    """How to decode.  Shared by training-data prep and inference: keep equal.

    Attributes:
        image_size: output side length; output is ``image_size x image_size``.
        max_image_pixels: refuse images whose header says more pixels than
            this (before decoding).  See the module docstring.
        draft: use JPEG DCT-domain downscaling (less decoding; slightly different
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
        if not is_int(self.image_size) or self.image_size < 1:
            raise ValueError(
                f"ImageConfig.image_size must be a positive int, got {self.image_size!r}"
            )
        if not is_int(self.max_image_pixels) or self.max_image_pixels < 1:
            raise ValueError(
                "ImageConfig.max_image_pixels must be a positive int, "
                f"got {self.max_image_pixels!r}"
            )
        if not isinstance(self.draft, bool):
            raise ValueError(f"ImageConfig.draft must be a bool, got {self.draft!r}")
        if not is_int(self.min_image_side) or self.min_image_side < 1:
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
    if len(value) != 3 or not all(is_int(v) and 0 <= v <= 255 for v in value):
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
    try:
        return _decode(data, config)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageTooLargeError(
            f"ran out of memory decoding this image ({len(data):,} bytes)"
        ) from None
    except Exception as e:  # whatever a decoder raises on hostile data: this image's error
        raise TruncatedImageError(
            f"image data is corrupt ({sniff(data) or 'unknown format'}): the decoder "
            f"raised {type(e).__name__}: {reason(e)}"
        ) from e


def _decode(data: bytes, config: ImageConfig) -> DecodedImage:
    """decode_image's work, on checked arguments."""
    if config.formats is None or "ICO" in config.formats:
        # Pillow decodes an icon while opening it, at the size its image says.
        for width, height in ico_frame_sizes(data):
            _check_size("ICO", width, height, config)
    formats = enabled_formats(config.formats)
    try:
        im = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise unidentified(data, config.formats, formats) from None
    except BOMB_ERRORS as e:
        raise ImageTooLargeError(
            f"image is too large to decode safely (limit {config.max_image_pixels:,} "
            f"pixels; Pillow's decompression-bomb guard refused it first: {e})"
        ) from e
    except DATA_ERRORS as e:
        kind = sniff(data) or "unknown format"
        raise TruncatedImageError(
            f"image header is truncated or corrupt ({kind}): {reason(e)}"
        ) from e

    with im:
        fmt = im.format or "unknown"
        width, height = im.size
        _check_size(fmt, width, height, config)
        what = f"{fmt}, {width}x{height}"
        try:
            if config.draft and fmt in DRAFT_FORMATS:
                target = DRAFT_REDUCING_GAP * config.image_size
                im.draft("RGB", (target, target))
            # One decoder call for the whole file: Pillow takes the GIL back between
            # blocks (64 KB by default), and each take can wait a whole switch
            # interval while another thread runs Python, such as the model's trace
            # while it loads.
            im.decodermaxblock = max(im.decodermaxblock, len(data))
            im.load()
        except BOMB_ERRORS as e:
            raise ImageTooLargeError(
                f"image is too large to decode safely ({what}): {e}"
            ) from e
        except DATA_ERRORS as e:
            raise load_error(e, what) from e
        if im.size != (width, height) and fmt not in DRAFT_FORMATS:
            # A few formats (GIF frames larger than the logical screen) grow
            # on load; re-check what was actually allocated.
            _check_size(fmt, *im.size, config)
        exif_orientation = orientation(im)

        try:
            rgb = to_rgb(im, config.background)
        except ValueError as e:
            raise UnsupportedImageError(
                f"cannot convert pixel mode {im.mode} to RGB ({what}): {e}"
            ) from e
        except DATA_ERRORS as e:
            raise TruncatedImageError(f"image data is corrupt ({what}): {reason(e)}") from e

        # Inside the `with`: `rgb` may be `im` itself, unusable once closed.
        out = _resize(rgb, config.image_size)
        method = TRANSPOSE.get(exif_orientation)
        if method is not None:
            out = out.transpose(method)
        pixels = np.array(out, dtype=np.uint8, order="C")
    if exif_orientation >= 5:
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
    if not is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    im = Image.fromarray(np.ascontiguousarray(pixels))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(_resize(im, int(image_size)), dtype=np.uint8, order="C")


def max_side(max_image_pixels: int) -> int:
    """The longest side decoded under a pixel limit. Resizing a side of n pixels to
    a few hundred holds 32 bytes of filter weights per source pixel of that side, so a
    99,999,999 x 1 image under the limit would need 3.2 GB: a side may be at most
    max_image_pixels / 8 (weights within 4 bytes per pixel of the limit), and never
    less than 65,536 (2 MB of weights)."""
    return max(max_image_pixels // 8, 1 << 16)


def _resize(im: Image.Image, size: int) -> Image.Image:
    return im.resize((size, size), RESAMPLE)



def _check_size(fmt: str, width: int, height: int, config: ImageConfig) -> None:
    if min(width, height) < config.min_image_side:
        raise ImageTooSmallError(
            f"image is {width}x{height} ({fmt}); both sides must be at least "
            f"{config.min_image_side} pixel(s)"
        )
    pixels = width * height
    longest = max(width, height)
    if pixels <= config.max_image_pixels and longest > max_side(config.max_image_pixels):
        raise ImageTooLargeError(
            f"image is {width}x{height} ({fmt}): a side of {longest:,} pixels is over "
            f"the limit of {max_side(config.max_image_pixels):,} for a pixel limit of "
            f"{config.max_image_pixels:,} (resizing it would need more memory)"
        )
    if pixels > config.max_image_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {pixels:,} pixels ({fmt}), over the "
            f"limit of {config.max_image_pixels:,}; refusing to decode it "
            f"(possible decompression bomb)"
        )
