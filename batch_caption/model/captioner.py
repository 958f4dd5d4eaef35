"""Captioner: a uint8 image batch in, n-best captions out, in one graph call.

The encoder, the image embedding and the whole beam search run inside one
`tf.function` with a fixed signature [None, S, S, 3] uint8, traced once per Captioner
(any batch size reuses that trace).
"""

from __future__ import annotations


import numpy as np
import tensorflow as tf

from batch_caption.model import vocab as V
from batch_caption.model.beam_search import BeamSearchResult, beam_search
from batch_caption.model.captions import AttentionMap, Caption, grid_of, to_captions  # noqa: F401  (re-exported)
from batch_caption.model.config import DECODERS, DecodeConfig
from batch_caption.model.network import CaptionModel


def search_features(model: CaptionModel, features, decode: DecodeConfig) -> BeamSearchResult:
    """The beam search `decode` asks for, from image features [B, F] (graph code).

    The one place decode settings become beam_search arguments: the Captioner runs it
    after its encoder, training's sample captions on a features dataset run it alone.
    """
    step = model.step
    if decode.forbid_unknown:
        no_unknown = tf.one_hot(V.UNK_ID, model.config.vocab_size, on_value=-float("inf"))

        def step(tokens, state):
            log_probs, state = model.step(tokens, state)
            return log_probs + no_unknown, state

    return beam_search(
        step,
        model.initial_state(features),
        start_id=V.START_ID,
        end_id=V.END_ID,
        pad_id=V.PAD_ID,
        beam_size=decode.beam_size,
        max_length=decode.max_length,
        num_results=decode.num_alternatives,
        alpha=decode.length_normalization,
        min_words=1,  # an empty caption is never an answer
        shared=getattr(model, "shared_state", None),
        no_repeat_ngram=decode.no_repeat_ngram,
    )


class Captioner:
    """Captions batches of images with a trained captioning model (`network.build_model`).

    Args:
      model: a built model with trained weights.
      vocabulary: the model's `Vocabulary`.
      decode: search settings.
      model_id: the bundle id, carried into every record.
      attention_maps: also return the best caption's attention maps (`Caption.attention`);
        the model's decoder must have them (`DecoderSpec.attention_maps`). They are computed in the same graph
        call, by teacher-forcing the found caption through the decoder once more.
    """

    def __init__(self, model: CaptionModel, vocabulary: V.Vocabulary, decode: DecodeConfig | None = None, model_id: str = "",
                 attention_maps: bool = False):
        if attention_maps and not DECODERS[model.config.decoder].attention_maps:
            raise ValueError(f"attention maps need a model with the {DECODERS.which(lambda d: d.attention_maps)} "
                             f"decoder, not {model.config.decoder}")
        self.model = model
        self.vocabulary = vocabulary
        self.decode = decode or DecodeConfig()
        self.model_id = model_id
        self.attention_maps = attention_maps
        self._grid = grid_of(getattr(model, "cells", 1))
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
        return Captioner(self.model, self.vocabulary, decode, self.model_id, self.attention_maps)

    def warm_up(self) -> None:
        """Traces the graph and runs it once on one blank image, so that the first real
        batch pays no one-time cost (the job's model handler calls this while loading)."""
        s = self.image_size
        self._search(np.zeros([1, s, s, 3], np.uint8))

    def _search_graph(self, images):
        """-> (BeamSearchResult, the best captions' attention maps [B, max_length, cells] or ())."""
        features = self.model.encode(images)
        result = search_features(self.model, features, self.decode)
        if not self.attention_maps:
            return result, ()
        return result, self.model.attention_maps(features, result.tokens[:, 0])

    def _run(self, images: np.ndarray):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 images [B, {self.image_size}, {self.image_size}, 3], got {images.dtype} {images.shape}"
            )
        result, maps = self._search(images)
        return BeamSearchResult(*(t.numpy() for t in result)), (maps.numpy() if self.attention_maps else None)

    def search(self, images: np.ndarray) -> BeamSearchResult:
        """uint8 [B, S, S, 3] -> BeamSearchResult of numpy arrays (see beam_search)."""
        return self._run(images)[0]

    def caption(self, images: np.ndarray) -> list[list[Caption]]:
        """uint8 [B, S, S, 3] -> for each image its n-best captions, best first."""
        return self.to_captions(*self._run(images))

    def to_captions(self, result: BeamSearchResult, maps: np.ndarray | None = None) -> list[list[Caption]]:
        """Search results (and the best captions' attention maps [B, T, cells]) -> Captions."""
        return to_captions(result, self.vocabulary, self._grid, maps)
