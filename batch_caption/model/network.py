"""The captioning network a `ModelConfig` names: its decoder's entry in `registry.DECODERS`
builds it (Show and Tell, Show, Attend and Tell, or any registered one)."""

from __future__ import annotations

from typing import Any, Protocol

from batch_caption.model.config import DECODERS, ModelConfig


class CaptionModel(Protocol):
    """What the beam search, the Captioner, the bundle and the trainer use of a network
    (a keras.Model). Images are uint8 [B, S, S, 3], features float32 [B, F]."""

    config: ModelConfig
    backbone: Any  # the keras.Model of `encoder.build_backbone`

    @property
    def feature_size(self) -> int:
        """F."""

    def encode(self, images, training=False):
        """images -> features [B, F]."""

    def initial_state(self, features):
        """features [B, F] -> the decoder state before <start>, a nest of [B, ...] tensors."""

    def step(self, tokens, state):
        """tokens int32 [N], state with N rows -> (log-probs float32 [N, vocab], state).

        A network may also have `shared_state`, a nest of bools shaped like the state:
        True marks an entry per image that `step` reads and returns unchanged; the beam
        search then keeps it at B rows while the rest has N = B * k (beam_search's
        `shared`), and `step` must accept both layouts."""

    def __call__(self, inputs, training=False):
        """{"tokens" int32 [B, T], "images" or "features"} -> logits [B, T, vocab] (teacher forcing)."""

    def build_all(self) -> None:
        """Creates every weight without running the network."""


def build_model(config: ModelConfig, initial_encoder_weights: bool = True) -> CaptionModel:
    """The network of `config.decoder`, its layers not yet built (see `build_all`)."""
    network = DECODERS[config.decoder].load_network()
    return network(config, initial_encoder_weights=initial_encoder_weights)
