"""MatchImages: patterns and list files to distinct SourceFiles, empty matches to errors."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from helpers import special_files, within

from batch_caption.job import ERRORS, MatchImages


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
