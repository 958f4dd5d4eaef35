"""The prepared-dataset format shared by `prepare` (writer) and `train` (reader).

A prepared dataset is a directory:

    dataset.json                      DatasetInfo (below), written last
    vocab.json                        the Vocabulary
    references_<split>.json           COCO-format captions of the split (for evaluate)
    <split>-SSSSS-of-NNNNN.tfrecord   tf.train.Example records, one per image

Each record holds one image and all its captions:

    image_id         int64 [1]
    path             bytes [1]    where the image came from
    image            bytes [1]    PNG of the decoded uint8 [S, S, 3] pixels   (mode "images")
    features         float [F]    pooled CNN features                         (mode "features")
    caption_tokens   int64 [sum of lengths]  every caption's ids, concatenated
                                  (no <start>/<end>, each cut to max_length)
    caption_lengths  int64 [n_captions]

Images are stored decoded-and-resized (by `images.decoding.decode_image`, the job's own decode),
so training sees exactly the pixels the job will feed the model.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

DATASET_FORMAT = "batch_caption.dataset/1"
INFO_NAME = "dataset.json"
VOCAB_NAME = "vocab.json"
MODES = ("images", "features")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset holds.

    mode: "images" (PNG pixels, for end-to-end training) or "features" (pooled CNN
      features of `encoder`, for training the decoder alone).
    splits: split name -> {"files": [...], "images": int, "captions": int}.
    """

    mode: str
    image_size: int
    max_length: int
    vocab_size: int
    splits: dict[str, dict[str, Any]]
    encoder: str | None = None
    feature_size: int | None = None
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "features" and not (self.encoder and self.feature_size):
            raise ValueError("a features dataset needs encoder and feature_size")

    def to_json(self) -> str:
        return json.dumps({"format": DATASET_FORMAT, **dataclasses.asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetInfo":
        data = json.loads(text)
        if data.pop("format", None) != DATASET_FORMAT:
            raise ValueError(f"not a prepared dataset (expected format {DATASET_FORMAT})")
        return cls(**data)


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_example(
    image_id: int,
    path: str,
    captions: Sequence[Sequence[int]],
    *,
    pixels: np.ndarray | None = None,
    features: np.ndarray | None = None,
) -> bytes:
    """Serialises one image and its tokenised captions to a tf.train.Example."""
    import tensorflow as tf

    if (pixels is None) == (features is None):
        raise ValueError("give exactly one of pixels or features")
    feats = {
        "image_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(image_id)])),
        "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.encode("utf-8")])),
        "caption_tokens": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(t) for c in captions for t in c])),
        "caption_lengths": tf.train.Feature(int64_list=tf.train.Int64List(value=[len(c) for c in captions])),
    }
    if pixels is not None:
        feats["image"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode_png(pixels)]))
    else:
        feats["features"] = tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(features, np.float32).ravel()))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def parse_example(serialized, info: DatasetInfo) -> dict:
    """tf.data map function: one serialized record -> dict of tensors.

    Returns {"image_id": int64 [], "image": uint8 [S, S, 3] or "features": float32 [F],
             "captions": int64 RaggedTensor [n_captions, None]}.
    """
    import tensorflow as tf

    spec = {
        "image_id": tf.io.FixedLenFeature([], tf.int64),
        "caption_tokens": tf.io.VarLenFeature(tf.int64),
        "caption_lengths": tf.io.VarLenFeature(tf.int64),
    }
    if info.mode == "images":
        spec["image"] = tf.io.FixedLenFeature([], tf.string)
    else:
        spec["features"] = tf.io.FixedLenFeature([info.feature_size], tf.float32)
    ex = tf.io.parse_single_example(serialized, spec)
    out = {
        "image_id": ex["image_id"],
        "captions": tf.RaggedTensor.from_row_lengths(
            tf.sparse.to_dense(ex["caption_tokens"]), tf.sparse.to_dense(ex["caption_lengths"])
        ),
    }
    if info.mode == "images":
        s = info.image_size
        out["image"] = tf.ensure_shape(tf.io.decode_png(ex["image"], channels=3), [s, s, 3])
    else:
        out["features"] = ex["features"]
    return out
