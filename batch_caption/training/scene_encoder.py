"""Pretrain a CNN encoder on synthetic scenes' known content (the stand-in for ImageNet).

    python -m batch_caption.training.scene_encoder --output ENC_DIR [--seed 0] \
        [--train_scenes 16000] [--encoder small_cnn] [--image_size 128] [--epochs 6] \
        [--small_cnn_grid 4]

Show and Tell starts from an ImageNet-trained CNN. Offline there are no pretrained weights,
and a CNN trained from scratch only through the caption loss barely learns: on synthetic
scenes the gradient reaching the image pathway was ~1e-6 RMS against ~4e-4 on the word
embeddings, so the decoder settled on the captions' language prior and ignored the image.
This module gives the encoder the same head start a pretrained CNN gives on real data: a
supervised multi-label task on what each scene holds. The scenes are rendered here from
the same generator and seed as `prepare --source synthetic` (train and val splits only,
never test or compositional), more of them than the caption dataset holds (rendering is
cheap; every extra scene is new data). Validation accuracy can stay near zero for the
first epochs while the training loss falls, and recovers as the cosine schedule decays.

Labels (multi-hot, sigmoid cross-entropy), per image:
    for each cell of a 3x3 grid: occupied, colour (7), shape (5), size (2) of the object
        whose centre falls in it - factored, so held-out (colour, shape) pairs of the
        compositional split are made of parts seen in training;
    colours present (7), shapes present (5), object count (4), background tone (3) and
    pattern (3).

The head is one linear layer on the pooled features [B, F], so what it needs is linearly
readable from exactly the vector the decoder's image projection sees.

Writes ENC_DIR/backbone.weights.h5 (for `prepare --precompute_features --encoder_weights`
and `train --encoder_weights`) and ENC_DIR/report.json (per-group accuracy on the
validation split), the weights first and the report last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from batch_caption import cli, quiet
from batch_caption.model.config import DEFAULT_ENCODER, ENCODERS, ModelConfig

PROG = "python -m batch_caption.training.scene_encoder"
WEIGHTS_FILE = "backbone.weights.h5"
REPORT_FILE = "report.json"
GRID = 3


def _vocab():
    from batch_caption.data import scenes

    return {
        "colour": scenes.COLOURS,
        "shape": scenes.SHAPES,
        "size": scenes.SIZES,
        "tone": tuple(scenes.BACKGROUND_TONES),
        "pattern": scenes.PATTERNS,
    }


def label_layout() -> dict[str, tuple[int, int]]:
    """Group name -> (offset, width) in the label vector."""
    v = _vocab()
    widths = {
        "cell_occupied": GRID * GRID,
        "cell_colour": GRID * GRID * len(v["colour"]),
        "cell_shape": GRID * GRID * len(v["shape"]),
        "cell_size": GRID * GRID * len(v["size"]),
        "colours": len(v["colour"]),
        "shapes": len(v["shape"]),
        "count": 4,
        "tone": len(v["tone"]),
        "pattern": len(v["pattern"]),
    }
    layout, offset = {}, 0
    for name, width in widths.items():
        layout[name] = (offset, width)
        offset += width
    return layout


def scene_labels(facts: dict) -> np.ndarray:
    """One scene's facts (as in scenes_SPLIT.json) -> float32 multi-hot [num_labels]."""
    v, layout = _vocab(), label_layout()
    total = sum(w for _, w in layout.values())
    y = np.zeros([total], np.float32)

    def put(group, index):
        offset, width = layout[group]
        assert 0 <= index < width, (group, index)
        y[offset + index] = 1.0

    size = float(facts["image_size"])
    for obj in facts["objects"]:
        cx, cy = obj["center"]
        cell = min(GRID - 1, int(cy * GRID / size)) * GRID + min(GRID - 1, int(cx * GRID / size))
        put("cell_occupied", cell)
        put("cell_colour", cell * len(v["colour"]) + v["colour"].index(obj["colour"]))
        put("cell_shape", cell * len(v["shape"]) + v["shape"].index(obj["shape"]))
        put("cell_size", cell * len(v["size"]) + v["size"].index(obj["size"]))
        put("colours", v["colour"].index(obj["colour"]))
        put("shapes", v["shape"].index(obj["shape"]))
    put("count", len(facts["objects"]) - 1)
    put("tone", v["tone"].index(facts["background"]["tone"]))
    put("pattern", v["pattern"].index(facts["background"]["pattern"]))
    return y


def _render(args):
    scene, config = args
    from batch_caption.data import scenes

    return np.asarray(scenes.render_scene(scene, config), np.uint8)


