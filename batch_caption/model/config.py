"""Frozen, validated configuration of the model and of caption decoding.

`ModelConfig` is saved in the bundle (`config.json`) and is everything needed, with the
vocabulary, to rebuild the network before loading its weights. `DecodeConfig` is chosen
per run (the job's flags) and recorded in every caption record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batch_caption.cli import flag_names, option

# ENCODERS and DECODERS map each name to what it can do; iterated, they give the names
# (the flags' choices). IMAGE_INPUTS: where a decoder can take the image.
from batch_caption.model.registry import DECODERS, ENCODERS, IMAGE_INPUTS  # noqa: F401  (re-exported)
from batch_caption.model.registry import DECODER_OPTIONS

DEFAULT_ENCODER = "small_cnn"
DEFAULT_DECODER = "show_and_tell"

# small_cnn's pooled grid side when nothing says otherwise, including a bundle, dataset or
# train_config.json that records no grid.
DEFAULT_SMALL_CNN_GRID = 4

FORMAT_VERSION = 1
_MIN_VOCAB_SIZE = 5  # the 4 special tokens and a word

# Fields left out of config.json at their default: configs (and bundle ids) written before
# they existed stay as they were.
_OMITTED_AT_DEFAULT = ("decoder", "deep_output")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a captioner: a CNN encoder and an LSTM decoder. Each field made by
    `option` is a flag of `python -m batch_caption.train`, with its help.

    Attributes:
      vocab_size: number of tokens including the 4 special ones.
      encoder: CNN backbone name, one of `ENCODERS` (what each can do: `registry.EncoderSpec`).
      image_size: side of the square uint8 RGB input, pixels.
      encoder_weights: None (random init), "imagenet" (Keras downloads them: needs
        network; encoders whose entry has `imagenet`), or a local / FileSystems path to a
        backbone `.weights.h5` file. Only used when a model is first built for training;
        a bundle always carries its own trained weights.
      train_encoder: whether the backbone's weights are trainable (fine-tuning).
      small_cnn_grid: encoders that take the grid (small_cnn) only: the side of the grid
        their last feature map is average-pooled to, so F = grid * grid * 128 (their
        `grid_channels`). Pick the grid that the images' layout has (3 for the synthetic
        scenes, whose objects sit on a 3x3 grid: a 4x4 pool there averages halves of
        neighbouring objects into one cell). Pooling has no weights, so one trained
        backbone file loads at any grid.
      image_input: where the LSTM gets the image, one of the decoder's `image_inputs`:
        "first" (Show and Tell) or "every_step" (the image embedding beside every word
        embedding: LSTM inputs of 2 * embedding_size).
      decoder: one of `DECODERS` (what each can do: `registry.DecoderSpec`). One that
        reads a grid gets small_cnn's grid pool or an application's last feature map (not
        globally pooled); one that reads a pooled vector, small_cnn's grid pool flattened
        or an application's global average.
      attention_units: decoders with this option (attention): size of the additive
        attention's hidden layer.
      deep_output: decoders with this option (attention): predict words from
        emb(previous word) + L_h h + L_z context, projected to the vocabulary (Xu et al.
        eq. 7), instead of from [h ; context] directly; far fewer weights when the
        context is wide.
      embedding_size: size of the image embedding and of the word embeddings.
      lstm_units: LSTM state size.
      dropout: dropout rate on the LSTM inputs and outputs during training.
      max_length: maximum caption length in tokens (without start/end) seen in training.
    """

    vocab_size: int
    encoder: str = option(DEFAULT_ENCODER, choices=ENCODERS, help="CNN backbone")
    image_size: int = option(96, help="input size in pixels")
    encoder_weights: str | None = option(None, help="backbone initialisation: 'imagenet' (downloads), or a .weights.h5 "
                                         "file", default_help="default: random")
    train_encoder: bool = option(True, help="train the CNN too")
    small_cnn_grid: int = option(DEFAULT_SMALL_CNN_GRID, help="small_cnn: side of the grid its features are pooled to, "
                                 "F = grid*grid*128; 3 matches the synthetic scenes' 3x3 layout")
    image_input: str = option("first", choices=IMAGE_INPUTS, help="where the LSTM sees the image: first (Show and "
                              "Tell: its first input) or every_step (beside every word)")
    decoder: str = option(DEFAULT_DECODER, choices=DECODERS, help="show_and_tell (the image as one pooled vector) or "
                          "attention (Show, Attend and Tell: soft attention over the encoder's grid cells at every step)")
    attention_units: int = option(256, help="attention decoder: hidden size of the additive attention")
    deep_output: bool = option(False, negatable=True, help="attention decoder: predict words from emb(previous word) + "
                               "L_h h + L_z context (Xu et al. eq. 7) rather than from [h ; context]")
    embedding_size: int = option(256, help="size of the image and word embeddings")
    lstm_units: int = option(512, help="LSTM state size")
    dropout: float = option(0.3, help="dropout rate on the LSTM inputs and outputs in training")
    max_length: int = 20

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        encoder = ENCODERS[self.encoder]
        if self.vocab_size < _MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {_MIN_VOCAB_SIZE} (4 special tokens + a word), got {self.vocab_size}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [32, 1024], got {self.image_size}")
        if not 1 <= self.small_cnn_grid <= 8:
            raise ValueError(f"small_cnn_grid must be in [1, 8], got {self.small_cnn_grid}")
        if not encoder.takes_grid and self.small_cnn_grid != DEFAULT_SMALL_CNN_GRID:
            raise ValueError(f"small_cnn_grid only applies to {ENCODERS.which(lambda e: e.takes_grid)}, "
                             f"not {self.encoder}")
        encoder.check_weights(self.encoder_weights)
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input must be one of {', '.join(IMAGE_INPUTS)}, got {self.image_input!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        decoder = DECODERS[self.decoder]
        if self.image_input not in decoder.image_inputs:
            takers = DECODERS.which(lambda d: self.image_input in d.image_inputs)
            raise ValueError(f"image_input applies to the {takers} decoder only; "
                             f"{self.decoder} takes image_input {' or '.join(decoder.image_inputs)}")
        for name in DECODER_OPTIONS:
            if name not in decoder.options and getattr(self, name) != _DEFAULTS[name]:
                raise ValueError(f"{name} applies to the {DECODERS.which(lambda d: name in d.options)} decoder only")
        for name in ("embedding_size", "lstm_units", "max_length", "attention_units"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """config.json's content: what shapes this network. The decoder options that its
        decoder does not use are left out, and so are `_OMITTED_AT_DEFAULT` at their default."""
        data = dataclasses.asdict(self)
        for name in DECODER_OPTIONS:
            if name not in DECODERS[self.decoder].options:
                del data[name]
        for name in _OMITTED_AT_DEFAULT:
            if name in data and data[name] == _DEFAULTS[name]:
                del data[name]
        return {"format_version": FORMAT_VERSION, **data}

    @classmethod
    def without_vocabulary(cls, **fields: Any) -> "ModelConfig":
        """A config made before its vocabulary is known (prepare's backbone, a training
        run's options): the smallest vocabulary stands in for it."""
        return cls(vocab_size=_MIN_VOCAB_SIZE, **fields)

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


# Every ModelConfig field's default (the decoder options that a config.json leaves out).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


# The widest beam a DecodeConfig takes: flags are checked against it before a model's own is known.
MAX_BEAM_SIZE = 64
# DecodeConfig fields written to records even at their default: the settings records had first.
_ALWAYS_RECORDED = ("beam_size", "max_length", "num_alternatives", "length_normalization")


# What runs a caption model: LiteRT on its compiled graph (model.lite), or TensorFlow.
RUNTIMES = ("litert", "tensorflow")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How captions are searched for. Each field, by its `option`, is a search flag of the
    job and of training.decode_defaults (SEARCH_FLAGS); api.Settings takes the same names.

    Attributes:
      beam_size: hypotheses kept per image (k). k=1 is greedy decoding.
      max_length: maximum caption length in tokens, the end token included.
      num_alternatives: how many finished captions to return per image (n-best), <= k.
      length_normalization: alpha in score = logprob / length**alpha, where length
        counts the caption's tokens including the end token. 0 ranks by raw log-prob
        (favours short captions); 1 ranks by mean log-prob per token.
      forbid_unknown: never emit the <unk> token (words the vocabulary cut): the search
        takes the best known word there instead.
      no_repeat_ngram: n > 0: no caption says an n-gram twice ("in front of a building in
        front of a building" with 3); the search takes the best other word there.
    """

    beam_size: int = option(3, help="beam width k; 1 = greedy")
    max_length: int = option(20, flag="max_caption_length", help="max tokens per caption incl. the end token")
    num_alternatives: int = option(3, help="n-best captions kept per image, at most beam_size")
    length_normalization: float = option(0.7, help="alpha in score = logprob / length**alpha; 0 = raw log-prob")
    forbid_unknown: bool = option(False, help="never write <unk> (a word the vocabulary cut): the search takes "
                                  "the best known word")
    no_repeat_ngram: int = option(0, help="never repeat an n-gram of this many tokens within a caption; 0 = off")

    def __post_init__(self):
        if not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be in [1, {MAX_BEAM_SIZE}], got {self.beam_size}")
        if not 1 <= self.max_length <= 100:
            raise ValueError(f"max_length must be in [1, 100], got {self.max_length}")
        if not 1 <= self.num_alternatives <= self.beam_size:
            raise ValueError(
                f"num_alternatives must be in [1, beam_size={self.beam_size}], got {self.num_alternatives}"
            )
        if not 0.0 <= self.length_normalization <= 2.0:
            raise ValueError(f"length_normalization must be in [0, 2], got {self.length_normalization}")
        if not 0 <= self.no_repeat_ngram <= self.max_length:
            raise ValueError(f"no_repeat_ngram must be in [0, max_length={self.max_length}], got {self.no_repeat_ngram}")

    def to_dict(self) -> dict[str, Any]:
        """What records and catalogs hold. A setting added later is left out at its
        default, so that records written before it existed keep matching these settings
        (an incremental run does not re-caption them)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k in _ALWAYS_RECORDED or v != _SEARCH_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecodeConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown decode settings: {', '.join(unknown)}")
        return cls(**data)

    def with_flags(self, flags: Any) -> "DecodeConfig":
        """`overridden` by the search flags that `flags` gives (`given_search_flags`)."""
        return self.overridden(**given_search_flags(flags))

    def overridden(self, **settings: Any) -> "DecodeConfig":
        """These settings with each given (not None) one in its place: a run's flags over a
        model's defaults. The n-best, unless given, shrinks to fit a smaller beam."""
        settings = {k: v for k, v in settings.items() if v is not None}
        beam = settings.get("beam_size", self.beam_size)
        settings.setdefault("num_alternatives", min(self.num_alternatives, beam))
        return dataclasses.replace(self, **settings)


# Search flag name -> DecodeConfig field (only max_caption_length differs).
SEARCH_FLAGS = {flag: name for name, flag in flag_names(DecodeConfig).items()}
_SEARCH_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DecodeConfig)}


def given_search_flags(flags: Any) -> dict[str, Any]:
    """DecodeConfig field -> value of each search flag that `flags` gives: the parsed
    command line, api.Settings, any object with attributes of SEARCH_FLAGS' names (None or
    missing: not given)."""
    return {name: getattr(flags, flag) for flag, name in SEARCH_FLAGS.items() if getattr(flags, flag, None) is not None}


def in_flag_names(message: str) -> str:
    """A DecodeConfig error message with each field named by its search flag."""
    for flag, name in SEARCH_FLAGS.items():
        if flag != name:
            message = message.replace(name, flag)
    return message
