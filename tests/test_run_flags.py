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


def _old_lock(out, run_id: str, age_seconds: float) -> str:
    """A lock at OUT/_LOCK written by a run on another machine (no evidence that it died),
    modified `age_seconds` ago; returns its path."""
    from batch_caption.storage.lock import LOCK_NAME, Holder

    os.makedirs(str(out), exist_ok=True)
    path = os.path.join(str(out), LOCK_NAME)
    with open(path, "wb") as f:
        f.write(Holder(run_id, "lost-host", 1, 0.0, f"token-{run_id}").to_json())
    when = os.stat(path).st_mtime - age_seconds
    os.utime(path, (when, when))
    return path


def test_break_lock_takes_over_only_a_lock_older_than_the_age(photos, tiny_bundle, tmp_path):
    from batch_caption.cli import UsageError

    out = tmp_path / "out"
    path = _old_lock(out, "crashed", 2 * 3600)
    with pytest.raises(UsageError, match=r"another run writes there: .*_LOCK is held by run crashed on lost-host"):
        _run(photos, tiny_bundle, out)
    assert run.main(["--input", photos, "--output", str(out), "--model", tiny_bundle, "--run_id", "r"]) == 2
    held = open(path, "rb").read()
    with pytest.raises(UsageError, match="run crashed on lost-host"):  # 2 h old, not older than 3 h
        _run(photos, tiny_bundle, out, "--break_lock", "3h")
    assert open(path, "rb").read() == held  # a younger lock is left as it was
    assert not os.path.exists(os.path.join(str(out), "run=r", "manifest.json"))

    manifest, captions, errors = _run(photos, tiny_bundle, out, "--break_lock", "90m")
    assert manifest["counts"]["captioned"] == 4 and len(captions) == 4 and not errors
    assert json.loads(open(os.path.join(str(out), "run=r", "manifest.json")).read())["counts"] == manifest["counts"]
    assert open(os.path.join(str(out), "LATEST")).read().strip() == "r"
    assert not os.path.exists(path)  # broken, then taken and released by the run


@pytest.fixture(scope="module")
def other_bundle(tiny_model, tiny_vocab, tmp_path_factory):
    """A bundle of tiny_model's shape with other weights: another model id, same decode."""
    import keras

    from batch_caption.model.bundle import save_bundle
    from batch_caption.model.network import build_model

    keras.utils.set_random_seed(2)
    other = build_model(tiny_model.config)
    other.build_all()
    path = str(tmp_path_factory.mktemp("other") / "tiny_b")
    save_bundle(other, tiny_vocab, path)
    return path


def _catalog_rows(out, run_id: str) -> dict[str, dict]:
    import pyarrow.parquet as pq

    manifest = json.loads(open(os.path.join(str(out), f"run={run_id}", "manifest.json")).read())
    table = pq.read_table([os.path.join(str(out), f"run={run_id}", n) for n in manifest["files"]["catalog"]],
                          partitioning=None)
    return {os.path.basename(r["path"]): r for r in table.to_pylist()}


def test_incremental_any_model_carries_captions_of_another_model(photos, tiny_bundle, other_bundle, tmp_path):
    out = str(tmp_path / "out")
    base = ["--input", photos, "--output", out, "--incremental"]
    first = run.run(base + ["--model", tiny_bundle, "--run_id", "a"])
    model_a = first["model"]
    assert first["counts"]["captioned"] == 4
    rows_a = _catalog_rows(out, "a")
    assert {r["model"] for r in rows_a.values()} == {model_a}

    carried = run.run(base + ["--model", other_bundle, "--run_id", "b_any", "--incremental_any_model"])
    model_b = carried["model"]
    assert model_b != model_a
    c = carried["counts"]
    assert (c["read"], c["carried"], c["captioned"], c["skipped"]) == (0, 4, 0, 4)
    rows = _catalog_rows(out, "b_any")
    assert sorted(rows) == sorted(rows_a) == ["0.png", "1.png", "2.png", "wide.jpg"]
    for name, row in rows.items():  # carried as model A made them
        assert (row["model"], row["captioned_run"], row["caption"]) == (model_a, "a", rows_a[name]["caption"])

    again = run.run(base + ["--model", other_bundle, "--run_id", "b"])  # without the flag: all captioned again
    c = again["counts"]
    assert (c["read"], c["carried"], c["captioned"], c["skipped"]) == (4, 0, 4, 0)
    assert {(r["model"], r["captioned_run"]) for r in _catalog_rows(out, "b").values()} == {(model_b, "b")}
