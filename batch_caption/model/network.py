"""The captioning network a `ModelConfig` names: Show and Tell, or Show, Attend and Tell.

Both share one interface: `encode`, `initial_state`, `step` (the beam search's callback),
`call` (teacher forcing), `build_all`, `backbone`, `feature_size`, `config`.
"""

from __future__ import annotations

from typing import Union

from batch_caption.model.attend_and_tell import AttendAndTell
from batch_caption.model.config import ModelConfig
from batch_caption.model.show_and_tell import ShowAndTell

CaptionModel = Union[ShowAndTell, AttendAndTell]


def build_model(config: ModelConfig, initial_encoder_weights: bool = True) -> CaptionModel:
    """The network of `config.decoder`, its layers not yet built (see `build_all`)."""
    network = AttendAndTell if config.decoder == "attention" else ShowAndTell
    return network(config, initial_encoder_weights=initial_encoder_weights)
