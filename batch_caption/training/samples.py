"""Sample captions for TensorBoard: the model in training, greedy and beam, on a few
validation images, next to their reference captions.

Captions come from the same search as the job's (`captioner.search_features`). A
features dataset holds no pixels, so there the search starts from the stored features.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from batch_caption.data.tfrecord import parse_example
from batch_caption.model.beam_search import BeamSearchResult
from batch_caption.model.captioner import Captioner, search_features
from batch_caption.model.config import DecodeConfig
from batch_caption.model.network import CaptionModel
from batch_caption.training.preflight import DatasetSpec


class SampleCaptions:
    """Captions of the first `count` records of `split`, read on the first `table()` call.

    Args:
      model: the model being trained (its current weights caption).
      spec: the dataset; key: its input, "images" or "features".
    """

    def __init__(self, model: CaptionModel, spec: DatasetSpec, split: str, count: int, key: str):
        self.model, self.spec, self.split, self.count, self.key = model, spec, split, count, key
        self._loaded = None

    def _load(self):
        """Inputs [n, ...], references and image ids of the samples; a Captioner and a search per decoder."""
        info = self.spec.info
        ds = tf.data.TFRecordDataset(list(self.spec.files[self.split])).take(self.count)
        xs, refs, ids = [], [], []
        for ex in ds.map(lambda s: parse_example(s, info)):
            xs.append(ex["image" if self.key == "images" else "features"].numpy())
            refs.append([self.spec.vocabulary.decode(c) for c in ex["captions"].to_list()])
            ids.append(int(ex["image_id"]))
        max_len = info.max_length + 1
        decoders = {"greedy": DecodeConfig(beam_size=1, max_length=max_len, num_alternatives=1),
                    "beam 3": DecodeConfig(beam_size=3, max_length=max_len, num_alternatives=1)}
        captioners = {name: Captioner(self.model, self.spec.vocabulary, d) for name, d in decoders.items()}
        if self.key == "features":
            searches = {name: self._features_search(d) for name, d in decoders.items()}
        else:
            searches = {name: c.search for name, c in captioners.items()}
        self._loaded = (np.stack(xs), refs, ids, captioners, searches)

    def _features_search(self, decode: DecodeConfig):
        """The Captioner's search minus its encoder: float32 features [B, F] -> BeamSearchResult."""
        model = self.model

        # A dynamic batch dimension, as in the Captioner: beam search's loop needs it.
        @tf.function(input_signature=[tf.TensorSpec([None, model.feature_size], tf.float32)])
        def search(features):
            return search_features(model, features, decode)

        return lambda x: BeamSearchResult(*(t.numpy() for t in search(tf.constant(x))))

    def table(self) -> tuple[str, str]:
        """A markdown table of sample captions (TensorBoard text), and the first one as a line."""
        if self._loaded is None:
            self._load()
        xs, refs, ids, captioners, searches = self._loaded
        columns = {name: [row[0].text if row else "" for row in captioners[name].to_captions(search(xs))]
                   for name, search in searches.items()}
        header = "| image | " + " | ".join(columns) + " | reference |\n|---|" + "---|" * (len(columns) + 1) + "\n"
        rows = [f"| {ids[i]} | " + " | ".join(c[i] for c in columns.values()) + f" | {refs[i][0] if refs[i] else ''} |"
                for i in range(len(ids))]
        first = ", ".join(f'{name} "{c[0]}"' for name, c in columns.items()) + f' (ref "{refs[0][0] if refs[0] else ""}")'
        return header + "\n".join(rows), first
