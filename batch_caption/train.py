"""Train a captioner (CNN encoder + LSTM decoder) on a prepared dataset: `python -m batch_caption.train`.

    python -m batch_caption.train --data DATASET --output TRAIN_DIR [options]

Reads a dataset made by `python -m batch_caption.prepare` (images or precomputed CNN
features), trains with a tf.distribute strategy (one device, several GPUs or logical CPU
devices, several machines via TF_CONFIG, or a TPU), and leaves in TRAIN_DIR:

    checkpoints/        tf.train checkpoints (model, optimizers, step); a rerun resumes
    logs/               TensorBoard: train/loss, learning_rate, gradient_norm,
                        examples_per_second, val/loss, val/samples (captions as text)
    export/             the model bundle (unless --export points elsewhere)
    train_config.json   the options and the model config
    result.json         final step, losses, bundle id (written last)

Multi-worker: start the same command on every machine with TF_CONFIG set (cluster
{"worker": [...]} and this task's index); worker 0 (or the "chief" task) is the chief.
OUTPUT must be storage every worker can read (checkpoints are restored from it).

Exit status: 0 done; 2 bad flags or dataset (one line on stderr, before any training);
1 training failed; 75 (--preempt_exit_code) stopped by SIGTERM/SIGINT after saving a
checkpoint: rerun the same command to resume.

The loop itself is in `batch_caption/training/loop.py` (see its docstring for how
gradients are reduced, clipped and applied).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from batch_caption import cli, gcs, quiet
from batch_caption.model.bundle import WEIGHT_DTYPES
from batch_caption.model.config import DECODERS, ENCODERS, IMAGE_INPUTS
from batch_caption.training import preflight
from batch_caption.training import strategy as strategies
from batch_caption.training.config import (
    EXIT_PREEMPTED,
    LR_SCHEDULES,
    OPTIMIZERS,
    STRATEGIES,
    TrainConfig,
    TrainingError,
    UsageError,
)

PROG = "python -m batch_caption.train"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Train a captioner (CNN encoder + LSTM decoder: Show and Tell, or Show, Attend and Tell) on a "
        "prepared dataset with "
        "tf.distribute; checkpoints, resume, TensorBoard; exports a model bundle.",
        epilog="Exit status: 0 done, 1 training failed, 2 bad flags/dataset, "
        f"{EXIT_PREEMPTED} stopped by SIGTERM/SIGINT after a checkpoint (rerun to resume).",
    )
    d = TrainConfig.__dataclass_fields__  # defaults live in one place: TrainConfig

    def default(name):
        return d[name].default

    io = p.add_argument_group("data and outputs")
    io.add_argument("--data", required=True, help="prepared dataset directory (dataset.json, vocab.json, shards)")
    io.add_argument("--output", required=True,
                    help="training directory: checkpoints/, logs/ (TensorBoard), export/, train_config.json, result.json; "
                    "an existing one is resumed")
    io.add_argument("--export", default=None, help="bundle directory written at the end (default OUTPUT/export)")
    io.add_argument("--export_weights_dtype", choices=WEIGHT_DTYPES, default=default("export_weights_dtype"),
                    help="how the bundle stores the weights: float16 halves its size, the model still computes in "
                    "float32 (default %(default)s)")
    io.add_argument("--train_split", default=default("train_split"), help="split to train on (default %(default)s)")
    io.add_argument("--eval_split", default=default("eval_split"), help="split for validation (default %(default)s)")

    dist = p.add_argument_group("distribution")
    dist.add_argument("--strategy", choices=STRATEGIES, default=default("strategy"),
                      help="auto: multi_worker if TF_CONFIG lists several workers, else mirrored over several GPUs "
                      "(or --num_cpu_devices), else one_device. default: TensorFlow's no-op strategy. "
                      "tpu: TPUClusterResolver + TPUStrategy (untested path). (default %(default)s)")
    dist.add_argument("--tpu", default="", help="TPU name or address for --strategy tpu ('local' on a TPU VM)")
    dist.add_argument("--num_cpu_devices", type=int, default=0,
                      help="split the CPU into N logical devices first (lets mirrored run on CPU; 0 = off)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--global_batch_size", type=int, default=default("global_batch_size"),
                     help="caption pairs per step over all replicas (default %(default)s)")
    opt.add_argument("--steps", type=int, default=default("steps"), help="total training steps (default %(default)s)")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=default("optimizer"), help="(default %(default)s)")
    opt.add_argument("--learning_rate", type=float, default=default("learning_rate"),
                     help="peak learning rate (default %(default)s)")
    opt.add_argument("--lr_schedule", choices=LR_SCHEDULES, default=default("lr_schedule"),
                     help="after warmup: constant, or cosine / exponential decay to learning_rate * final_lr_ratio "
                     "at the last step (default %(default)s)")
    opt.add_argument("--warmup_steps", type=int, default=default("warmup_steps"),
                     help="linear warmup steps (default %(default)s)")
    opt.add_argument("--final_lr_ratio", type=float, default=default("final_lr_ratio"),
                     help="final learning rate / peak (default %(default)s)")
    opt.add_argument("--clip_norm", type=float, default=default("clip_norm"),
                     help="clip the all-reduced gradients to this global norm; 0 = off (default %(default)s)")
    opt.add_argument("--seed", type=int, default=default("seed"),
                     help="seed of weights, dropout and data order (default %(default)s)")
    opt.add_argument("--deterministic", action="store_true",
                     help="also enable TensorFlow op determinism (slower on GPU)")

    model = p.add_argument_group("model")
    model.add_argument("--encoder", choices=ENCODERS, default=None,
                       help="CNN backbone (default: the dataset's encoder, small_cnn for an images dataset)")
    model.add_argument("--image_size", type=int, default=None,
                       help="input size in pixels; must match the dataset (default: the dataset's)")
    model.add_argument("--small_cnn_grid", type=int, default=None,
                       help="small_cnn: side of the grid its features are pooled to, F = grid*grid*128 (default: what a "
                       "features dataset records, else 4; 3 matches the synthetic scenes' 3x3 layout)")
    model.add_argument("--image_input", choices=IMAGE_INPUTS, default=default("image_input"),
                       help="where the LSTM sees the image: first (Show and Tell: its first input) or every_step "
                       "(beside every word) (default %(default)s)")
    model.add_argument("--decoder", choices=DECODERS, default=default("decoder"),
                       help="show_and_tell (the image as one pooled vector) or attention (Show, Attend and Tell: "
                       "soft attention over the encoder's grid cells at every step) (default %(default)s)")
    model.add_argument("--attention_units", type=int, default=default("attention_units"),
                       help="attention decoder: hidden size of the additive attention (default %(default)s)")
    model.add_argument("--deep_output", action=argparse.BooleanOptionalAction, default=default("deep_output"),
                       help="attention decoder: predict words from emb(previous word) + L_h h + L_z context "
                       "(Xu et al. eq. 7) rather than from [h ; context] (default %(default)s)")
    model.add_argument("--attention_penalty", type=float, default=default("attention_penalty"),
                       help="attention decoder: weight of the doubly stochastic attention penalty, 0 = off "
                       "(default %(default)s)")
    model.add_argument("--embedding_size", type=int, default=default("embedding_size"), help="(default %(default)s)")
    model.add_argument("--lstm_units", type=int, default=default("lstm_units"), help="(default %(default)s)")
    model.add_argument("--dropout", type=float, default=default("dropout"), help="(default %(default)s)")
    model.add_argument("--encoder_weights", default=None,
                       help="backbone initialisation: 'imagenet' (downloads), or a .weights.h5 file. A features dataset "
                       "needs the weights that computed its features (default: what dataset.json records); the "
                       "exported bundle carries that backbone")
    model.add_argument("--train_encoder", action=argparse.BooleanOptionalAction, default=None,
                       help="train the CNN too (images datasets; default on for images, impossible for features)")
    model.add_argument("--fine_tune_after_steps", type=int, default=0,
                       help="second stage: CNN frozen for this many steps, trained after (default 0: from the start)")
    model.add_argument("--encoder_lr_multiplier", type=float, default=default("encoder_lr_multiplier"),
                       help="CNN learning rate / decoder learning rate (default %(default)s)")

    inp = p.add_argument_group("input pipeline")
    inp.add_argument("--bucket_width", type=int, default=default("bucket_width"),
                     help="batch captions of similar length (buckets this many tokens wide), pad to the batch's longest; "
                     "0 = pad all to max_length (default %(default)s)")
    inp.add_argument("--shuffle_buffer", type=int, default=default("shuffle_buffer"),
                     help="records in the shuffle buffer (default %(default)s)")

    mon = p.add_argument_group("checkpoints, evaluation, logging")
    mon.add_argument("--checkpoint_every", type=int, default=default("checkpoint_every"),
                     help="steps between checkpoints (default %(default)s)")
    mon.add_argument("--keep_checkpoints", type=int, default=default("keep_checkpoints"),
                     help="checkpoints kept (default %(default)s)")
    mon.add_argument("--eval_every", type=int, default=default("eval_every"),
                     help="steps between validation runs, 0 = never (default %(default)s)")
    mon.add_argument("--eval_steps", type=int, default=default("eval_steps"),
                     help="validation batches per run (default %(default)s)")
    mon.add_argument("--num_samples", type=int, default=default("num_samples"),
                     help="validation images captioned (greedy and beam) into TensorBoard each run (default %(default)s)")
    mon.add_argument("--log_every", type=int, default=default("log_every"),
                     help="steps between progress lines (default %(default)s)")
    mon.add_argument("--preempt_exit_code", type=int, default=default("preempt_exit_code"),
                     help="exit status after a SIGTERM/SIGINT-triggered checkpoint (default %(default)s)")
    quiet.add_verbose_flag(p)
    return p


def parse(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig; UsageError on bad flags."""
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def train(config: TrainConfig, log=print):
    """Checks the dataset, creates the strategy, trains; returns a result.TrainResult.

    Raises UsageError before any TensorFlow work when the dataset or flags do not fit.
    """
    gcs.require_credentials([config.data, config.output])
    spec = preflight.read_dataset(config.data)
    config, model_config, notes = preflight.resolve(config, spec)
    preflight.check_output(config, model_config)
    strategies.resolve_name(config.strategy, strategies.read_tf_config(), config.num_cpu_devices)
    for note in notes:
        log(f"note: {note}")

    # The strategy first: logical devices and multi-worker servers need a fresh runtime.
    strategy, role = strategies.create_strategy(config.strategy, tpu=config.tpu, num_cpu_devices=config.num_cpu_devices)
    import keras
    import tensorflow as tf

    from batch_caption.training.loop import Trainer

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if isinstance(strategy, tf.distribute.TPUStrategy) and config.bucket_width:
        log("note: TPU needs static shapes: padding every batch to max_length (--bucket_width 0)")
        config = dataclasses.replace(config, bucket_width=0)
    trainer = Trainer(config, model_config, spec, strategy, role, log=log)
    try:
        return trainer.run()
    finally:
        trainer.close()


def run(argv: Sequence[str] | None = None):
    """Parses `argv` and trains; returns the result.TrainResult. UsageError before any work."""
    return train(parse(argv))


def main(argv: Sequence[str] | None = None) -> int:
    quiet.setup_when_command_line(argv)
    try:
        config = parse(argv)
        result = train(config, log=lambda line: print(line, flush=True))
    except UsageError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except TrainingError as e:
        print(f"{PROG}: training failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), sort_keys=True), flush=True)
    return config.preempt_exit_code if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
