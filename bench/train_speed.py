"""Decoder training speed: precomputed CNN features vs end to end through the CNN.

    python bench/train_speed.py [--steps 60] [--rounds 2] [--image_size 128] [--out bench/results/train_speed.json]

Prepares one small synthetic dataset twice (images; features of the same small_cnn
weights), then trains the same decoder on each, alternating A B A B in separate
processes (the real `python -m batch_caption.train`), and reports the steady-state
examples/s of each and their ratio. Absolute numbers depend on the machine and its load;
the ratio, measured side by side, is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import _common as c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    c.add_out_flags(p, "train_speed")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="bench_train_")
    # The encoder whose features the features-mode dataset stores (and whose weights the
    # features-mode bundle carries).
    weights = os.path.join(work, "small_cnn.weights.h5")
    c.run_child(["-c", (
        "from batch_caption.model.config import ModelConfig; from batch_caption.model.encoder import build_backbone;"
        f"build_backbone(ModelConfig(vocab_size=10, image_size={args.image_size})).save_weights({weights!r})")])
    counts = "train=600,val=40"
    common = ["--source", "synthetic", "--synthetic_counts", counts, "--image_size", str(args.image_size),
              "--min_word_count", "1"]
    c.run_child(["-m", "batch_caption.prepare", *common, "--output", os.path.join(work, "images")])
    c.run_child(["-m", "batch_caption.prepare", *common, "--output", os.path.join(work, "features"),
          "--precompute_features", "--encoder", "small_cnn", "--encoder_weights", weights])

    rates: dict[str, list[float]] = {"images": [], "features": []}
    for r in range(args.rounds):
        for mode in ("images", "features"):
            out_dir = os.path.join(work, f"train_{mode}_{r}")
            stdout = c.run_child(["-m", "batch_caption.train", "--data", os.path.join(work, mode), "--output", out_dir,
                           "--steps", str(args.steps), "--global_batch_size", str(args.batch),
                           "--embedding_size", "128", "--lstm_units", "256", "--log_every", str(args.steps),
                           "--checkpoint_every", str(args.steps), "--eval_every", str(10 * args.steps)])
            result = json.loads(stdout.strip().splitlines()[-1])
            rates[mode].append(result["examples_per_second"])
            print(f"round {r} {mode:8s} {result['examples_per_second']:8.1f} ex/s", flush=True)

    images, features = statistics.median(rates["images"]), statistics.median(rates["features"])
    report = {
        "settings": vars(args),
        "examples_per_second": rates,
        "median": {"images": images, "features": features},
        "features_over_images": features / images,
    }
    print(f"\n| mode | examples/s (median of {args.rounds}) |\n| --- | --- |")
    print(f"| end to end (images) | {images:.1f} |\n| precomputed features | {features:.1f} |")
    print(f"\nfeatures / images = {features / images:.2f}x")
    c.write_report(args, argv, "train_speed.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
