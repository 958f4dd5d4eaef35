"""MatchImages: patterns and list files to distinct SourceFiles, empty matches to errors."""

from __future__ import annotations

import io
import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from helpers import special_files, within

from batch_caption.pipeline import ERRORS, MatchImages


def test_match_images_dedupes_and_reports_empty_patterns(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a.png'}\n")
    with BeamTestPipeline() as p:
        out = p | MatchImages([str(tmp_path / "*.png"), str(tmp_path / "none-*.jpg")], [str(listing)], "r")
        paths = out["files"] | beam.Map(lambda f: (f.path, f.size))
        # a.png came from the glob and the list: one file, with the glob's metadata.
        assert_that(paths, equal_to([(str(tmp_path / "a.png"), 1), (str(tmp_path / "b.png"), 1)]), label="Paths")
        assert_that(out[ERRORS] | beam.Map(lambda r: (r["path"], r["stage"], r["error"])),
                    equal_to([(str(tmp_path / "none-*.jpg"), "match", "NoMatch")]), label="Errors")


def _match_errors(patterns, lists):
    with BeamTestPipeline() as p:
        out = p | MatchImages(patterns, lists, "r")
        assert_that(out["files"], equal_to([]), label="Files")
        return_errors = out[ERRORS] | beam.Map(lambda r: (r["path"], r["error"], r["message"]))
        assert_that(return_errors | beam.combiners.Count.Globally(), equal_to([len(EXPECTED_KINDS)]), label="Count")
        assert_that(return_errors | beam.Filter(lambda e: not any(
            e[0].endswith(name) and e[1] == "NotARegularFile" and kind in e[2] for name, kind in EXPECTED_KINDS.items())),
            equal_to([]), label="Errors")


EXPECTED_KINDS = {"fifo.png": "FIFO", "fifo_link.png": "FIFO", "zero_link.png": "character device",
                  "socket.png": "socket"}


def test_a_glob_never_passes_on_fifos_devices_or_sockets(tmp_path):
    special_files(tmp_path)
    within(60, _match_errors, [str(tmp_path / "*.png")], [])


def test_an_input_list_that_is_a_fifo_fails_the_run_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "list.txt")
    with pytest.raises(Exception, match="FIFO"):
        within(60, _match_errors, [], [str(tmp_path / "list.txt")])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _archive(root):
    """Images (one named in capitals, one without an extension) among the files beside
    them in an archive: notes, sidecars, system files, a FIFO named like either."""
    (root / "sub").mkdir(parents=True)
    written = {"a.png": _png(), "B.JPG": b"\xff\xd8\xff broken, but named as an image", "IMG_0001": _png(),
               "notes.txt": _png(), "Thumbs.db": b"x", ".DS_Store": b"\x00\x00\x00\x01Bud1", "README": b"text\n",
               "sub/c.png": _png(), "sub/c.xmp": b"<x:xmpmeta/>", "sub/c.json": b"{}"}
    for name, data in written.items():
        (root / name).write_bytes(data)
    os.mkfifo(root / "pipe.txt")  # skipped by its name, never opened
    os.mkfifo(root / "pipe")  # no extension: what it is stays an error record
    images = {"a.png", "B.JPG", "IMG_0001", "sub/c.png"}
    others = {"notes.txt", "Thumbs.db", ".DS_Store", "README", "sub/c.xmp", "sub/c.json", "pipe.txt"}
    return images, others


def _check(patterns, lists=(), files=(), skipped=(), errors=(), **kwargs):
    """Runs MatchImages; asserts its files' paths, its 'not_image' paths and its errors'
    (path, error) pairs."""
    with BeamTestPipeline() as p:
        out = p | MatchImages(patterns, list(lists), "r", **kwargs)
        assert_that(out["files"] | "Paths" >> beam.Map(lambda f: f.path), equal_to(sorted(files)), label="Files")
        assert_that(out["not_image"], equal_to(sorted(skipped)), label="NotImages")
        assert_that(out[ERRORS] | beam.Map(lambda r: (r["path"], r["error"])), equal_to(sorted(errors)), label="Errors")


@pytest.mark.parametrize("pattern", ["**", "*"])
def test_a_tree_or_a_glob_gives_its_image_files_and_skips_the_rest(tmp_path, pattern):
    images, others = _archive(tmp_path / "in")
    root = tmp_path / "in"
    if pattern == "*":  # one level: sub/ is not a file
        images, others = {n for n in images if "/" not in n}, {n for n in others if "/" not in n}
    within(60, _check, [os.path.join(str(root), pattern)], files=[str(root / n) for n in images],
           skipped=[str(root / n) for n in others], errors=[(str(root / "pipe"), "NotARegularFile")])


def test_extensions_choose_the_inputs_and_all_files_takes_every_file(tmp_path):
    from batch_caption.pipeline.image_files import ImageFiles

    images, others = _archive(tmp_path / "in")
    root = tmp_path / "in"
    tree = [os.path.join(str(root), "**")]
    within(60, _check, tree, files=[str(root / "B.JPG")], images=ImageFiles(("jpg",)),
           skipped=[str(root / n) for n in images | others if n != "B.JPG"],
           errors=[(str(root / "pipe"), "NotARegularFile")])
    within(60, _check, tree, files=[str(root / n) for n in images | others if n != "pipe.txt"], images=ImageFiles(None),
           errors=[(str(root / n), "NotARegularFile") for n in ("pipe", "pipe.txt")])


def test_files_named_one_by_one_are_inputs_whatever_their_names(tmp_path):
    _archive(tmp_path / "in")
    root = tmp_path / "in"
    (tmp_path / "list.txt").write_text(f"{root / 'README'}\n{root / 'sub' / 'c.json'}\n")
    within(60, _check, [str(root / "notes.txt")], [str(tmp_path / "list.txt")],
           files=[str(root / "notes.txt"), str(root / "README"), str(root / "sub" / "c.json")])


def test_a_bucket_prefix_gives_its_image_objects_and_skips_the_rest(gcs_emulator):
    from batch_caption.storage import gcs

    bucket = gcs.client().bucket(gcs_emulator)
    objects = {"filtered/a.PNG": _png(), "filtered/x/IMG_0002": _png(), "filtered/x/notes.txt": b"n",
               "filtered/README": b"text", "filtered/x/y/meta.xmp": b"<x/>", "filtered/x/y/b.jpg": b"\xff\xd8\xff",
               "filtered/x/y/EMPTY": b""}
    for name, data in objects.items():
        bucket.blob(name).upload_from_string(data)
    top = f"gs://{gcs_emulator}/"
    images = {"filtered/a.PNG", "filtered/x/IMG_0002", "filtered/x/y/b.jpg"}
    _check([f"{top}filtered/**"], files=[top + n for n in images],  # a tree, listed in pieces
           skipped=[top + n for n in objects if n not in images])
    _check([f"{top}filtered/x/*"], files=[f"{top}filtered/x/IMG_0002"], skipped=[f"{top}filtered/x/notes.txt"])
