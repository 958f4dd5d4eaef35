"""Checks made before TensorFlow starts: the dataset, the model config, the output directory.

A prepared dataset (see `batch_caption.data.tfrecord`) is read here as plain files, so
that a missing or inconsistent dataset, or flags that do not fit it, fail in one line
before the strategy is created and before any training work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

from batch_caption.storage import files
from batch_caption.data.tfrecord import INFO_NAME, VOCAB_NAME, DatasetInfo
from batch_caption.model.bundle import BundleError, read_bundle_metadata
from batch_caption.model.config import (DECODERS, DEFAULT_DECODER, DEFAULT_ENCODER, DEFAULT_SMALL_CNN_GRID, ENCODERS,
                                        ModelConfig)
from batch_caption.model.vocab import Vocabulary
from batch_caption.training.config import TrainConfig, UsageError

TRAIN_CONFIG_NAME = "train_config.json"
# Fields that fix the shapes of the checkpointed variables: a resumed run must match them.
_ARCHITECTURE = ("vocab_size", "encoder", "image_size", "small_cnn_grid", "image_input", "decoder",
                 "attention_units", "deep_output", "embedding_size", "lstm_units")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A prepared dataset, read and checked.

    files: split name -> its TFRecord shard paths, sorted.
    """

    path: str
    info: DatasetInfo
    vocabulary: Vocabulary
    files: Mapping[str, tuple[str, ...]]


def read_dataset(path: str) -> DatasetSpec:
    """Reads dataset.json and vocab.json and lists every split's shards; UsageError if unfit."""
    info_path = files.join(path, INFO_NAME)
    if not files.exists(info_path):
        raise UsageError(f"no prepared dataset at {path} ({INFO_NAME} not found; make one with python -m batch_caption.prepare)")
    try:
        info = DatasetInfo.from_json(files.read_text(info_path))
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{info_path} is invalid: {e}") from e
    vocab_path = files.join(path, VOCAB_NAME)
    try:
        vocabulary = Vocabulary.from_json(files.read_text(vocab_path))
    except OSError as e:
        raise UsageError(f"cannot read {vocab_path}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{vocab_path} is invalid: {e}") from e
    if len(vocabulary) != info.vocab_size:
        raise UsageError(f"{vocab_path} has {len(vocabulary)} tokens but {INFO_NAME} says vocab_size {info.vocab_size}")
    shards = {}
    for split, meta in info.splits.items():
        names = (meta or {}).get("files")
        if names:
            paths = [n if files.is_remote(n) or os.path.isabs(n) else files.join(path, n) for n in names]
            missing = [p for p in paths if not files.exists(p)]
            if missing:
                raise UsageError(f"split {split!r} of {path}: shard {missing[0]} is missing ({len(missing)} of {len(paths)})")
        else:
            paths = files.matched(files.join(path, f"{split}-*.tfrecord"))
        shards[split] = tuple(sorted(paths))
    return DatasetSpec(path, info, vocabulary, shards)


