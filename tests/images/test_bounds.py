"""Every decode is bounded: memory within decoding.DECODE_BYTES_PER_PIXEL of the pixel
limit, hostile headers refused before allocation, and any failure one image's error."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from batch_caption.images import decoding
from batch_caption.images.decoding import ImageConfig, ImageTooLargeError, TruncatedImageError, decode_image

LIMIT = 4_000_000  # the pixel limit of the memory tests: a worst case is ~100 MB


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def _grey_png(width: int, height: int) -> bytes:
    """A valid all-black 8-bit grey PNG, compressed as it is made (no pixels in memory)."""
    co, row, parts = zlib.compressobj(1), bytes(1 + width), []
    for _ in range(height):
        parts.append(co.compress(row))
    parts.append(co.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _ico(png: bytes, says: int = 16) -> bytes:
    """An icon whose directory says says x says, holding `png` whatever its size."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", says, says, 0, 0, 1, 32, len(png), 22) + png


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def _worst_cases() -> dict[str, bytes]:
    side = int(LIMIT ** 0.5)
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 4), np.uint8), "RGBA")
    grey16 = Image.fromarray(np.arange(side * side, dtype=np.uint16).reshape(side, side) % 60000)
    return {
        "wide_at_side_limit": _grey_png(decoding.max_side(LIMIT), LIMIT // decoding.max_side(LIMIT)),
        "wide_over_side_limit": _grey_png(LIMIT, 1),
        "float_tiff": _encode(Image.fromarray(np.full((side, side), 0.5, np.float32)), "TIFF", compression="tiff_deflate"),
        "sixteen_bit_with_transparency": _encode(grey16, "PNG", transparency=7),
        "rgba": _encode(rgba, "PNG", compress_level=1),
        "ico_lying_under_limit": _ico(_grey_png(side, side)),
        "ico_lying_over_limit": _ico(_grey_png(3 * side, 3 * side)),
    }


# The peak resident size of the process's own memory (VmHWM): ru_maxrss would carry the
# parent's peak over the exec.
_MEASURE = textwrap.dedent("""
    import sys
    from batch_caption.images import decoding

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    data = open(sys.argv[1], "rb").read()
    config = decoding.ImageConfig(image_size=128, max_image_pixels=int(sys.argv[2]))
    try:
        decoding.decode_image(open(sys.argv[3], "rb").read(), config)  # warm up: lazy imports
    except decoding.ImageDecodeError:
        pass
    before = peak()
    try:
        decoding.decode_image(data, config)
        outcome = "decoded"
    except decoding.ImageDecodeError as e:
        outcome = type(e).__name__
    print(outcome, peak() - before)
""")


def test_the_worst_cases_decode_within_the_stated_memory(tmp_path):
    small = tmp_path / "small.png"
    small.write_bytes(_encode(Image.new("RGB", (4, 4)), "PNG"))
    outcomes = {}
    for name, data in _worst_cases().items():
        path = tmp_path / name
        path.write_bytes(data)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(LIMIT), str(small)],
                             capture_output=True, text=True, timeout=120, env=env, check=True).stdout.split()
        outcomes[name] = out[0]
        # The growth of the peak over the peak before is what the decode took.
        assert int(out[1]) <= decoding.DECODE_BYTES_PER_PIXEL * LIMIT, (name, int(out[1]) / LIMIT)
    assert outcomes == {
        "wide_at_side_limit": "decoded", "wide_over_side_limit": "ImageTooLargeError", "float_tiff": "decoded",
        "sixteen_bit_with_transparency": "decoded", "rgba": "decoded", "ico_lying_under_limit": "decoded",
        "ico_lying_over_limit": "ImageTooLargeError",
    }


def test_an_extreme_aspect_ratio_under_the_pixel_limit_is_refused_from_the_header():
    data = _grey_png(99_999_999, 1)  # the ~97 KB file that took 3.2 GB to resize
    with pytest.raises(ImageTooLargeError, match="99999999x1.*a side of 99,999,999 pixels"):
        decode_image(data, ImageConfig(image_size=128))
    assert decoding.max_side(decoding.DEFAULT_MAX_IMAGE_PIXELS) == 12_500_000
    assert decoding.max_side(100) == 1 << 16  # small limits still take ordinary images


def test_an_icon_is_refused_by_what_its_image_says_not_its_directory():
    with pytest.raises(ImageTooLargeError, match="12000x12000"):
        decode_image(_ico(_grey_png(12000, 12000)), ImageConfig(image_size=32))
    out = decode_image(_ico(_encode(Image.new("RGB", (40, 30), (255, 0, 0)), "PNG")), ImageConfig(image_size=8))
    assert (out.width, out.height) == (40, 30) and tuple(out.pixels[4, 4]) == (255, 0, 0)


def test_the_float_conversion_gives_the_pixels_it_gave_before():
    values = np.array([[0.0, 0.25, 1.0, np.nan], [np.inf, -np.inf, 0.5, 0.75]], np.float32)
    rows = np.repeat(values, 3000, axis=0)  # more rows than one conversion block holds
    out = decode_image(_encode(Image.fromarray(rows), "TIFF"), ImageConfig(image_size=4))
    grey = np.rint(np.clip(np.nan_to_num(rows.astype(np.float64) * 255.0, nan=0.0, posinf=255.0, neginf=0.0), 0, 255))
    expected = decoding.resize_pixels(grey.astype(np.uint8), 4)
    assert np.array_equal(out.pixels, expected)


@pytest.mark.parametrize("raised, error", [
    (MemoryError(), ImageTooLargeError), (RuntimeError("plugin bug on odd data"), TruncatedImageError),
    (TypeError("unsupported operand"), TruncatedImageError), (AttributeError("no tile"), TruncatedImageError),
])
def test_any_failure_while_decoding_or_resizing_is_the_images_error(monkeypatch, raised, error):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(Image.Image, "resize", fail)
    with pytest.raises(error) as info:
        decode_image(_encode(Image.new("RGB", (20, 10)), "PNG"), ImageConfig(image_size=8))
    assert type(raised).__name__ in str(info.value) or isinstance(raised, MemoryError)


def test_a_memory_error_while_decoding_is_a_decode_record_not_a_failed_run(monkeypatch, tmp_path):
    from batch_caption.core.read import ReadDecodeFn

    def fail(*args, **kwargs):
        raise MemoryError

    (tmp_path / "wide.png").write_bytes(_encode(Image.new("RGB", (20, 10)), "PNG"))
    monkeypatch.setattr(Image.Image, "resize", fail)
    fn = ReadDecodeFn(ImageConfig(image_size=8), 1 << 20, "r", threads=0)
    fn.setup()
    result = fn._work(str(tmp_path / "wide.png"))
    assert type(result.error).__name__ == "ImageTooLargeError" and "out of memory" in str(result.error)
