"""Tests for batch_caption.images: decoding and its errors / formats (all test data is
generated in memory)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin, features

from batch_caption.images import decoding, formats
from batch_caption.images.decoding import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DRAFT_REDUCING_GAP,
    DecodedImage,
    EmptyImageError,
    ImageConfig,
    ImageDecodeError,
    ImageTooLargeError,
    ImageTooSmallError,
    TruncatedImageError,
    UnsupportedImageError,
    decode_image,
    resize_pixels,
)

WHITE = (255, 255, 255)
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
    )


def raw_png(
    width: int,
    height: int,
    bit_depth: int,
    colour_type: int,
    idat: bytes,
    extra: bytes = b"",
) -> bytes:
    """A PNG from already-compressed IDAT data (lets tests write what Pillow won't)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png16(array: np.ndarray, colour_type: int, extra: bytes = b"") -> bytes:
    """16-bit PNG from a uint16 [H, W] (grey) or [H, W, C] array."""
    h, w = array.shape[:2]
    rows = array.astype(">u2").reshape(h, -1).tobytes()
    stride = len(rows) // h
    filtered = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(h))
    return raw_png(w, h, 16, colour_type, zlib.compress(filtered), extra)


def quadrants(width: int, height: int) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    a[:h2, :w2] = RED
    a[:h2, w2:] = GREEN
    a[h2:, :w2] = BLUE
    a[h2:, w2:] = WHITE
    return Image.fromarray(a)


