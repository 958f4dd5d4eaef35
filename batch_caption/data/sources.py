"""Caption dataset readers: annotation files -> one `CaptionedImage` per listed image.

Plain Python (no pipeline), so each reader is tested on small files; `prepare` runs
them inside its Beam job. Files are opened with Beam's FileSystems: local paths, gs://
and any other registered scheme work, and a `.gz` suffix is decompressed.

    coco       captions_<split>.json   {"images": [{id, file_name}], "annotations": [{image_id, caption}]}
    karpathy   dataset_<name>.json     {"images": [{filepath?, filename, split, sentences: [{raw}], cocoid | imgid}]}
    flickr8k   Flickr8k.token.txt      "<name>.jpg#<k>\\t<caption>" lines, plus one image-name list per split

Every reader yields, in file order:
  * `CaptionedImage(image_id, path, split, captions)` for every image it can place in a
    split, even one with no caption (the pipeline turns that into an error record), and
  * `SourceProblem(path, split, error, message)` for anything it cannot place: a caption
    of an image the file does not list, an image listed twice, a malformed line.
A file that cannot be read, or is not the expected format at all, raises `SourceError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any, Union

from batch_caption.storage import files

# Karpathy's splits; "restval" (the COCO val2014 images outside his 5k val / 5k test)
# is normally trained on.
KARPATHY_SPLITS = ("train", "val", "test")
FLICKR8K_SPLITS = ("train", "val", "test")
# The split lists shipped in Flickr8k_text/, next to Flickr8k.token.txt.
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


class SourceError(ValueError):
    """An annotation file is unreadable or not in the expected format."""


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One image of a split and its raw reference captions (possibly none)."""

    image_id: int
    path: str
    split: str
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SourceProblem:
    """Something in the annotations that names no usable image.

    path: the image path when known, else "<annotation file>#<where>".
    split: the split it was meant for, or None when no split lists it.
    error: a CamelCase reason (UnknownImage, DuplicateImage, NotInSplit, MalformedLine,
      MalformedCaption); message: a sentence.
    """

    path: str
    split: str | None
    error: str
    message: str


Item = Union[CaptionedImage, SourceProblem]


def _read_text(path: str) -> str:
    # Not files.read_text: annotation files may be compressed, and FileSystems.open
    # decompresses by suffix where files reads the bytes as they are.
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as f:  # compression from the suffix (.gz, .bz2)
            return f.read().decode("utf-8-sig")  # Beam's CompressedFile is no io object to wrap
    except Exception as e:  # BeamIOError, OSError, UnicodeDecodeError: all unreadable
        raise SourceError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _read_json(path: str, what: str) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path} is not {what}: {e}") from e


def _caption_or_problem(value: Any, path: str, split: str | None) -> str | SourceProblem:
    if isinstance(value, str):
        return value
    return SourceProblem(path, split, "MalformedCaption", f"caption is {type(value).__name__}, not text: {value!r:.80}")


# --- COCO ------------------------------------------------------------------------------


def read_coco(captions_file: str, split: str, image_root: str) -> Iterator[Item]:
    """COCO captions JSON of one split -> its images (image_root/file_name).

    Images come in file order, each with its annotations' captions in file order.
    """
    data = _read_json(captions_file, "COCO captions JSON")
    try:
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        annotations = list(data["annotations"])
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(
            f"{captions_file} is not COCO captions JSON (images[id, file_name], annotations[image_id, caption]): "
            f"{type(e).__name__}: {e}"
        ) from e
    captions: dict[int, list[str]] = {}
    paths: dict[int, str] = {}
    seen_paths: set[str] = set()
    for image_id, file_name in images:
        path = files.join(image_root, file_name)
        if image_id in paths or path in seen_paths:
            what = f"image id {image_id}" if image_id in paths else f"file {file_name}"
            yield SourceProblem(path, split, "DuplicateImage", f"{captions_file} lists {what} more than once")
            continue
        paths[image_id] = path
        seen_paths.add(path)
        captions[image_id] = []
    for index, ann in enumerate(annotations):
        where = f"{captions_file}#annotation={ann.get('id', index) if isinstance(ann, dict) else index}"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            yield SourceProblem(where, split, "MalformedCaption", "annotation lacks image_id or caption")
            continue
        try:
            image_id = int(ann["image_id"])
        except (TypeError, ValueError):
            image_id = None
        if image_id not in captions:
            yield SourceProblem(
                where, split, "UnknownImage", f"caption of image_id {ann['image_id']!r}, which {captions_file} does not list"
            )
            continue
        caption = _caption_or_problem(ann["caption"], paths[image_id], split)
        if isinstance(caption, SourceProblem):
            yield caption
        else:
            captions[image_id].append(caption)
    for image_id, path in paths.items():
        yield CaptionedImage(image_id, path, split, tuple(captions[image_id]))


