"""Captioner: a uint8 image batch in, n-best captions out, in one graph call.

The encoder, the image embedding and the whole beam search run inside one
`tf.function` with a fixed signature [None, S, S, 3] uint8, traced once per Captioner
(any batch size reuses that trace).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from batch_caption.model import vocab as V
from batch_caption.model.beam_search import BeamSearchResult, beam_search
from batch_caption.model.config import DecodeConfig
from batch_caption.model.network import CaptionModel


@dataclasses.dataclass(frozen=True)
class Caption:
    """One caption hypothesis: text, ids (end token excluded), log-prob and score;
    `truncated` when the search cut it at max_length before it emitted the end token."""

    text: str
    tokens: tuple[int, ...]
    logprob: float
    score: float
    truncated: bool = False


def search_features(model: CaptionModel, features, decode: DecodeConfig) -> BeamSearchResult:
    """The beam search `decode` asks for, from image features [B, F] (graph code).

    The one place decode settings become beam_search arguments: the Captioner runs it
    after its encoder, training's sample captions on a features dataset run it alone.
    """
    return beam_search(
        model.step,
        model.initial_state(features),
        start_id=V.START_ID,
        end_id=V.END_ID,
        pad_id=V.PAD_ID,
        beam_size=decode.beam_size,
        max_length=decode.max_length,
        num_results=decode.num_alternatives,
        alpha=decode.length_normalization,
        min_words=1,  # an empty caption is never an answer
    )


class Captioner:
    """Captions batches of images with a trained captioning model (`network.build_model`).

    Args:
      model: a built model with trained weights.
      vocabulary: the model's `Vocabulary`.
      decode: search settings.
      model_id: the bundle id, carried into every record.
    """

    def __init__(self, model: CaptionModel, vocabulary: V.Vocabulary, decode: DecodeConfig | None = None, model_id: str = ""):
        self.model = model
        self.vocabulary = vocabulary
        self.decode = decode or DecodeConfig()
        self.model_id = model_id
        size = model.config.image_size
        # The batch axis is None: any batch size runs the one trace. No autograph: the
        # graph code has no Python control flow on tensors (beam search calls
        # tf.while_loop itself), so converting it would only add tracing work.
        self._search = tf.function(
            self._search_graph,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            autograph=False,
        )

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def get_model_id(self) -> str:
        """The bundle id (a method, so it also works through Beam's cross-process proxy)."""
        return self.model_id

    def with_decode(self, decode: DecodeConfig) -> "Captioner":
        """A Captioner sharing this one's model, with other search settings."""
        return Captioner(self.model, self.vocabulary, decode, self.model_id)

    def warm_up(self) -> None:
        """Traces the graph and runs it once on one blank image, so that the first real
        batch pays no one-time cost (the job's model handler calls this while loading)."""
        s = self.image_size
        self._search(np.zeros([1, s, s, 3], np.uint8))

    def _search_graph(self, images) -> BeamSearchResult:
        return search_features(self.model, self.model.encode(images), self.decode)

    def search(self, images: np.ndarray) -> BeamSearchResult:
        """uint8 [B, S, S, 3] -> BeamSearchResult of numpy arrays (see beam_search)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 images [B, {self.image_size}, {self.image_size}, 3], got {images.dtype} {images.shape}"
            )
        return BeamSearchResult(*(t.numpy() for t in self._search(images)))

    def caption(self, images: np.ndarray) -> list[list[Caption]]:
        """uint8 [B, S, S, 3] -> for each image its n-best captions, best first."""
        return self.to_captions(self.search(images))

    def to_captions(self, result: BeamSearchResult) -> list[list[Caption]]:
        out = []
        for toks, lens, logps, scores in zip(result.tokens, result.lengths, result.logprobs, result.scores):
            row = []
            for seq, n, lp, sc in zip(toks, lens, logps, scores):
                if not np.isfinite(sc):  # fewer finished hypotheses than asked for
                    continue
                ids = tuple(int(i) for i in seq[:n] if i != V.END_ID)
                cut = len(ids) == n  # no end token among its n tokens
                row.append(Caption(self.vocabulary.decode(ids), ids, float(lp), float(sc), cut))
            out.append(row)
        return out