def smooth_photo(width: int, height: int) -> Image.Image:
    """Photo-like content: smooth colour fields plus some edges and mild noise.

    Built from separable 1-D pieces so a 12 MP image takes ~0.2 s."""
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    a = np.empty((height, width, 3), np.float32)
    a[..., 0] = 127 + 100 * np.sin(x / 97) * np.cos(y / 53)
    # sin((x + y) / 131) = sin(x') cos(y') + cos(x') sin(y')
    a[..., 1] = 127 + 100 * (np.sin(x / 131) * np.cos(y / 131) + np.cos(x / 131) * np.sin(y / 131))
    a[..., 2] = (x // 250 % 2) * 180 + 40
    noise = np.random.default_rng(0).normal(0, 4, (64, 64, 3)).astype(np.float32)
    a += np.tile(noise, (height // 64 + 1, width // 64 + 1, 1))[:height, :width]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def centre(pixels: np.ndarray) -> np.ndarray:
    s = pixels.shape[0]
    return pixels[s // 2, s // 2].astype(int)


def assert_contract(result: DecodedImage, size: int) -> None:
    assert isinstance(result, DecodedImage)
    assert isinstance(result.pixels, np.ndarray)
    assert result.pixels.dtype == np.uint8
    assert result.pixels.shape == (size, size, 3)
    assert result.pixels.flags.c_contiguous
    assert isinstance(result.width, int) and isinstance(result.height, int)
    assert isinstance(result.format, str)


def assert_colour(pixel, expected, tol: int = 0) -> None:
    diff = np.abs(np.asarray(pixel, int) - np.asarray(expected, int))
    assert diff.max() <= tol, f"{tuple(np.asarray(pixel))} != {expected} (tol {tol})"


CFG = ImageConfig(image_size=32)


# --------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------

FORMATS = [
    ("JPEG", {"quality": 95}, 12),
    ("PNG", {}, 0),
    ("GIF", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("WEBP", {"quality": 90}, 20),
    ("BMP", {}, 0),
    ("TIFF", {}, 0),
    ("TIFF", {"compression": "tiff_lzw"}, 0),
    ("PPM", {}, 0),
]
if features.check("avif"):
    FORMATS.append(("AVIF", {"quality": 95}, 25))


@pytest.mark.parametrize("fmt,kw,tol", FORMATS, ids=lambda v: str(v))
def test_formats_decode_quadrants(fmt, kw, tol):
    data = encode(quadrants(64, 48), fmt, **kw)
    result = decode_image(data, CFG)
    assert_contract(result, 32)
    assert result.format == fmt
    assert (result.width, result.height) == (64, 48)
    p = result.pixels
    assert_colour(p[4, 4], RED, tol)
    assert_colour(p[4, 27], GREEN, tol)
    assert_colour(p[27, 4], BLUE, tol)
    assert_colour(p[27, 27], WHITE, tol)


def test_mpo_is_decoded_like_jpeg():
    frames = [quadrants(64, 48), Image.new("RGB", (64, 48), BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    result = decode_image(data, CFG)
    assert result.format == "MPO"
    assert_colour(result.pixels[4, 4], RED, 12)


def test_accepts_bytearray_and_memoryview():
    data = encode(quadrants(20, 20), "PNG")
    a = decode_image(data, CFG).pixels
    np.testing.assert_array_equal(decode_image(bytearray(data), CFG).pixels, a)
    np.testing.assert_array_equal(decode_image(memoryview(data), CFG).pixels, a)


def test_output_is_writeable_and_owned():
    result = decode_image(encode(quadrants(20, 20), "PNG"), CFG)
    result.pixels[0, 0] = 0  # no "assignment destination is read-only"


def test_squash_ignores_aspect_ratio():
    # 100x10 strip: left half red, right half blue -> squashed square keeps halves.
    a = np.zeros((10, 100, 3), np.uint8)
    a[:, :50] = RED
    a[:, 50:] = BLUE
    result = decode_image(encode(Image.fromarray(a), "PNG"), ImageConfig(image_size=16))
    assert_colour(result.pixels[0, 0], RED)
    assert_colour(result.pixels[15, 0], RED)
    assert_colour(result.pixels[15, 15], BLUE)


def test_small_images_are_upscaled():
    result = decode_image(encode(Image.new("RGB", (1, 1), GREEN), "GIF"), CFG)
    assert_contract(result, 32)
    assert (result.pixels == np.array(GREEN, np.uint8)).all()


# --------------------------------------------------------------------------
# animation: first frame
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,kw",
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],  # PNG = APNG
    ids=["gif", "webp", "apng"],
)
def test_animated_first_frame(fmt, kw):
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3  # really animated
    result = decode_image(data, CFG)
    assert (result.width, result.height) == (40, 30)
    assert (result.pixels == np.array(RED, np.uint8)).all()


# --------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------


def _palette_image(index: int) -> Image.Image:
    im = Image.new("P", (16, 16), index)
    im.putpalette([10, 200, 30, 250, 5, 5] + [0, 0, 0] * 254)
    return im


# (name, encoded bytes factory, config, expected centre colour, tolerance)
MODE_CASES = [
    ("1-white", lambda: encode(Image.new("1", (16, 16), 1), "PNG"), CFG, WHITE, 0),
    ("1-black", lambda: encode(Image.new("1", (16, 16), 0), "PNG"), CFG, (0, 0, 0), 0),
    ("L", lambda: encode(Image.new("L", (16, 16), 77), "PNG"), CFG, (77, 77, 77), 0),
    ("L-jpeg", lambda: encode(Image.new("L", (16, 16), 77), "JPEG"), CFG, (77, 77, 77), 2),
    ("LA-opaque", lambda: encode(Image.new("LA", (16, 16), (90, 255)), "PNG"), CFG, (90,) * 3, 0),
    ("LA-clear", lambda: encode(Image.new("LA", (16, 16), (90, 0)), "PNG"), CFG, WHITE, 0),
    # 90 * 128/255 + 255 * 127/255 = 172.2
    ("LA-half", lambda: encode(Image.new("LA", (16, 16), (90, 128)), "PNG"), CFG, (172,) * 3, 1),
    ("P", lambda: encode(_palette_image(0), "PNG"), CFG, (10, 200, 30), 0),
    ("P-gif", lambda: encode(_palette_image(1), "GIF"), CFG, (250, 5, 5), 0),
    ("P-transparent-index", lambda: encode(_palette_image(1), "PNG", transparency=1), CFG, WHITE, 0),
    ("P-other-index-opaque", lambda: encode(_palette_image(0), "PNG", transparency=1), CFG, (10, 200, 30), 0),
    ("P-gif-transparent", lambda: encode(_palette_image(1), "GIF", transparency=1), CFG, WHITE, 0),
    ("L-tRNS", lambda: encode(Image.new("L", (16, 16), 100), "PNG", transparency=100), CFG, WHITE, 0),
    ("RGB-tRNS", lambda: encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG", transparency=(1, 2, 3)), CFG, WHITE, 0),
    ("RGBA-opaque", lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 255)), "PNG"), CFG, (200, 100, 50), 0),
    # (200,100,50) * 128/255 + 255 * 127/255 = (227.4, 177.2, 152.1)
    ("RGBA-half", lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 128)), "PNG"), CFG, (227, 177, 152), 1),
    # over black: (200,100,50) * 128/255 = (100.4, 50.2, 25.1)
    (
        "RGBA-half-black-bg",
        lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 128)), "PNG"),
        ImageConfig(image_size=32, background=(0, 0, 0)),
        (100, 50, 25),
        1,
    ),
    (
        "RGBA-clear-blue-bg",
        lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 0)), "PNG"),
        ImageConfig(image_size=32, background=BLUE),
        BLUE,
        0,
    ),
    ("RGBA-webp", lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 0)), "WEBP", lossless=True), CFG, WHITE, 0),
    ("RGBA-tiff", lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 128)), "TIFF"), CFG, (227, 177, 152), 1),
    ("PA-tiff", lambda: encode(Image.new("PA", (16, 16), (0, 0)), "TIFF"), CFG, WHITE, 0),
    ("CMYK-jpeg", lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), CFG, RED, 6),
    ("CMYK-tiff", lambda: encode(Image.new("CMYK", (16, 16), (0, 0, 255, 0)), "TIFF"), CFG, (255, 255, 0), 0),
    ("RGBX-tiff", lambda: encode(Image.new("RGBX", (16, 16), (1, 2, 3, 0)), "TIFF"), CFG, (1, 2, 3), 0),
    # 16-bit greyscale: Pillow's own convert("L") would clip this to 255.
    ("I;16-png-mid", lambda: png16(np.full((16, 16), 0x8080, np.uint16), 0), CFG, (128,) * 3, 0),
    ("I;16-png-dark", lambda: png16(np.full((16, 16), 0x0400, np.uint16), 0), CFG, (4,) * 3, 0),
    ("I;16-png-max", lambda: png16(np.full((16, 16), 0xFFFF, np.uint16), 0), CFG, WHITE, 0),
    ("I;16-tiff", lambda: encode(Image.fromarray(np.full((16, 16), 0x8080, np.uint16)), "TIFF"), CFG, (128,) * 3, 0),
    (
        "I;16B-tiff",
        lambda: encode(Image.new("I;16B", (16, 16), 0x4040), "TIFF"),
        CFG,
        (64,) * 3,
        0,
    ),
    (
        "I;16-tRNS",
        lambda: png16(np.full((16, 16), 0x1234, np.uint16), 0, png_chunk(b"tRNS", struct.pack(">H", 0x1234))),
        CFG,
        WHITE,
        0,
    ),
    ("I-tiff", lambda: encode(Image.fromarray(np.full((16, 16), 0x8080, np.int32)), "TIFF"), CFG, (128,) * 3, 0),
    ("I-negative", lambda: encode(Image.fromarray(np.full((16, 16), -5, np.int32)), "TIFF"), CFG, (0, 0, 0), 0),
    ("I-pgm16", lambda: encode(Image.fromarray(np.full((16, 16), 0x8080, np.uint16)), "PPM"), CFG, (128,) * 3, 0),
    ("F-unit", lambda: encode(Image.fromarray(np.full((16, 16), 0.5, np.float32)), "TIFF"), CFG, (128,) * 3, 0),
    ("F-255", lambda: encode(Image.fromarray(np.full((16, 16), 200.0, np.float32)), "TIFF"), CFG, (200,) * 3, 0),
    ("F-nan", lambda: encode(Image.fromarray(np.full((16, 16), np.nan, np.float32)), "TIFF"), CFG, (0, 0, 0), 0),
    # 16-bit RGB / RGBA / LA PNGs: Pillow opens these as 8-bit modes.
    ("RGB16-png", lambda: png16(np.full((16, 16, 3), [0xFFFF, 0x8080, 0], np.uint16), 2), CFG, (255, 128, 0), 0),
    ("RGBA16-png", lambda: png16(np.full((16, 16, 4), [0xFFFF, 0, 0, 0], np.uint16), 6), CFG, WHITE, 0),
    ("LA16-png", lambda: png16(np.full((16, 16, 2), [0x8080, 0xFFFF], np.uint16), 4), CFG, (128,) * 3, 0),
]


