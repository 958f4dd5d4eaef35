"""TrainConfig: the options of one training run, frozen and validated.

Validation here needs neither TensorFlow nor the dataset, so `python -m batch_caption.train`
rejects bad flags before any training work. What depends on the dataset (image size, encoder of a
features dataset, splits) is checked by `preflight.resolve`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from batch_caption.storage import files
from batch_caption.cli import UsageError  # noqa: F401  (re-exported: raised by TrainConfig)
from batch_caption.cli import flag_error, option
from batch_caption.cli import require as need
from batch_caption.model.bundle import WEIGHT_DTYPES
from batch_caption.model.config import DECODERS, ModelConfig

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "exponential")

# Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint: EX_TEMPFAIL of
# sysexits.h, "temporary failure, retry": rerunning the same command resumes. Not 0, so that
# `train && evaluate` does not evaluate a half-trained model.
EXIT_PREEMPTED = 75


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); one line, CLI exit code 1."""


# The model options that the dataset decides unless given, and what it gives then
# (preflight.resolve): a given one must agree with the dataset.
FROM_DATASET = {
    "encoder": "the dataset's encoder, small_cnn for an images dataset",
    "image_size": "the dataset's; a given size must match it",
    "small_cnn_grid": "what a features dataset records, else 4",
    "encoder_weights": "random; for a features dataset the weights that computed its features, as dataset.json "
                       "records them: the exported bundle carries that backbone",
    "train_encoder": "on for an images dataset; a features dataset trains the decoder only",
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of a training run. Each field made by `option`, and each of `model`'s, is
    a flag of `python -m batch_caption.train` with its help; notes beyond the help:

      output: checkpoints/, logs/, train_config.json, result.json, and export/ unless
        `export` is given (the chief writes the bundle).
      model: the architecture, complete once preflight.resolve has put in what the
        dataset decides: vocab_size, max_length and the FROM_DATASET fields.
      given: the values given for FROM_DATASET fields (the others are the dataset's);
        preflight.resolve checks them against the dataset and puts them in `model`.
      strategy: "auto" looks at TF_CONFIG and the devices (training/strategy.py).
      global_batch_size: split evenly over the replicas.
      steps: a resumed run continues up to this number.
      eval_every, eval_steps: the validation loss is over `eval_steps` batches of `eval_split`.
      attention_penalty: lambda of `attend_and_tell.attention_penalty`, added to the loss.
      teachers, teacher_weight: word-level distillation (`training.distill`); the teachers
        read the same inputs as the student, so preflight checks that they share its
        vocabulary and, on a features dataset, its encoder.
      seed: a single-device CPU run is repeatable.
      bucket_width: 0 pads every batch to max_length + 1 (static shapes).
      shuffle_buffer: per input pipeline.
    """

    data: str = option(help="prepared dataset directory (dataset.json, vocab.json, shards)")
    output: str = option(help="training directory: checkpoints/, logs/ (TensorBoard), export/, train_config.json, "
                         "result.json; an existing one is resumed")
    export: str | None = option(None, help="bundle directory written at the end", default_help="default OUTPUT/export")
    export_weights_dtype: str = option("float32", choices=WEIGHT_DTYPES, help="how the bundle stores the weights: "
                                       "float16 halves its size, the model still computes in float32")
    strategy: str = option("auto", choices=STRATEGIES, help="auto: multi_worker if TF_CONFIG lists several workers, "
                           "else mirrored over several GPUs (or --num_cpu_devices), else one_device. default: "
                           "TensorFlow's no-op strategy. tpu: TPUClusterResolver + TPUStrategy (untested path).")
    tpu: str = option("", help="TPU name or address for --strategy tpu ('local' on a TPU VM)",
                      default_help="default: from the environment")
    num_cpu_devices: int = option(0, help="split the CPU into N logical devices first, which lets mirrored run on "
                                  "CPU; 0 = off")
    global_batch_size: int = option(64, help="caption pairs per step over all replicas")
    steps: int = option(10_000, help="total training steps")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="the optimizer")
    learning_rate: float = option(1e-3, help="peak learning rate")
    lr_schedule: str = option("cosine", choices=LR_SCHEDULES, help="after warmup: constant, or cosine / exponential "
                              "decay to learning_rate * final_lr_ratio at the last step")
    warmup_steps: int = option(0, help="linear warmup steps")
    final_lr_ratio: float = option(0.1, help="final learning rate / peak")
    clip_norm: float = option(5.0, help="clip the all-reduced gradients to this global norm; 0 = off")
    checkpoint_every: int = option(500, help="steps between checkpoints")
    keep_checkpoints: int = option(3, help="checkpoints kept")
    eval_every: int = option(500, help="steps between validation runs, 0 = never")
    eval_steps: int = option(20, help="validation batches per run")
    num_samples: int = option(4, help="validation images captioned (greedy and beam) into TensorBoard each run")
    log_every: int = option(50, help="steps between progress lines")
    train_split: str = option("train", help="split to train on")
    eval_split: str = option("val", help="split for validation")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig.without_vocabulary)
    given: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    attention_penalty: float = option(0.0, help="attention decoder: weight of the doubly stochastic attention "
                                      "penalty, 0 = off")
    teachers: tuple[str, ...] = option((), parse=lambda text: tuple(p for p in text.split(",") if p), metavar="BUNDLES",
                                       help="distil from these trained bundles (comma-separated): the training "
                                       "target mixes each reference word with their mean next-word distribution",
                                       default_help="default: none, the reference words alone")
    teacher_weight: float = option(0.5, help="with --teachers: the teachers' share of the target, the reference "
                                   "word's is 1 - this")
    fine_tune_after_steps: int = option(0, help="second stage: CNN frozen for this many steps, trained after",
                                        default_help="default 0: from the start")
    encoder_lr_multiplier: float = option(0.1, help="CNN learning rate / decoder learning rate")
    seed: int = option(0, help="seed of weights, dropout and data order")
    deterministic: bool = option(False, help="also enable TensorFlow op determinism (slower on GPU)")
    bucket_width: int = option(4, help="batch captions of similar length (buckets this many tokens wide), pad to the "
                               "batch's longest; 0 = pad all to max_length")
    shuffle_buffer: int = option(1024, help="records in the shuffle buffer")
    preempt_exit_code: int = option(EXIT_PREEMPTED, help="exit status after a SIGTERM/SIGINT-triggered checkpoint")

    def __post_init__(self):
        unknown = sorted(set(self.given) - FROM_DATASET.keys())
        if unknown:
            raise ValueError(f"given: the dataset does not decide {', '.join(unknown)}")
        # The given values with the model's others, as far as they can be checked before the
        # dataset names the encoder: imagenet weights only with an encoder given too.
        checked = {k: v for k, v in self.given.items() if k != "encoder_weights" or "encoder" in self.given}
        try:
            dataclasses.replace(self.model, **checked)
        except ValueError as e:
            raise flag_error(e, ModelConfig) from e
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
        need(self.attention_penalty >= 0, f"--attention_penalty must be >= 0, got {self.attention_penalty}")
        need(self.attention_penalty == 0 or DECODERS[self.model.decoder].attention_maps,
             f"--attention_penalty applies to --decoder {DECODERS.which(lambda d: d.attention_maps)} only")
        need(0 < self.teacher_weight <= 1, f"--teacher_weight must be in (0, 1], got {self.teacher_weight}")
        need(len(set(self.teachers)) == len(self.teachers), "--teachers names a bundle twice")
        need(0 <= self.fine_tune_after_steps < self.steps,
             f"--fine_tune_after_steps must be in [0, steps={self.steps}), got {self.fine_tune_after_steps}")
        need(self.fine_tune_after_steps == 0 or self.given.get("train_encoder") is not False,
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
        """train_config.json's content: these options, the model as config.json holds it
        (under "model", where the file held it beside a flat copy of the options before)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**data, "model": self.model.to_dict(), "given": dict(self.given)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
