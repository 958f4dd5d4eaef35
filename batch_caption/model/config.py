"""Frozen, validated configuration of the model and of caption decoding.

`ModelConfig` is saved in the bundle (`config.json`) and is everything needed, with the
vocabulary, to rebuild the network before loading its weights. `DecodeConfig` is chosen
per run (the job's flags) and recorded in every caption record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Encoder names accepted by `encoder.build_backbone` (kept here so configs validate
# without importing TensorFlow).
ENCODERS = (
    "small_cnn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_lite0",
    "inception_v3",
    "resnet50",
)

# Channels of small_cnn's last block: its features are small_cnn_grid² x this.
SMALL_CNN_CHANNELS = 128
# small_cnn's pooled grid side when nothing says otherwise, including a bundle, dataset or
# train_config.json that records no grid.
DEFAULT_SMALL_CNN_GRID = 4

FORMAT_VERSION = 1

# Where the decoder sees the image (Tanti et al. 2018, "Where to put the image in an image
# caption generator"): "first" = Show and Tell's pre-inject, the image embedding is the
# LSTM's first input only; "every_step" = par-inject, it is concatenated to every word's
# embedding, so the LSTM can look at the image again while it lists the objects.
IMAGE_INPUTS = ("first", "every_step")

# The decoder: "show_and_tell" (Vinyals et al. 2015) takes the image as one pooled vector;
# "attention" (Show, Attend and Tell, Xu et al. 2015) looks at the encoder's grid of cell
# features at every step, through additive attention.
DECODERS = ("show_and_tell", "attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a captioner: a CNN encoder and an LSTM decoder.

    Attributes:
      vocab_size: number of tokens including the 4 special ones.
      encoder: CNN backbone name, one of `ENCODERS`.
      image_size: side of the square uint8 RGB input, pixels.
      encoder_weights: None (random init), "imagenet" (Keras downloads them: needs
        network), or a local / FileSystems path to a backbone `.weights.h5` file.
        Only used when a model is first built for training; a bundle always carries
        its own trained weights.
      train_encoder: whether the backbone's weights are trainable (fine-tuning).
      small_cnn_grid: small_cnn only: the side of the grid its last feature map is
        average-pooled to, so F = grid * grid * 128. Pick the grid that the images' layout
        has (3 for the synthetic scenes, whose objects sit on a 3x3 grid: a 4x4 pool
        there averages halves of neighbouring objects into one cell). Pooling has no
        weights, so one trained backbone file loads at any grid.
      image_input: where the LSTM gets the image, one of `IMAGE_INPUTS`: "first" (Show and
        Tell) or "every_step" (the image embedding beside every word embedding: LSTM
        inputs of 2 * embedding_size).
      decoder: one of `DECODERS`. "attention" needs features that keep a grid: small_cnn's
        grid pool, or a Keras application's last feature map (not globally pooled).
      attention_units: attention only: size of the additive attention's hidden layer.
      deep_output: attention only: predict words from emb(previous word) + L_h h + L_z
        context, projected to the vocabulary (Xu et al. eq. 7), instead of from [h ;
        context] directly; far fewer weights when the context is wide.
      embedding_size: size of the image embedding and of the word embeddings.
      lstm_units: LSTM state size.
      dropout: dropout rate on the LSTM inputs and outputs during training.
      max_length: maximum caption length in tokens (without start/end) seen in training.
    """

    vocab_size: int
    encoder: str = "small_cnn"
    image_size: int = 96
    encoder_weights: str | None = None
    train_encoder: bool = True
    small_cnn_grid: int = DEFAULT_SMALL_CNN_GRID
    image_input: str = "first"
    decoder: str = "show_and_tell"
    attention_units: int = 256
    deep_output: bool = False
    embedding_size: int = 256
    lstm_units: int = 512
    dropout: float = 0.3
    max_length: int = 20

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size must be >= 5 (4 special tokens + a word), got {self.vocab_size}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        if not 1 <= self.small_cnn_grid <= 8:
            raise ValueError(f"small_cnn_grid must be in [1, 8], got {self.small_cnn_grid}")
        if self.encoder != "small_cnn" and self.small_cnn_grid != DEFAULT_SMALL_CNN_GRID:
            raise ValueError(f"small_cnn_grid only applies to small_cnn, not {self.encoder}")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input must be one of {', '.join(IMAGE_INPUTS)}, got {self.image_input!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.deep_output and self.decoder != "attention":
            raise ValueError("deep_output applies to the attention decoder only")
        if self.decoder == "attention" and self.image_input != "first":
            raise ValueError("image_input applies to the show_and_tell decoder only; attention looks at the image every step")
        for name in ("embedding_size", "lstm_units", "max_length", "attention_units"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.decoder == "show_and_tell":
            # Unused by this decoder: left out, so a Show-and-Tell config.json (and so its
            # bundle id) holds only what shapes its network.
            del data["decoder"], data["attention_units"]
        if not self.deep_output:
            del data["deep_output"]  # likewise: configs (and bundle ids) from before it stay as they were
        return {"format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported model config format_version {version!r} (this code reads {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How captions are searched for.

    Attributes:
      beam_size: hypotheses kept per image (k). k=1 is greedy decoding.
      max_length: maximum caption length in tokens, the end token included.
      num_alternatives: how many finished captions to return per image (n-best), <= k.
      length_normalization: alpha in score = logprob / length**alpha, where length
        counts the caption's tokens including the end token. 0 ranks by raw log-prob
        (favours short captions); 1 ranks by mean log-prob per token.
      forbid_unknown: never emit the <unk> token (words the vocabulary cut): the search
        takes the best known word there instead.
    """

    beam_size: int = 3
    max_length: int = 20
    num_alternatives: int = 3
    length_normalization: float = 0.7
    forbid_unknown: bool = False

    def __post_init__(self):
        if not 1 <= self.beam_size <= 64:
            raise ValueError(f"beam_size must be in [1, 64], got {self.beam_size}")
        if not 1 <= self.max_length <= 100:
            raise ValueError(f"max_length must be in [1, 100], got {self.max_length}")
        if not 1 <= self.num_alternatives <= self.beam_size:
            raise ValueError(
                f"num_alternatives must be in [1, beam_size={self.beam_size}], got {self.num_alternatives}"
            )
        if not 0.0 <= self.length_normalization <= 2.0:
            raise ValueError(f"length_normalization must be in [0, 2], got {self.length_normalization}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.forbid_unknown:
            # Left out when off: records and catalogs written before the option existed
            # keep matching these settings, so incremental runs do not re-caption them.
            del data["forbid_unknown"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecodeConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown decode settings: {', '.join(unknown)}")
        return cls(**data)

    def overridden(self, *, beam_size: int | None = None, max_length: int | None = None,
                   num_alternatives: int | None = None, length_normalization: float | None = None,
                   forbid_unknown: bool | None = None) -> "DecodeConfig":
        """These settings with each given (not None) one in its place: a run's flags over a
        model's defaults. The n-best, unless given, shrinks to fit a smaller beam."""
        beam = self.beam_size if beam_size is None else beam_size
        return DecodeConfig(
            beam_size=beam,
            max_length=self.max_length if max_length is None else max_length,
            num_alternatives=min(self.num_alternatives, beam) if num_alternatives is None else num_alternatives,
            length_normalization=self.length_normalization if length_normalization is None else length_normalization,
            forbid_unknown=self.forbid_unknown if forbid_unknown is None else forbid_unknown,
        )