@pytest.mark.parametrize("name,make,config,expected,tol", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_modes(name, make, config, expected, tol):
    result = decode_image(make(), config)
    assert_contract(result, config.image_size)
    assert (result.width, result.height) == (16, 16)
    # uniform input -> uniform output
    assert np.abs(result.pixels.astype(int) - centre(result.pixels)).max() <= 2 * tol + 1
    assert_colour(centre(result.pixels), expected, tol)


def test_sixteen_bit_gradient_keeps_ordering_and_range():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    result = decode_image(png16(ramp, 0), ImageConfig(image_size=64))
    row = result.pixels[4, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254
    assert (np.diff(row) >= -1).all()  # monotone up to filter ringing
    assert abs(row[32] - 128) <= 3


@pytest.mark.parametrize(
    "im,expected",
    [
        (Image.new("YCbCr", (8, 8), (128, 128, 128)), (128, 128, 128)),
        (Image.new("RGBA", (8, 8), (200, 100, 50, 128)).convert("RGBa"), (227, 177, 152)),
        (Image.new("LA", (8, 8), (90, 128)).convert("La"), (172, 172, 172)),
        (Image.new("HSV", (8, 8), (0, 255, 255)), RED),
    ],
    ids=["YCbCr", "RGBa", "La", "HSV"],
)
def test_in_memory_only_modes(im, expected):
    # Modes that no writer here produces in a file; test the conversion step.
    rgb = formats.to_rgb(im, WHITE)
    assert rgb.mode == "RGB"
    assert_colour(np.asarray(rgb)[4, 4], expected, 1)


def test_lab_tiff_decodes():
    result = decode_image(encode(Image.new("LAB", (16, 16), (50, 128, 128)), "TIFF"), CFG)
    assert_contract(result, 32)


# --------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------


def corner_image() -> Image.Image:
    """40 wide x 20 high, blue, with a red 8x8 block in the top-left corner."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:] = BLUE
    a[:8, :8] = RED
    return Image.fromarray(a)


@pytest.mark.parametrize(
    "orientation,size,red_corner",
    [
        (1, (40, 20), "top-left"),
        (2, (40, 20), "top-right"),
        (3, (40, 20), "bottom-right"),
        (4, (40, 20), "bottom-left"),
        (5, (20, 40), "top-left"),
        (6, (20, 40), "top-right"),
        (7, (20, 40), "bottom-right"),
        (8, (20, 40), "bottom-left"),
    ],
)
def test_exif_orientation(orientation, size, red_corner):
    data = encode(corner_image(), "PNG", exif=exif_with_orientation(orientation))
    result = decode_image(data, ImageConfig(image_size=40))
    assert (result.width, result.height) == size
    p = result.pixels
    corners = {
        "top-left": p[1, 1],
        "top-right": p[1, 38],
        "bottom-left": p[38, 1],
        "bottom-right": p[38, 38],
    }
    for name, pixel in corners.items():
        assert_colour(pixel, RED if name == red_corner else BLUE, 2)

    # Same picture as Pillow's exif_transpose followed by the squash.
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((40, 40), decoding.RESAMPLE))
    assert np.abs(p.astype(int) - reference.astype(int)).max() <= 2


def test_exif_orientation_jpeg_with_draft():
    # 1200x800 stored, orientation 6 -> displayed 800x1200; draft shrinks it.
    data = encode(quadrants(1200, 800), "JPEG", quality=95, exif=exif_with_orientation(6))
    result = decode_image(data, ImageConfig(image_size=64))
    assert (result.width, result.height) == (800, 1200)
    p = result.pixels
    # stored top-left red -> displayed top-right after a 90° clockwise turn
    assert_colour(p[5, 58], RED, 12)
    assert_colour(p[5, 5], BLUE, 12)  # stored bottom-left
    assert_colour(p[58, 58], GREEN, 12)  # stored top-right
    assert_colour(p[58, 5], WHITE, 12)  # stored bottom-right


@pytest.mark.parametrize("value", [0, 9, 1000])
def test_bad_orientation_values_are_ignored(value):
    data = encode(corner_image(), "PNG", exif=exif_with_orientation(value))
    result = decode_image(data, ImageConfig(image_size=40))
    assert (result.width, result.height) == (40, 20)
    assert_colour(result.pixels[1, 1], RED, 2)


# --------------------------------------------------------------------------
# JPEG draft mode
# --------------------------------------------------------------------------


@pytest.fixture
def draft_sizes(monkeypatch):
    """Record the size Pillow decodes at after each JPEG draft() call."""
    sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = original(self, mode, size)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return sizes


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(smooth_photo(4000, 3000), "JPEG", quality=90)


def test_draft_large_jpeg(big_jpeg, draft_sizes):
    s = 299
    fast = decode_image(big_jpeg, ImageConfig(image_size=s))
    assert_contract(fast, s)
    assert (fast.width, fast.height) == (4000, 3000)
    assert fast.format == "JPEG"
    assert draft_sizes == [(1000, 750)]  # 1/4 scale: both axes >= 2 * 299

    full = decode_image(big_jpeg, ImageConfig(image_size=s, draft=False))
    assert draft_sizes == [(1000, 750)]  # draft=False never calls draft()
    assert (full.width, full.height) == (4000, 3000)
    diff = np.abs(fast.pixels.astype(int) - full.pixels.astype(int))
    assert diff.mean() < 1.0
    assert np.percentile(diff, 99.9) <= 8


@pytest.mark.parametrize("draft", [True, False])
def test_the_decoder_gets_the_whole_file_in_one_call(monkeypatch, draft):
    # Pillow takes the GIL back between decoder calls; one call per file keeps a decode
    # from waiting on Python running in other threads (the model's trace as it loads).
    noisy = Image.fromarray(np.random.default_rng(3).integers(0, 256, (600, 800, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=95)
    assert len(data) > 4 * 65536  # 64 KB blocks would take several calls
    calls = []
    real = Image._getdecoder

    class Counting:
        def __init__(self, decoder):
            self._decoder = decoder

        def decode(self, buffer):
            calls.append(len(buffer))
            return self._decoder.decode(buffer)

        def __getattr__(self, name):
            return getattr(self._decoder, name)

    monkeypatch.setattr(Image, "_getdecoder", lambda *a, **k: Counting(real(*a, **k)))
    out = decode_image(data, ImageConfig(image_size=32, draft=draft))
    assert_contract(out, 32)
    assert len(calls) == 1 and calls[0] >= len(data) - 1024  # all but the header


@pytest.mark.parametrize(
    "width,height,size",
    [(6000, 100, 64), (100, 6000, 64), (6000, 600, 64), (3000, 3000, 64), (1000, 300, 64), (50, 40, 64)],
)
def test_draft_never_goes_below_target(width, height, size, draft_sizes):
    data = encode(Image.new("RGB", (width, height), (30, 140, 220)), "JPEG")
    result = decode_image(data, ImageConfig(image_size=size))
    assert_contract(result, size)
    assert (result.width, result.height) == (width, height)
    assert_colour(centre(result.pixels), (30, 140, 220), 4)
    (decoded,) = draft_sizes
    target = DRAFT_REDUCING_GAP * size
    for full_side, draft_side in zip((width, height), decoded):
        assert draft_side >= min(full_side, target)
        # and it did shrink whenever a power-of-two step still fits
        if full_side // 2 >= target and min(width, height) // 2 >= target:
            assert draft_side < full_side


def test_draft_extreme_aspect_keeps_detail(draft_sizes):
    # 6000x100 with stripes along the long axis: must not collapse.
    a = np.zeros((100, 6000, 3), np.uint8)
    a[:, :3000] = RED
    a[:, 3000:] = BLUE
    result = decode_image(encode(Image.fromarray(a), "JPEG", quality=95), ImageConfig(image_size=64))
    assert draft_sizes == [(6000, 100)]  # short side < 2*64: no draft scaling
    assert_colour(result.pixels[32, 10], RED, 12)
    assert_colour(result.pixels[32, 54], BLUE, 12)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_empty():
    with pytest.raises(EmptyImageError, match="empty"):
        decode_image(b"", CFG)


@pytest.mark.parametrize(
    "data",
    [b"hello", b"hello world, this is text named cat.jpg\n", b"<!DOCTYPE html><html>not found</html>", b"\x00"],
)
def test_not_an_image(data):
    with pytest.raises(UnsupportedImageError, match="not a recognised image") as info:
        decode_image(data, CFG)
    assert repr(data[:8])[2:-1] in str(info.value)  # shows the first bytes


def test_random_bytes():
    rng = np.random.default_rng(1234)
    for _ in range(50):
        data = rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
        with pytest.raises(UnsupportedImageError):
            decode_image(data, CFG)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated(fmt):
    data = encode(smooth_photo(200, 150), fmt)
    with pytest.raises(TruncatedImageError) as info:
        decode_image(data[: len(data) // 2], CFG)
    assert fmt in str(info.value)


def test_truncated_jpeg_message():
    data = encode(smooth_photo(640, 480), "JPEG")
    with pytest.raises(TruncatedImageError, match=r"image data is truncated \(JPEG, 640x480\)"):
        decode_image(data[: len(data) // 2], CFG)


@pytest.mark.parametrize(
    "data,kind",
    [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff\xe0\x00", "JPEG"), (b"GIF89a\x01", "GIF"), (b"II*\x00\x08\x00", "TIFF")],
)
def test_header_only(data, kind):
    with pytest.raises(TruncatedImageError, match=kind):
        decode_image(data, CFG)


def test_corrupt_png_data():
    data = raw_png(16, 16, 8, 2, b"this is not zlib data")
    with pytest.raises(TruncatedImageError, match="PNG, 16x16"):
        decode_image(data, CFG)


def test_heic_is_unsupported():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(UnsupportedImageError, match="HEIF"):
        decode_image(data, CFG)


def test_format_not_enabled():
    data = encode(quadrants(16, 16), "JPEG")
    with pytest.raises(UnsupportedImageError, match="JPEG images are not enabled"):
        decode_image(data, ImageConfig(image_size=8, formats=("PNG",)))
    assert decode_image(data, ImageConfig(image_size=8, formats=("JPEG",))).format == "JPEG"


@pytest.mark.skipif(not features.check("jpg_2000"), reason="no OpenJPEG")
def test_jpeg2000_only_when_allowed():
    data = encode(quadrants(16, 16), "JPEG2000")
    with pytest.raises(UnsupportedImageError, match="JPEG2000 images are not enabled"):
        decode_image(data, CFG)
    assert decode_image(data, ImageConfig(image_size=8, formats=None)).format == "JPEG2000"


def test_too_small():
    data = encode(Image.new("RGB", (1, 1)), "GIF")
    with pytest.raises(ImageTooSmallError, match="1x1"):
        decode_image(data, ImageConfig(image_size=8, min_image_side=8))


@pytest.mark.parametrize("bad", ["a string", None, 123, [1, 2, 3], np.zeros(4, np.uint8)])
def test_wrong_data_type_is_a_bug_not_a_data_error(bad):
    with pytest.raises(TypeError):
        decode_image(bad, CFG)


def test_wrong_config_type_is_a_bug():
    with pytest.raises(TypeError):
        decode_image(encode(quadrants(8, 8), "PNG"), {"image_size": 8})


def test_errors_hierarchy_and_pickle():
    for cls in (EmptyImageError, UnsupportedImageError, TruncatedImageError, ImageTooLargeError, ImageTooSmallError):
        assert issubclass(cls, ImageDecodeError)
        err = cls("something went wrong")
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == "something went wrong" == back.message
    with pytest.raises(ValueError):
        ImageDecodeError("")


# --------------------------------------------------------------------------
# size limit / decompression bombs
# --------------------------------------------------------------------------


def onebit_png(width: int, height: int) -> bytes:
    """A real, valid all-black 1-bit PNG, compressed (cheap to make)."""
    co = zlib.compressobj(1)
    row = bytes(1 + (width + 7) // 8)
    rows_per_block = 1000
    block = row * rows_per_block
    parts = [co.compress(block) for _ in range(height // rows_per_block)]
    parts.append(co.compress(row * (height % rows_per_block)))
    parts.append(co.flush())
    return raw_png(width, height, 1, 0, b"".join(parts))


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return onebit_png(30000, 30000)  # 900 MP, ~0.5 MB


def _no_pixel_decoding(monkeypatch):
    """Makes any decoding of pixel data fail the test: a refusal must come from the header."""
    from PIL import ImageFile

    def refuse(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_real_bomb_is_refused_from_its_header(bomb_png, monkeypatch):
    assert len(bomb_png) < 1_000_000
    limit_before = Image.MAX_IMAGE_PIXELS
    _no_pixel_decoding(monkeypatch)  # no 900 MB decode happens
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb_png, CFG)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL global untouched


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_own_limit_checked_from_header(monkeypatch):
    # 12000x10000 = 120 MP: over our default, under Pillow's hard limit, and
    # the IDAT is garbage -- so a TooLarge error proves nothing was decoded.
    data = raw_png(12000, 10000, 8, 2, b"garbage")
    _no_pixel_decoding(monkeypatch)
    with pytest.raises(ImageTooLargeError, match=r"12000x10000 = 120,000,000 pixels.*100,000,000"):
        decode_image(data, CFG)


def test_configured_limit():
    data = encode(quadrants(300, 300), "PNG")
    with pytest.raises(ImageTooLargeError, match="90,000 pixels"):
        decode_image(data, ImageConfig(image_size=8, max_image_pixels=50_000))
    assert decode_image(data, ImageConfig(image_size=8, max_image_pixels=90_000)).width == 300


def test_jpeg_limit_uses_full_size_not_draft_size():
    data = encode(Image.new("RGB", (2000, 1000)), "JPEG")
    with pytest.raises(ImageTooLargeError):
        decode_image(data, ImageConfig(image_size=8, max_image_pixels=1_999_999))


def test_pillow_bomb_warning_as_error_becomes_too_large():
    # Between Pillow's warning (89.5 MP) and our limit; if the process turns
    # warnings into errors Pillow raises first -- still a typed error.
    data = raw_png(10000, 9500, 8, 2, b"garbage")
    if 10000 * 9500 <= (Image.MAX_IMAGE_PIXELS or 0) or 10000 * 9500 > 2 * (Image.MAX_IMAGE_PIXELS or 0):
        pytest.skip("Pillow's global limit was changed in this process")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="decompression"):
            decode_image(data, ImageConfig(image_size=8, max_image_pixels=150_000_000))


# --------------------------------------------------------------------------
# config / dataclasses
# --------------------------------------------------------------------------


def test_config_defaults_and_normalisation():
    c = ImageConfig(image_size=299)
    assert c.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 100_000_000
    assert c.draft is True
    assert c.background == WHITE
    assert c.formats == DEFAULT_FORMATS
    assert c.min_image_side == 1
    c2 = ImageConfig(image_size=np.int64(8), background=[0, np.uint8(1), 2], formats=["png", "Jpeg", "PNG"])
    assert c2.image_size == 8 and type(c2.image_size) is int
    assert c2.background == (0, 1, 2)
    assert c2.formats == ("PNG", "JPEG")
    assert hash(c2) == hash(ImageConfig(image_size=8, background=(0, 1, 2), formats=("PNG", "JPEG")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.image_size = 3


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -3}, "image_size"),
        ({"image_size": 1.5}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"image_size": "299"}, "image_size"),
        ({"image_size": 8, "max_image_pixels": 0}, "max_image_pixels"),
        ({"image_size": 8, "max_image_pixels": 1e9}, "max_image_pixels"),
        ({"image_size": 8, "draft": "yes"}, "draft"),
        ({"image_size": 8, "draft": 1}, "draft"),
        ({"image_size": 8, "background": (256, 0, 0)}, "background"),
        ({"image_size": 8, "background": (-1, 0, 0)}, "background"),
        ({"image_size": 8, "background": (1, 2)}, "background"),
        ({"image_size": 8, "background": (1.0, 2, 3)}, "background"),
        ({"image_size": 8, "background": "white"}, "background"),
        ({"image_size": 8, "formats": "JPEG"}, "formats"),
        ({"image_size": 8, "formats": ()}, "formats"),
        ({"image_size": 8, "formats": ("JPG",)}, "formats"),
        ({"image_size": 8, "formats": (1,)}, "formats"),
        ({"image_size": 8, "min_image_side": 0}, "min_image_side"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageConfig(**kwargs)


def test_decoded_image_validation():
    ok = np.zeros((4, 4, 3), np.uint8)
    DecodedImage(ok, 4, 4, "PNG")
    with pytest.raises(ValueError):
        DecodedImage(ok.astype(np.float32), 4, 4, "PNG")
    with pytest.raises(ValueError):
        DecodedImage(np.zeros((4, 4), np.uint8), 4, 4, "PNG")
    with pytest.raises(ValueError):
        DecodedImage(np.zeros((4, 8, 3), np.uint8)[:, ::2], 4, 4, "PNG")


# --------------------------------------------------------------------------
# resize_pixels
# --------------------------------------------------------------------------


def test_resize_pixels_matches_decode():
    array = np.asarray(smooth_photo(123, 77))
    via_decode = decode_image(encode(Image.fromarray(array), "PNG"), ImageConfig(image_size=50)).pixels
    direct = resize_pixels(array, 50)
    np.testing.assert_array_equal(direct, via_decode)
    assert direct.dtype == np.uint8 and direct.shape == (50, 50, 3) and direct.flags.c_contiguous


def test_resize_pixels_grey_and_views():
    grey = np.full((10, 20), 90, np.uint8)
    assert (resize_pixels(grey, 7) == 90).all()
    assert resize_pixels(grey[:, :, None], 7).shape == (7, 7, 3)
    view = np.asarray(smooth_photo(40, 40))[::2, ::3]  # non-contiguous input
    assert resize_pixels(view, 9).shape == (9, 9, 3)


@pytest.mark.parametrize(
    "array,size,exc",
    [
        (np.zeros((4, 4, 3), np.float32), 4, TypeError),
        (np.zeros((4, 4, 4), np.uint8), 4, ValueError),
        (np.zeros((0, 4, 3), np.uint8), 4, ValueError),
        (np.zeros((4, 4, 3), np.uint8), 0, ValueError),
        ([[0]], 4, TypeError),
    ],
)
def test_resize_pixels_rejects_bad_input(array, size, exc):
    with pytest.raises(exc):
        resize_pixels(array, size)
