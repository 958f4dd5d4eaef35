"""Tests for batch_caption.data.sources: the annotation readers, on small files."""

from __future__ import annotations

import json

import pytest

from batch_caption.data.sources import (
    CaptionedImage,
    SourceError,
    SourceProblem,
    read_coco,
    read_flickr8k,
    read_karpathy,
)


def _write_coco(root, split, entries, extra_annotations=()):
    """entries: [(image_id, file_name, [captions])] -> root/captions_<split>.json."""
    data = {"images": [{"id": i, "file_name": n} for i, n, _ in entries],
            "annotations": [{"id": i * 100 + k, "image_id": i, "caption": c}
                            for i, _, cs in entries for k, c in enumerate(cs)] + list(extra_annotations)}
    path = root / f"captions_{split}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_karpathy_reader(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "cocoid": 42, "imgid": 0,
         "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}, {"raw": "Two cats"}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "restval", "cocoid": 43, "imgid": 1,
         "sentences": [{"raw": "A dog"}]},
        {"filename": "z.jpg", "split": "train", "imgid": 2, "sentences": [{"raw": None}, {"raw": "A bird"}]},
        {"filename": "w.jpg", "split": "holdout", "imgid": 3, "sentences": []},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    got = list(read_karpathy(str(path), "/img"))
    assert [g for g in got if isinstance(g, CaptionedImage)] == [
        CaptionedImage(42, "/img/val2014/x.jpg", "test", ("A cat.", "Two cats")),
        CaptionedImage(43, "/img/val2014/y.jpg", "train", ("A dog",)),
        CaptionedImage(2, "/img/z.jpg", "train", ("A bird",)),
    ]
    assert [(g.path, g.split, g.error) for g in got if isinstance(g, SourceProblem)] == [
        ("/img/z.jpg", "train", "MalformedCaption"), ("/img/w.jpg", None, "UnknownSplit")]
    only_test = [g for g in read_karpathy(str(path), "/img", splits=["test"], restval=None)
                 if isinstance(g, CaptionedImage)]
    assert [g.image_id for g in only_test] == [42]
    assert [g.split for g in read_karpathy(str(path), "/img", restval="val") if isinstance(g, CaptionedImage)] == [
        "test", "val", "train"]


def test_flickr8k_reader(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text(
        "1000_a.jpg#0\tA child in pink .\n1000_a.jpg#1\tA girl climbs\n"
        "2000_b.jpg#0\tTwo dogs\n\n"
        "3000_c.jpg#0\tNobody lists me\n"
        "garbage line without a tab\n"
    )
    (tmp_path / "train.txt").write_text("1000_a.jpg\n\n")
    (tmp_path / "dev.txt").write_text("2000_b.jpg\n")
    (tmp_path / "test.txt").write_text("4000_d.jpg\n1000_a.jpg\n")
    lists = {"train": str(tmp_path / "train.txt"), "val": str(tmp_path / "dev.txt"), "test": str(tmp_path / "test.txt")}
    got = list(read_flickr8k(str(tmp_path / "Flickr8k.token.txt"), lists, "/f8k"))
    assert [g for g in got if isinstance(g, CaptionedImage)] == [
        CaptionedImage(1, "/f8k/1000_a.jpg", "train", ("A child in pink .", "A girl climbs")),
        CaptionedImage(2, "/f8k/2000_b.jpg", "val", ("Two dogs",)),
        CaptionedImage(4, "/f8k/4000_d.jpg", "test", ()),  # listed, but no caption: the pipeline reports it
    ]
    assert sorted((g.path.rsplit("/", 1)[-1], g.split, g.error) for g in got if isinstance(g, SourceProblem)) == [
        ("1000_a.jpg", "test", "DuplicateImage"),
        ("3000_c.jpg", None, "NotInSplit"),
        ("Flickr8k.token.txt:6", None, "MalformedLine"),
    ]
    assert [g.split for g in read_flickr8k(str(tmp_path / "Flickr8k.token.txt"), lists, "/f8k", splits=["val"])
            if isinstance(g, CaptionedImage)] == ["val"]


def test_coco_reader_reports_duplicates_and_unknown_images(tmp_path):
    path = _write_coco(tmp_path, "val", [(1, "a.jpg", ["one"]), (1, "b.jpg", ["dup id"]), (2, "a.jpg", [])],
                       extra_annotations=[{"id": 5, "image_id": 9, "caption": "x"}, {"id": 6, "image_id": 1, "caption": 3}])
    got = list(read_coco(path, "val", "gs://bucket/coco"))
    # Annotations name image ids: those of the twice-listed id 1 go to its first image.
    assert [g for g in got if isinstance(g, CaptionedImage)] == [
        CaptionedImage(1, "gs://bucket/coco/a.jpg", "val", ("one", "dup id"))]
    assert sorted(g.error for g in got if isinstance(g, SourceProblem)) == [
        "DuplicateImage", "DuplicateImage", "MalformedCaption", "UnknownImage"]
    (tmp_path / "bad.json").write_text('{"images": 3}')
    with pytest.raises(SourceError, match="not COCO captions JSON"):
        list(read_coco(str(tmp_path / "bad.json"), "val", "/x"))


def test_compressed_files_are_read_and_bad_files_raise(tmp_path):
    import gzip

    entry = {"filename": "a.jpg", "split": "val", "imgid": 7, "sentences": [{"raw": "A cat"}]}
    with gzip.open(tmp_path / "dataset.json.gz", "wt") as f:
        json.dump({"images": [entry]}, f)
    assert list(read_karpathy(str(tmp_path / "dataset.json.gz"), "/img")) == [
        CaptionedImage(7, "/img/a.jpg", "val", ("A cat",))]
    with pytest.raises(SourceError, match="cannot read"):
        list(read_karpathy(str(tmp_path / "missing.json"), "/img"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SourceError, match="not a Karpathy split JSON"):
        list(read_karpathy(str(tmp_path / "list.json"), "/img"))
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(SourceError, match="is not a Karpathy split JSON"):
        list(read_karpathy(str(tmp_path / "broken.json"), "/img"))
