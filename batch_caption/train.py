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

from batch_caption import cli, quiet
from batch_caption.model.config import ModelConfig
from batch_caption.storage import gcs
from batch_caption.training import preflight
from batch_caption.training import strategy as strategies
from batch_caption.training.config import EXIT_PREEMPTED, FROM_DATASET, TrainConfig, TrainingError, UsageError

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
    io = p.add_argument_group("data and outputs")
    cli.add_flags(io, TrainConfig, ["data", "output", "export", "export_weights_dtype", "train_split", "eval_split"])
    dist = p.add_argument_group("distribution")
    cli.add_flags(dist, TrainConfig, ["strategy", "tpu", "num_cpu_devices"])
    opt = p.add_argument_group("optimisation")
    cli.add_flags(opt, TrainConfig, ["global_batch_size", "steps", "optimizer", "learning_rate", "lr_schedule",
                                     "warmup_steps", "final_lr_ratio", "clip_norm", "seed", "deterministic"])
    model = p.add_argument_group("model")
    cli.add_flags(model, ModelConfig, unset=FROM_DATASET)
    cli.add_flags(model, TrainConfig, ["attention_penalty", "fine_tune_after_steps", "encoder_lr_multiplier"])
    distil = p.add_argument_group("distillation")
    cli.add_flags(distil, TrainConfig, ["teachers", "teacher_weight"])
    inp = p.add_argument_group("input pipeline")
    cli.add_flags(inp, TrainConfig, ["bucket_width", "shuffle_buffer"])
    mon = p.add_argument_group("checkpoints, evaluation, logging")
    cli.add_flags(mon, TrainConfig, ["checkpoint_every", "keep_checkpoints", "eval_every", "eval_steps", "num_samples",
                                     "log_every", "preempt_exit_code"])
    quiet.add_verbose_flag(p)
    return p


def parse(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig; UsageError on bad flags. A model option left out is the
    dataset's when FROM_DATASET names it."""
    args = build_parser().parse_args(argv)
    options = cli.flag_values(args, ModelConfig)
    given = {name: options.pop(name) for name in FROM_DATASET if name in options}
    try:
        model = ModelConfig.without_vocabulary(**options)
    except ValueError as e:
        raise cli.flag_error(e, ModelConfig) from e
    return cli.from_args(TrainConfig, args, model=model, given=given)


def train(config: TrainConfig, log=print):
    """Checks the dataset, creates the strategy, trains; returns a result.TrainResult.

    Raises UsageError before any TensorFlow work when the dataset or flags do not fit.
    """
    gcs.require_credentials([config.data, config.output])
    spec = preflight.read_dataset(config.data)
    config, notes = preflight.resolve(config, spec)
    preflight.check_output(config)
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
    trainer = Trainer(config, spec, strategy, role, log=log)
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