def render_split(split: str, count: int, seed: int, image_size: int, processes: int | None = None):
    """Renders scenes 0..count-1 of a synthetic split: uint8 [N, S, S, 3], labels [N, L].

    The same (split, seed, image_size) as `prepare --source synthetic` gives the same
    scenes, so `count` beyond the caption dataset's size only adds new scenes of the split.
    PNG is lossless and the job's decoder leaves a 128 px image at 128 px unchanged, so
    these are the pixels the captioner will see.
    """
    from multiprocessing import get_context

    from batch_caption.data import scenes

    config = scenes.SceneConfig(image_size=image_size)
    generated = scenes.generate_scenes(split, count, seed, config)
    labels = np.stack([scene_labels(s.to_facts()) for s in generated]) if generated else None
    with get_context("spawn").Pool(processes or os.cpu_count()) as pool:
        pixels = np.stack(pool.map(_render, [(s, config) for s in generated], chunksize=64))
    return pixels, labels


def group_accuracy(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Fraction of images whose every label in a group is predicted right (logit > 0)."""
    predicted = logits > 0
    truth = labels > 0.5
    out = {}
    for name, (offset, width) in label_layout().items():
        sl = slice(offset, offset + width)
        out[name] = float(np.mean(np.all(predicted[:, sl] == truth[:, sl], axis=1)))
    out["all"] = float(np.mean(np.all(predicted == truth, axis=1)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG,
        description="Pretrain a CNN encoder on synthetic scenes' facts (multi-label: objects per grid cell, "
        "colours, shapes, count, background); writes backbone.weights.h5 for prepare/train --encoder_weights.",
    )
    p.add_argument("--output", required=True, help="directory for backbone.weights.h5 and report.json")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, choices=ENCODERS)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--small_cnn_grid", type=int, default=4,
                   help="small_cnn: side of the pooled feature grid (default 4; 3 matches the scenes' 3x3 layout)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--train_scenes", type=int, default=16000,
                   help="scenes of the train split to render and learn from (default 16000)")
    p.add_argument("--val_scenes", type=int, default=300, help="scenes of the val split to report on (default 300)")
    p.add_argument("--seed", type=int, default=0, help="scene seed: use the caption dataset's (default 0)")
    quiet.add_verbose_flag(p)
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    """Pretrains and writes the weights and report; returns the report. Bad flags raise
    cli.UsageError before any work."""
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "train_scenes", "val_scenes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        config = ModelConfig(vocab_size=5, encoder=args.encoder, image_size=args.image_size,
                             small_cnn_grid=args.small_cnn_grid)
    except ValueError as e:
        p.error(str(e))

    import keras
    import tensorflow as tf

    from batch_caption.model.encoder import build_backbone

    keras.utils.set_random_seed(args.seed)
    start = time.time()
    x_train, y_train = render_split("train", args.train_scenes, args.seed, args.image_size)
    x_val, y_val = render_split("val", args.val_scenes, args.seed, args.image_size)
    print(f"rendered {len(x_train)} train / {len(x_val)} val scenes in {time.time() - start:.0f}s", flush=True)

    backbone = build_backbone(config)
    backbone.trainable = True
    head = keras.layers.Dense(y_train.shape[1], name="scene_labels")
    model = keras.Sequential([backbone, head], name="scene_encoder")
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    data = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=args.seed)
        .batch(args.batch_size)
        .prefetch(2)
    )
    epoch_accuracy: list[dict[str, float]] = []  # the last entry is the final weights'

    def report_val(epoch, logs):
        acc = group_accuracy(y_val, model.predict(x_val, batch_size=args.batch_size, verbose=0))
        epoch_accuracy.append(acc)
        print(f"epoch {epoch + 1}: val accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)

    # `data` shuffles itself: Keras ignores fit's shuffle for a Dataset, and warns when it is on.
    history = model.fit(data, epochs=args.epochs, validation_data=(x_val, y_val), verbose=2, shuffle=False,
                        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=report_val)])

    accuracy = epoch_accuracy[-1]
    os.makedirs(args.output, exist_ok=True)
    backbone.save_weights(os.path.join(args.output, WEIGHTS_FILE))
    report = {
        "encoder": args.encoder,
        "image_size": args.image_size,
        "small_cnn_grid": args.small_cnn_grid,
        "settings": vars(args),
        "train_images": len(x_train),
        "val_images": len(x_val),
        "final_loss": {k: float(v[-1]) for k, v in history.history.items()},
        "val_group_accuracy": accuracy,
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(args.output, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    print("val accuracy (every label of the group right): " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    quiet.setup_when_command_line(argv)
    try:
        run(argv)
    except cli.UsageError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