def resolve(config: TrainConfig, spec: DatasetSpec) -> tuple[TrainConfig, list[str]]:
    """Fills in what the dataset decides: the model's vocabulary, caption length and
    FROM_DATASET fields (checking those given against it), and whether there is a split
    to evaluate on.

    Returns (the config with its model complete, notes to print). Raises UsageError when
    flags and dataset disagree.
    """
    info, notes, given = spec.info, [], config.given
    if not spec.files.get(config.train_split):
        have = ", ".join(s for s, f in spec.files.items() if f) or "none"
        raise UsageError(f"dataset {spec.path} has no {config.train_split!r} shards (splits with shards: {have})")
    if (info.splits.get(config.train_split) or {}).get("captions") == 0:
        raise UsageError(f"split {config.train_split!r} of {spec.path} has no captions to train on")
    if given.get("image_size", info.image_size) != info.image_size:
        raise UsageError(f"--image_size {given['image_size']} does not match the dataset's images ({info.image_size} px)")
    changes: dict = {"vocab_size": len(spec.vocabulary), "max_length": info.max_length, "image_size": info.image_size}
    grid = given.get("small_cnn_grid")
    if info.mode == "features":
        if info.encoder not in ENCODERS:
            raise UsageError(f"the dataset's features come from encoder {info.encoder!r}, unknown here "
                             f"(known: {', '.join(ENCODERS)})")
        encoder = ENCODERS[info.encoder]
        recorded = int(info.source.get("small_cnn_grid", DEFAULT_SMALL_CNN_GRID)) if encoder.takes_grid else None
        if grid is not None and recorded is not None and grid != recorded:
            raise UsageError(f"--small_cnn_grid {grid} does not match the grid of the dataset's features ({recorded})")
        grid = recorded if grid is None else grid
        if given.get("encoder", info.encoder) != info.encoder:
            raise UsageError(f"--encoder {given['encoder']} does not match the encoder that made the features "
                             f"({info.encoder})")
        if given.get("train_encoder") or config.fine_tune_after_steps:
            raise UsageError("a features dataset trains the decoder only: drop --train_encoder / --fine_tune_after_steps "
                             "(prepare an images dataset to fine-tune the CNN)")
        weights = given.get("encoder_weights") or info.source.get("encoder_weights")
        if not weights:
            raise UsageError(
                f"a features dataset needs --encoder_weights: the {info.encoder} weights that computed the features "
                "(the exported bundle pairs the decoder with that backbone)"
            )
        changes.update(encoder=info.encoder, train_encoder=False, encoder_weights=weights)
        made_for = info.source.get("decoder", DEFAULT_DECODER)
        decoder = config.model.decoder
        if not encoder.takes_grid and _features_for(made_for) != DECODERS[decoder].features:
            # Such an encoder's map is averaged for a decoder that reads a pooled vector and
            # kept whole for one that reads a grid.
            raise UsageError(f"the dataset's {info.encoder} features were made for --decoder {made_for}, not "
                             f"{decoder} (prepare them again with --decoder {decoder})")
        if encoder.takes_grid and info.feature_size != grid * grid * encoder.grid_channels:
            raise UsageError(f"the dataset's features have {info.feature_size} floats, not the "
                             f"{grid * grid * encoder.grid_channels} of {info.encoder} pooled to {grid}x{grid}")
    else:
        changes.update(encoder=given.get("encoder") or info.encoder or DEFAULT_ENCODER,
                       train_encoder=given.get("train_encoder", True), encoder_weights=given.get("encoder_weights"))
    if config.eval_every and not spec.files.get(config.eval_split):
        notes.append(f"no {config.eval_split!r} split in {spec.path}: periodic evaluation is off")
        config = dataclasses.replace(config, eval_every=0)
    changes.update(small_cnn_grid=DEFAULT_SMALL_CNN_GRID if grid is None else grid)
    try:
        model = dataclasses.replace(config.model, **changes)
    except ValueError as e:  # an option its encoder or decoder does not take, no imagenet weights...
        raise UsageError(str(e)) from e
    if model.encoder_weights not in (None, "imagenet") and not files.exists(model.encoder_weights):
        raise UsageError(f"--encoder_weights file {model.encoder_weights} does not exist")
    check_teachers(config.teachers, spec)
    return dataclasses.replace(config, model=model), notes


def check_teachers(paths: Sequence[str], spec: DatasetSpec) -> None:
    """Refuses a --teachers bundle that cannot score the dataset's captions: one with another
    vocabulary (its distributions would be over other words) or, on a features dataset,
    one that reads other features than the dataset holds."""
    info = spec.info
    for path in paths:
        try:
            teacher = read_bundle_metadata(path)
        except (BundleError, OSError) as e:
            raise UsageError(f"--teachers: {e}") from e
        if teacher.vocabulary != spec.vocabulary:
            raise UsageError(f"--teachers bundle {path} has another vocabulary than the dataset "
                             f"({len(teacher.vocabulary)} vs {len(spec.vocabulary)} tokens)")
        config = teacher.config
        if info.mode == "features":
            made_for = info.source.get("decoder", DEFAULT_DECODER)
            reads = (config.encoder, config.image_size, _features_for(config.decoder))
            if reads != (info.encoder, info.image_size, _features_for(made_for)):
                raise UsageError(f"--teachers bundle {path} reads {config.encoder} features at {config.image_size} px "
                                 f"for --decoder {config.decoder}; the dataset holds {info.encoder} features at "
                                 f"{info.image_size} px for --decoder {made_for}")


def _features_for(decoder: str) -> str | None:
    """What `decoder` reads (`DecoderSpec.features`); None for a name unknown here."""
    return DECODERS[decoder].features if decoder in DECODERS else None


def check_output(config: TrainConfig) -> bool:
    """Refuses an output directory whose checkpoints belong to another architecture.

    Returns True when OUTPUT already holds a run (it will be resumed).
    """
    path = files.join(config.output, TRAIN_CONFIG_NAME)
    if not files.exists(path):
        return False
    try:
        # Both forms of the file hold the model under "model": TrainConfig.to_dict, and the
        # {"train": flat options, "model": ...} written before the options held the model.
        previous = dataclasses.asdict(ModelConfig.from_dict(json.loads(files.read_text(path))["model"]))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UsageError(f"{path} is unreadable ({e}); use a new --output") from e
    current = dataclasses.asdict(config.model)
    diffs = [f"{k} {previous[k]!r} -> {current[k]!r}" for k in _ARCHITECTURE if previous[k] != current[k]]
    if diffs:
        raise UsageError(f"{config.output} holds checkpoints of another model ({'; '.join(diffs)}); use a new --output")
    return True
