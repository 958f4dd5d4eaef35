"""TrainConfig: the options of one training run, frozen and validated.

Validation here needs neither TensorFlow nor the dataset, so `python -m batch_caption.train`
rejects bad flags before any training work. What depends on the dataset (image size, encoder of a
features dataset, splits) is checked by `dataset.resolve_model_config`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from batch_caption import files
from batch_caption.cli import UsageError  # noqa: F401  (re-exported: raised by TrainConfig)
from batch_caption.cli import require as need
from batch_caption.model.bundle import WEIGHT_DTYPES
from batch_caption.model.config import DECODERS, ENCODERS, IMAGE_INPUTS
from batch_caption.model.registry import DECODER_OPTIONS

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "exponential")

# Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint: EX_TEMPFAIL of
# sysexits.h, "temporary failure, retry": rerunning the same command resumes. Not 0, so that
# `train && evaluate` does not evaluate a half-trained model.
EXIT_PREEMPTED = 75


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); one line, CLI exit code 1."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of a training run (the CLI flags; see `python -m batch_caption.train --help`).

    Attributes, in groups:
      data, output: prepared dataset directory; training directory (checkpoints/, logs/,
        train_config.json, result.json, and export/ unless `export` is given).
      export: bundle directory written at the end by the chief; None = OUTPUT/export.
      export_weights_dtype: how the bundle stores its weights: "float32", or "float16"
        (half the size; the model still computes in float32).
      strategy: "auto" (multi_worker if TF_CONFIG names several tasks, else mirrored over
        several GPUs / CPU devices, else one_device), "default" (TensorFlow's no-op
        strategy), "one_device", "mirrored", "multi_worker" (needs TF_CONFIG), "tpu".
      tpu: TPUClusterResolver address ("" = from the environment, "local" on a TPU VM).
      num_cpu_devices: split the CPU into this many logical devices before the strategy is
        created (0 = leave it alone); lets MirroredStrategy run on a CPU-only machine.
      global_batch_size: caption pairs per step over all replicas (split evenly).
      steps: total optimizer steps (a resumed run continues up to this number).
      optimizer, learning_rate, lr_schedule, warmup_steps, final_lr_ratio: linear warmup
        to `learning_rate`, then constant / cosine / exponential decay to
        learning_rate * final_lr_ratio at the last step.
      clip_norm: clip the all-reduced gradients to this global norm; 0 = no clipping.
      checkpoint_every, keep_checkpoints: checkpoint period in steps, and how many to keep.
      eval_every, eval_steps, num_samples: validation loss over `eval_steps` batches of
        `eval_split` every `eval_every` steps (0 = never), plus `num_samples` captions.
      log_every: a progress line (and TensorBoard scalars) every this many steps.
      train_split, eval_split: split names in the dataset.
      encoder, image_size: None = taken from the dataset (small_cnn for an images dataset).
      small_cnn_grid: small_cnn's pooled grid side (`ModelConfig.small_cnn_grid`); None =
        the features dataset's record, or 4.
      image_input: where the decoder sees the image (`ModelConfig.image_input`): "first"
        (Show and Tell) or "every_step".
      decoder, attention_units: `ModelConfig.decoder` (one of `DECODERS`) and the
        attention's hidden size (decoders with this option: attention).
      deep_output: decoders with this option (attention): `ModelConfig.deep_output`.
      attention_penalty: decoders with attention maps (attention): weight lambda of the
        doubly stochastic penalty (`attend_and_tell.attention_penalty`) added to the
        loss; 0 = off.
      embedding_size, lstm_units, dropout: decoder architecture.
      encoder_weights: backbone initialisation: None (random), "imagenet", or a
        .weights.h5 file. In features mode it must be the backbone that computed the
        features (the exported bundle carries it); default: the dataset's own record.
      train_encoder: train the CNN (images mode). None = True for images, False for
        features (where it must stay False: the decoder trains on fixed features).
      fine_tune_after_steps: keep the CNN frozen for this many steps, then train it too
        (a second stage); 0 = from the start.
      encoder_lr_multiplier: the CNN's learning rate relative to the decoder's.
      seed: seeds weights, dropout and data order; a single-device CPU run is repeatable.
      deterministic: also enable TensorFlow op determinism (slower on GPU).
      bucket_width: batch captions of similar length (buckets of this many tokens) and pad
        to the batch's longest; 0 = pad every batch to max_length + 1 (static shapes).
      shuffle_buffer: records held by the shuffle buffer (per input pipeline).
      preempt_exit_code: exit status after a SIGTERM/SIGINT-triggered save.
    """

    data: str
    output: str
    export: str | None = None
    export_weights_dtype: str = "float32"
    strategy: str = "auto"
    tpu: str = ""
    num_cpu_devices: int = 0
    global_batch_size: int = 64
    steps: int = 10_000
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1
    clip_norm: float = 5.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    eval_steps: int = 20
    num_samples: int = 4
    log_every: int = 50
    train_split: str = "train"
    eval_split: str = "val"
    encoder: str | None = None
    image_size: int | None = None
    small_cnn_grid: int | None = None
    image_input: str = "first"
    decoder: str = "show_and_tell"
    attention_units: int = 256
    deep_output: bool = False
    attention_penalty: float = 0.0
    embedding_size: int = 256
    lstm_units: int = 512
    dropout: float = 0.3
    encoder_weights: str | None = None
    train_encoder: bool | None = None
    fine_tune_after_steps: int = 0
    encoder_lr_multiplier: float = 0.1
    seed: int = 0
    deterministic: bool = False
    bucket_width: int = 4
    shuffle_buffer: int = 1024
    preempt_exit_code: int = EXIT_PREEMPTED

    def __post_init__(self):
        need(bool(self.data), "--data is required")
        need(bool(self.output), "--output is required")
        need(self.export_weights_dtype in WEIGHT_DTYPES,
             f"--export_weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.export_weights_dtype!r}")
        need(self.strategy in STRATEGIES, f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        need(0 <= self.num_cpu_devices <= 64, f"--num_cpu_devices must be in [0, 64], got {self.num_cpu_devices}")
        need(self.global_batch_size >= 1, f"--global_batch_size must be >= 1, got {self.global_batch_size}")
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        need(self.lr_schedule in LR_SCHEDULES,
             f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        need(0 <= self.warmup_steps < self.steps, f"--warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        need(0.0 <= self.final_lr_ratio <= 1.0, f"--final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        need(
            self.lr_schedule != "exponential" or self.final_lr_ratio > 0,
            "--final_lr_ratio must be > 0 with --lr_schedule exponential",
        )
        need(self.clip_norm >= 0, f"--clip_norm must be >= 0 (0 = off), got {self.clip_norm}")
        need(self.checkpoint_every >= 1, f"--checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.eval_every >= 0, f"--eval_every must be >= 0 (0 = never), got {self.eval_every}")
        need(self.eval_steps >= 1, f"--eval_steps must be >= 1, got {self.eval_steps}")
        need(0 <= self.num_samples <= 64, f"--num_samples must be in [0, 64], got {self.num_samples}")
        need(self.log_every >= 1, f"--log_every must be >= 1, got {self.log_every}")
        need(self.encoder is None or self.encoder in ENCODERS,
             f"--encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        need(self.image_size is None or 32 <= self.image_size <= 1024,
             f"--image_size must be in [32, 1024], got {self.image_size}")
        need(self.small_cnn_grid is None or 1 <= self.small_cnn_grid <= 8,
             f"--small_cnn_grid must be in [1, 8], got {self.small_cnn_grid}")
        need(self.image_input in IMAGE_INPUTS,
             f"--image_input must be one of {', '.join(IMAGE_INPUTS)}, got {self.image_input!r}")
        need(self.decoder in DECODERS, f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        need(self.attention_units >= 1, f"--attention_units must be >= 1, got {self.attention_units}")
        need(self.attention_penalty >= 0, f"--attention_penalty must be >= 0, got {self.attention_penalty}")
        decoder = DECODERS[self.decoder]
        for name in DECODER_OPTIONS:
            need(name in decoder.options or getattr(self, name) == _DEFAULTS[name],
                 f"--{name} applies to --decoder {DECODERS.which(lambda d: name in d.options)} only")
        need(self.attention_penalty == 0 or decoder.attention_maps,
             f"--attention_penalty applies to --decoder {DECODERS.which(lambda d: d.attention_maps)} only")
        need(self.embedding_size >= 1, f"--embedding_size must be >= 1, got {self.embedding_size}")
        need(self.lstm_units >= 1, f"--lstm_units must be >= 1, got {self.lstm_units}")
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(0 <= self.fine_tune_after_steps < self.steps,
             f"--fine_tune_after_steps must be in [0, steps={self.steps}), got {self.fine_tune_after_steps}")
        need(self.fine_tune_after_steps == 0 or self.train_encoder is not False,
             "--fine_tune_after_steps needs the encoder to be trained (drop --no-train_encoder)")
        need(self.encoder_lr_multiplier > 0, f"--encoder_lr_multiplier must be > 0, got {self.encoder_lr_multiplier}")
        need(0 <= self.seed < 2**31, f"--seed must be in [0, 2**31), got {self.seed}")
        need(self.bucket_width >= 0, f"--bucket_width must be >= 0 (0 = pad to max_length), got {self.bucket_width}")
        need(self.shuffle_buffer >= 1, f"--shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        need(0 <= self.preempt_exit_code <= 255, f"--preempt_exit_code must be in [0, 255], got {self.preempt_exit_code}")
        need(self.train_split != self.eval_split, "--train_split and --eval_split must differ")
        if self.strategy in ("multi_worker", "tpu"):
            need(self.num_cpu_devices == 0, f"--num_cpu_devices does not apply to --strategy {self.strategy}")

    @property
    def export_path(self) -> str:
        return self.export or files.join(self.output, "export")

    @property
    def checkpoint_dir(self) -> str:
        return files.join(self.output, "checkpoints")

    @property
    def log_dir(self) -> str:
        return files.join(self.output, "logs")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Every TrainConfig field's default (a decoder option left at it is not given).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
