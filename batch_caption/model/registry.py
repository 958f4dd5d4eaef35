"""The encoders and decoders by name, and what each can do (no TensorFlow).

An entry declares a component's capabilities; the rest of the package asks an entry for a
capability and never compares a name. Builders are named as "module:attr" strings and
imported only when a network is built, so configs and flags validate before TensorFlow
loads.

    ENCODERS["efficientnet_lite0"].imagenet   -> False (its ImageNet weights are a file)
    DECODERS["attention"].features            -> "grid"

A new encoder or decoder is its module plus one `register` line: below for the package's
own, in the module that defines it otherwise (imported before a config names it; a Beam
worker that loads such a bundle must import it too).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

# Where a decoder can take the image (Tanti et al. 2018, "Where to put the image in an image
# caption generator"): "first" = Show and Tell's pre-inject, the image embedding is the
# LSTM's first input only; "every_step" = par-inject, it is concatenated to every word's
# embedding, so the LSTM can look at the image again while it lists the objects.
IMAGE_INPUTS = ("first", "every_step")

# ModelConfig fields that only some decoders use. A decoder's entry lists those it uses;
# the others must keep their default, and its config.json (so its bundle id) leaves them out.
DECODER_OPTIONS = ("attention_units", "deep_output")

# What a decoder reads of the backbone: "grid", features [B, cells * channels] that it
# reshapes to [B, cells, channels] (the backbone's `grid_shape`); "pooled", one vector [B, F].
FEATURES = ("grid", "pooled")

# A builder: "module:attr", imported when first used, or the callable itself.
Ref = Union[str, Callable[..., Any]]


def _resolve(ref: Ref) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A CNN backbone (`ModelConfig.encoder`).

    Attributes:
      name: what configs, flags and bundles call it.
      builder: `Ref` of (pixels float32 [B, S, S, 3] in [0, 255], imagenet: bool) -> its
        feature map [B, h, w, C], a Keras tensor; `imagenet`: start from ImageNet weights.
      imagenet: Keras downloads ImageNet weights for it (`encoder_weights="imagenet"`).
      grid_channels: C of a backbone whose map is average-pooled to `small_cnn_grid`²
        cells whatever the decoder (F = grid² * C; it takes the small_cnn_grid option).
        None: the map is kept as its h * w cells for a decoder that reads a grid, and
        averaged to one cell for a decoder that reads a pooled vector.
      weights_advice: what to give instead of "imagenet" when Keras has none.
    """

    name: str
    builder: Ref
    imagenet: bool = False
    grid_channels: int | None = None
    weights_advice: str = "give a .weights.h5 file or none"

    @property
    def takes_grid(self) -> bool:
        return self.grid_channels is not None

    def check_weights(self, weights: str | None) -> None:
        """Raises ValueError for encoder_weights "imagenet" when Keras has none for it."""
        if weights == "imagenet" and not self.imagenet:
            raise ValueError(f"{self.name} has no imagenet weights Keras can download; {self.weights_advice}")

    def load_builder(self) -> Callable[..., Any]:
        return _resolve(self.builder)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """A caption decoder (`ModelConfig.decoder`) and the network class that holds it.

    Attributes:
      name: what configs, flags and bundles call it.
      network: `Ref` of the network class: (ModelConfig, initial_encoder_weights: bool) ->
        a `network.CaptionModel`, its layers not yet built.
      features: what it reads of the backbone, one of `FEATURES`.
      attention_maps: its network also has `call_with_attention(inputs, training)` ->
        (logits [B, T, vocab], alpha [B, T, cells]) and `attention_maps(features, tokens
        [B, T])` -> alpha [B, T, cells]: the job's --attention_maps and training's
        doubly stochastic --attention_penalty need it.
      image_inputs: the `ModelConfig.image_input` values it takes, from `IMAGE_INPUTS`.
      options: the `DECODER_OPTIONS` it uses.
    """

    name: str
    network: Ref
    features: str
    attention_maps: bool = False
    image_inputs: tuple[str, ...] = ("first",)
    options: tuple[str, ...] = ()

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"decoder {self.name}: features must be one of {', '.join(FEATURES)}, "
                             f"got {self.features!r}")
        if self.attention_maps and self.features != "grid":
            raise ValueError(f"decoder {self.name}: attention maps need grid features")
        if not self.image_inputs or not set(self.image_inputs) <= set(IMAGE_INPUTS):
            raise ValueError(f"decoder {self.name}: image_inputs must be some of {', '.join(IMAGE_INPUTS)}")
        unknown = sorted(set(self.options) - set(DECODER_OPTIONS))
        if unknown:
            raise ValueError(f"decoder {self.name}: unknown options {', '.join(unknown)}; "
                             f"choose from {', '.join(DECODER_OPTIONS)}")

    def load_network(self) -> Callable[..., Any]:
        return _resolve(self.network)


class Registry(Mapping):
    """Specs by name, in registration order: a read-only mapping but for `register` and
    `unregister`. Iterating it gives the names, so it serves as a flag's choices."""

    def __init__(self, kind: str):
        self.kind = kind
        self._specs: dict[str, Any] = {}

    def __getitem__(self, name: str):
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._specs)})"

    def register(self, spec):
        """Adds `spec` under its name (ValueError if taken); returns it."""
        if spec.name in self._specs:
            raise ValueError(f"{self.kind} {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        del self._specs[name]

    def which(self, predicate: Callable[[Any], bool]) -> str:
        """The names whose spec satisfies `predicate`, as "a or b" (for messages)."""
        return " or ".join(name for name, spec in self._specs.items() if predicate(spec))


ENCODERS = Registry("encoder")
DECODERS = Registry("decoder")

ENCODERS.register(EncoderSpec("small_cnn", "batch_caption.model.encoder:small_cnn", grid_channels=128))
ENCODERS.register(EncoderSpec("mobilenet_v3_small", "batch_caption.model.encoder:mobilenet_v3_small", imagenet=True))
ENCODERS.register(EncoderSpec("mobilenet_v3_large", "batch_caption.model.encoder:mobilenet_v3_large", imagenet=True))
ENCODERS.register(EncoderSpec("efficientnet_b0", "batch_caption.model.encoder:efficientnet_b0", imagenet=True))
ENCODERS.register(EncoderSpec(
    "efficientnet_lite0", "batch_caption.model.encoder:efficientnet_lite0",
    weights_advice="convert them with python -m batch_caption.training.convert_lite0 and pass its path"))
ENCODERS.register(EncoderSpec("inception_v3", "batch_caption.model.encoder:inception_v3", imagenet=True))
ENCODERS.register(EncoderSpec("resnet50", "batch_caption.model.encoder:resnet50", imagenet=True))

# Show and Tell (Vinyals et al. 2015) takes the image as one vector; Show, Attend and Tell
# (Xu et al. 2015) looks at the encoder's grid of cells at every step, through additive
# attention, so it takes the image "first" only (its initial state).
DECODERS.register(DecoderSpec("show_and_tell", "batch_caption.model.show_and_tell:ShowAndTell", "pooled",
                              image_inputs=IMAGE_INPUTS))
DECODERS.register(DecoderSpec("attention", "batch_caption.model.attend_and_tell:AttendAndTell", "grid",
                              attention_maps=True, options=("attention_units", "deep_output")))
