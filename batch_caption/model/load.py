"""A trained model from a bundle: the network, and a Captioner over it.

`model.bundle` reads and verifies the files; this module rebuilds the architecture from
the config and loads the weights into it (no network: the backbone's initial weights are
never fetched, the bundle carries trained ones for the whole model).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from batch_caption.model.bundle import WEIGHTS, BundleError, read_bundle
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig, ModelConfig
from batch_caption.model.network import CaptionModel, build_model
from batch_caption.model.vocab import Vocabulary
from batch_caption.storage import files


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the built model with its weights, and what came with it."""

    model: CaptionModel
    vocabulary: Vocabulary
    config: ModelConfig
    bundle_id: str
    path: str
    decode: DecodeConfig | None = None  # the bundle's search defaults (decode.json)


def load_bundle(path: str) -> Bundle:
    """Reads, verifies and builds the model of the bundle at `path`. Raises BundleError."""
    contents = read_bundle(path)
    model = build_model(contents.config, initial_encoder_weights=False)
    model.build_all()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        files.write_bytes(local, contents.weights)
        try:
            model.load_weights(local)
        except Exception as e:  # h5py / Keras raise many types for a mismatched file
            raise BundleError(f"model bundle file {files.join(path, WEIGHTS)} does not fit config.json: {e}") from e
    return Bundle(model, contents.vocabulary, contents.config, contents.bundle_id, path, contents.decode)


def load_captioner(path: str, decode: DecodeConfig | None = None, attention_maps: bool = False) -> Captioner:
    """A `Captioner` over the bundle at `path`, searching with `decode` (None: the bundle's
    search defaults, else DecodeConfig's), returning the best captions' attention maps when
    asked (attention decoder only)."""
    b = load_bundle(path)
    return Captioner(b.model, b.vocabulary, decode or b.decode, b.bundle_id, attention_maps)
