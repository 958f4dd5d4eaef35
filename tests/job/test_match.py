"""MatchImages: patterns and list files to distinct SourceFiles, empty matches to errors."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

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
