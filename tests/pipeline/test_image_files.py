"""The image filter: which listed files are inputs, by extension or by their first bytes."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from batch_caption.images import formats
from batch_caption.pipeline import image_files
from batch_caption.pipeline.image_files import ImageFiles, extension_of, parse_extensions
from batch_caption.storage import files


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("text, want", [
    ("jpg", ("jpg",)), ("jpg,PNG, .webp", ("jpg", "png", "webp")), ("png,png,PNG", ("png",)),
])
def test_extensions_are_parsed_lower_case_without_dots(text, want):
    assert parse_extensions(text) == want


@pytest.mark.parametrize("text, said", [
    ("", "no extension given"), (" ", "no extension given"), ("jpg,,png", "an empty item"),
    ("jpg,", "an empty item"), ("*.jpg", "'*.jpg' is not a file name extension"),
    ("jpg png", "'jpg png' is not a file name extension"), ("a/b", "'a/b' is not"),
])
def test_a_malformed_extension_list_says_what_is_wrong(text, said):
    with pytest.raises(ValueError, match="^" + said.replace("*", r"\*")):
        parse_extensions(text)
    with pytest.raises(ValueError):
        ImageFiles(("jpg", "*"))


@pytest.mark.parametrize("path, want", [
    ("/a/b/photo.JPG", "jpg"), ("gs://bucket/x/y.tar.gz", "gz"), ("/a/README", ""), ("/a/.DS_Store", ""),
    ("/a.d/IMG_0001", ""), ("photo.", ""), ("gs://bucket/Thumbs.db", "db"),
])
def test_the_extension_is_the_file_names_last_suffix(path, want):
    assert extension_of(path) == want


def test_every_extension_pillow_gives_a_default_format_is_an_input():
    Image.init()
    registered = Image.registered_extensions()
    for fmt in formats.DEFAULT_FORMATS:
        if fmt in Image.OPEN:
            names = {e.lstrip(".") for e, f in registered.items() if f == fmt}
            assert names <= set(formats.EXTENSIONS[fmt]), fmt
    assert set(formats.DEFAULT_EXTENSIONS) == {e for names in formats.EXTENSIONS.values() for e in names}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO"])
def test_a_file_without_an_extension_is_an_input_when_its_bytes_are_an_image(fmt, tmp_path):
    (tmp_path / "IMG_0001").write_bytes(_encoded(fmt))
    assert ImageFiles().wants(str(tmp_path / "IMG_0001"))
    assert formats.sniff(_encoded(fmt)) in formats.EXTENSIONS


def test_by_extension_case_insensitive_and_other_files_unopened(tmp_path, monkeypatch):
    opened = []
    real = files.open_read

    def open_read(path):
        opened.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(image_files.files, "open_read", open_read)  # what read_head opens locally
    for name, data in (("a.JPG", b"not even a jpeg"), ("notes.txt", _encoded("PNG")), ("Thumbs.db", b"x"),
                       ("README", b"plain text\n"), (".DS_Store", b"\x00\x00\x00\x01Bud1"), ("scan", _encoded("TIFF")),
                       ("EMPTY", b"")):
        (tmp_path / name).write_bytes(data)
    wanted = sorted(n for n in os.listdir(tmp_path) if ImageFiles().wants(str(tmp_path / n)))
    assert wanted == ["a.JPG", "scan"]
    assert sorted(opened) == [".DS_Store", "EMPTY", "README", "scan"]  # only names without an extension


def test_the_list_decides_for_files_without_an_extension_too(tmp_path):
    (tmp_path / "png_bytes").write_bytes(_encoded("PNG"))
    (tmp_path / "jpeg_bytes").write_bytes(_encoded("JPEG"))
    jpegs = ImageFiles(("jpg",))
    assert not jpegs.wants(str(tmp_path / "png_bytes")) and jpegs.wants(str(tmp_path / "jpeg_bytes"))
    assert not jpegs.wants(str(tmp_path / "b.png")) and jpegs.wants(str(tmp_path / "a.JPG"))
    every = ImageFiles(None)
    assert every.by_name(str(tmp_path / "notes.txt")) is True and every.wants(str(tmp_path / "README"))


def test_a_file_without_an_extension_that_cannot_be_read_is_an_input(tmp_path):
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    os.mkfifo(tmp_path / "pipe")  # never waits for a writer
    assert ImageFiles().wants(str(tmp_path / "dangling"))
    assert ImageFiles().wants(str(tmp_path / "pipe"))