# --- Karpathy --------------------------------------------------------------------------


def read_karpathy(
    dataset_file: str,
    image_root: str,
    splits: Collection[str] | None = None,
    restval: str | None = "train",
) -> Iterator[Item]:
    """Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, ...) -> images.

    Args:
      image_root: images are image_root/filepath/filename (filepath only in COCO's file).
      splits: the splits to yield (default all); images of other splits are skipped.
      restval: the split "restval" images join ("train" by default), or None to skip them.
    Image ids are `cocoid` when present (COCO), else `imgid`.
    """
    data = _read_json(dataset_file, "a Karpathy split JSON")
    try:
        entries = list(data["images"])
    except (KeyError, TypeError) as e:
        raise SourceError(f"{dataset_file} is not a Karpathy split JSON (no 'images' list): {e}") from e
    wanted = set(splits) if splits is not None else set(KARPATHY_SPLITS)
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            name = os.path.join(entry["filepath"], entry["filename"]) if entry.get("filepath") else entry["filename"]
            image_id = int(entry["cocoid"] if "cocoid" in entry else entry["imgid"])
            split = str(entry["split"])
            sentences = list(entry.get("sentences", []))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SourceError(
                f"{dataset_file}: images[{index}] is not a Karpathy entry (filename, split, imgid|cocoid, sentences): "
                f"{type(e).__name__}: {e}"
            ) from e
        path = files.join(image_root, name)
        if split == "restval":
            split = restval
            if split is None:
                continue
        elif split not in KARPATHY_SPLITS:
            yield SourceProblem(path, None, "UnknownSplit", f"{dataset_file} puts this image in unknown split {split!r}")
            continue
        if split not in wanted:
            continue
        if path in seen:
            yield SourceProblem(path, split, "DuplicateImage", f"{dataset_file} lists this image more than once")
            continue
        seen.add(path)
        captions = []
        for sentence in sentences:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            caption = _caption_or_problem(raw, path, split)
            if isinstance(caption, SourceProblem):
                yield caption
            else:
                captions.append(caption)
        yield CaptionedImage(image_id, path, split, tuple(captions))


# --- Flickr8k --------------------------------------------------------------------------


def read_flickr8k(
    token_file: str,
    split_files: Mapping[str, str],
    image_dir: str,
    splits: Collection[str] | None = None,
) -> Iterator[Item]:
    """Flickr8k.token.txt + per-split image lists -> images (image_dir/name).

    Args:
      split_files: split name -> text file of image names, one a line. Together they
        decide which images belong where; an image of the token file that none lists is
        a NotInSplit problem (the official lists leave out a few).
      splits: the splits to yield (default: every key of split_files).
    Image ids are 1-based positions in the sorted list of every image name seen in the
    token file and the split lists, so they do not depend on which splits are yielded.
    Images come in split-list order, captions in token-file order.
    """
    captions: dict[str, list[str]] = {}
    problems: list[SourceProblem] = []
    for lineno, line in enumerate(_read_text(token_file).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, _ = key.strip().rpartition("#")
        if not tab or not hash_ or not name:
            message = f"not '<image>#<k><TAB><caption>': {line!r:.80}"
            problems.append(SourceProblem(f"{token_file}:{lineno}", None, "MalformedLine", message))
            continue
        captions.setdefault(name, []).append(caption.strip())
    members: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, list_file in split_files.items():
        names = []
        for name in (n.strip() for n in _read_text(list_file).splitlines()):
            if not name:
                continue
            if name in owner:
                problems.append(
                    SourceProblem(
                        files.join(image_dir, name), split, "DuplicateImage",
                        f"image listed in split {owner[name]!r} and again in {list_file}",
                    )
                )
                continue
            owner[name] = split
            names.append(name)
        members[split] = names
    ids = {name: i for i, name in enumerate(sorted(set(captions) | set(owner)), 1)}
    yield from problems
    for name in captions:
        if name not in owner:
            yield SourceProblem(
                files.join(image_dir, name), None, "NotInSplit",
                f"{len(captions[name])} caption(s) in {token_file}, but no split list names the image",
            )
    wanted = set(splits) if splits is not None else set(split_files)
    for split, names in members.items():
        if split not in wanted:
            continue
        for name in names:
            yield CaptionedImage(ids[name], files.join(image_dir, name), split, tuple(captions.get(name, ())))
