"""The job's input, decode and resource flags, end to end: each one changes what the run writes."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from helpers import varied_images
from PIL import Image

from batch_caption import run


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three small PNGs, one 300x200 JPEG, and notes that are not an image."""
    root = tmp_path_factory.mktemp("flags") / "in"
    root.mkdir()
    for i, pixels in enumerate(varied_images(3, 64, seed=21)):
        Image.fromarray(pixels).save(root / f"{i}.png")
    Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(root / "wide.jpg", quality=90)
    (root / "notes.txt").write_text("taken in 2026\n")
    return str(root)


def _run(photos, bundle, out, *flags):
    manifest = run.run(["--input", photos, "--output", str(out), "--model", bundle, "--run_id", "r", *flags])
    run_dir = os.path.join(str(out), "run=r")
    records = {}
    for kind in ("captions", "errors"):
        records[kind] = [json.loads(line) for shard in sorted(glob.glob(os.path.join(run_dir, f"{kind}-*.jsonl")))
                         for line in open(shard, encoding="utf-8")]
    return manifest, records["captions"], records["errors"]


def test_max_caption_length_num_alternatives_and_length_normalization(photos, tiny_bundle, tmp_path):
    _, captions, _ = _run(photos, tiny_bundle, tmp_path, "--beam_size", "3", "--max_caption_length", "3",
                          "--num_alternatives", "1", "--length_normalization", "0")
    assert len(captions) == 4
    for r in captions:
        assert r["decode"] == {"beam_size": 3, "max_length": 3, "num_alternatives": 1, "length_normalization": 0.0}
        assert r["alternatives"] == []
        assert r["score"] == pytest.approx(r["logprob"])  # alpha 0: the raw log-prob
        assert len(r["caption"].split()) <= 3


def test_low_score_threshold_flags_every_caption_or_none(photos, tiny_bundle, tmp_path):
    _, high, _ = _run(photos, tiny_bundle, tmp_path / "high", "--low_score_threshold", "100")
    _, low, _ = _run(photos, tiny_bundle, tmp_path / "low", "--low_score_threshold", "-1000")
    assert all("low_score" in r["flags"] for r in high)
    assert not any("low_score" in r["flags"] for r in low)


def test_max_image_pixels_and_max_file_bytes_make_error_records(photos, tiny_bundle, tmp_path):
    size = os.path.getsize(os.path.join(photos, "wide.jpg"))
    manifest, captions, errors = _run(photos, tiny_bundle, tmp_path / "pixels", "--max_image_pixels", "50000")
    assert [(os.path.basename(e["path"]), e["stage"], e["error"]) for e in errors] == [
        ("wide.jpg", "decode", "ImageTooLargeError")]
    assert len(captions) == 3 and manifest["counts"]["failed"] == 1
    big = max(os.path.getsize(p) for p in glob.glob(os.path.join(photos, "*.png")))
    limit = min(size, big) - 1
    manifest, captions, errors = _run(photos, tiny_bundle, tmp_path / "bytes", "--max_file_bytes", str(limit))
    too_large = [e for e in errors if e["error"] == "FileTooLargeError"]
    assert too_large and all(e["stage"] == "read" and e["bytes"] > limit for e in too_large)
    assert len(captions) + len(errors) == 4


def test_extensions_and_all_files_choose_the_inputs(photos, tiny_bundle, tmp_path):
    manifest, captions, errors = _run(photos, tiny_bundle, tmp_path / "default")
    assert len(captions) == 4 and not errors and manifest["counts"]["skipped_not_image"] == 1
    assert run.summary(manifest).endswith(f"model {manifest['model']}; 1 non-image files skipped")
    manifest, captions, errors = _run(photos, tiny_bundle, tmp_path / "jpg", "--extensions", ".JPG,jpeg")
    assert [os.path.basename(r["path"]) for r in captions] == ["wide.jpg"] and not errors
    assert manifest["counts"]["skipped_not_image"] == 4 and manifest["options"]["extensions"] == ["jpg", "jpeg"]
    manifest, captions, errors = _run(photos, tiny_bundle, tmp_path / "all", "--all_files")
    assert len(captions) == 4
    assert [(os.path.basename(e["path"]), e["stage"]) for e in errors] == [("notes.txt", "decode")]
    assert manifest["counts"]["skipped_not_image"] == 0 and manifest["options"]["extensions"] is None
    assert run.summary(manifest).endswith(f"model {manifest['model']}")
