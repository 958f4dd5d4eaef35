"""Average the weights of a training run's last checkpoints into a bundle.

    python -m batch_caption.training.average_checkpoints --train_dir OUTPUT --last 2 \\
        --output DIR [--export_weights_dtype float16]

OUTPUT is a `batch_caption.train --output` folder: its export/ bundle gives the
architecture and vocabulary, its checkpoints/ the weights. The model's weights of the
`--last` K checkpoints (by step) are averaged element-wise, in float64, and exported as a
bundle like train's. With a decaying learning rate the last epochs' weights lie near one
another, and their mean usually generalises a little better than the last one alone
(checkpoint averaging); choose K on a validation split. K = 1 re-exports the last
checkpoint. Prints the bundle id.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from batch_caption import cli
from batch_caption.storage import files

PROG = "python -m batch_caption.training.average_checkpoints"


def build_parser() -> argparse.ArgumentParser:
    from batch_caption.model.bundle import WEIGHT_DTYPES

    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--train_dir", required=True, help="a train --output folder (checkpoints/ and export/)")
    p.add_argument("--last", type=int, required=True, help="how many of the last checkpoints to average (>= 1)")
    p.add_argument("--output", required=True, help="where the averaged bundle goes")
    p.add_argument("--export_weights_dtype", choices=WEIGHT_DTYPES, default="float16",
                   help="how the bundle stores the weights")
    return p


def last_checkpoints(train_dir: str, k: int) -> list[str]:
    """The checkpoint prefixes of the last k steps in train_dir/checkpoints, oldest first."""
    import tensorflow as tf

    directory = files.join(train_dir, "checkpoints")
    state = tf.train.get_checkpoint_state(directory)
    paths = list(state.all_model_checkpoint_paths) if state else []
    cli.require(bool(paths), f"--train_dir {train_dir}: no checkpoints in {directory}")
    cli.require(1 <= k <= len(paths), f"--last must be in 1..{len(paths)} (the checkpoints kept), got {k}")
    paths.sort(key=lambda p: int(p.rsplit("-", 1)[1]))
    return paths[-k:]  # TF joins relative entries to the directory


def average_into(model, checkpoints: Sequence[str]) -> None:
    """Sets model's weights to the element-wise mean of its weights in `checkpoints`.

    Every model variable must be in every checkpoint (a checkpoint of another
    architecture fails here, not later)."""
    import numpy as np
    import tensorflow as tf

    reader = tf.train.Checkpoint(model=model)
    total = None
    for path in checkpoints:
        reader.read(path).assert_existing_objects_matched().expect_partial()
        values = [w.numpy().astype(np.float64) for w in model.weights]
        total = values if total is None else [t + v for t, v in zip(total, values)]
    for w, t in zip(model.weights, total):
        w.assign((t / len(checkpoints)).astype(w.dtype))


def run(argv: Sequence[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    cli.require(args.last >= 1, f"--last must be >= 1, got {args.last}")
    from batch_caption.model.bundle import BundleError, save_bundle
    from batch_caption.model.load import load_bundle

    checkpoints = last_checkpoints(args.train_dir, args.last)
    try:
        bundle = load_bundle(files.join(args.train_dir, "export"))
    except BundleError as e:
        raise cli.UsageError(f"--train_dir {args.train_dir}: {e}") from e
    average_into(bundle.model, checkpoints)
    bundle_id = save_bundle(bundle.model, bundle.vocabulary, args.output, args.export_weights_dtype)
    steps = ", ".join(p.rsplit("-", 1)[1] for p in checkpoints)
    print(f"{args.output}: bundle {bundle_id}, the mean of the weights at steps {steps}")
    return bundle_id


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_job(PROG, lambda: run(argv))[0]


if __name__ == "__main__":
    sys.exit(main())
