"""Captioning throughput per CNN encoder on this machine's CPU (random weights).

    python bench/encoders.py [--batch 16] [--rounds 3] [--encoders small_cnn,resnet50,...] [--out bench/results/encoders.json]

For every encoder in `batch_caption.model.config.ENCODERS`, one Show-and-Tell model is
built exactly as a bundle builds it (`ShowAndTell(ModelConfig(...))`, random weights:
`encoder_weights=None`, no download) with the bundled model's decoder (its vocabulary,
embedding and LSTM sizes), at the encoder's usual input side (small_cnn 128, MobileNetV3
and EfficientNetB0 and ResNet50 224, InceptionV3 299). Two things are timed on the same
pre-decoded batch of synthetic scenes, after a warm-up call of each:

- `caption`: `Captioner.search`, the job's model call: uint8 pixels -> backbone -> LSTM
  beam search (k=3, max 20 tokens, 3 alternatives) -> n-best token ids.
- `encoder`: the backbone alone (`model.encode` in a `tf.function`), uint8 -> features.

Rounds alternate over the encoders (A B C ... A B C ...) so all see the same machine load;
the result is the median seconds per batch -> images/s, and the ratio to small_cnn.
With random weights the decoder seldom emits the end token, so beam search mostly runs
all 20 steps: its cost is the same for every encoder (same decoder, same batch) and is
the upper bound of what a trained decoder costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from _common import write_report

USUAL_SIZE = {
    "small_cnn": 128,
    "mobilenet_v3_small": 224,
    "mobilenet_v3_large": 224,
    "efficientnet_b0": 224,
    "inception_v3": 299,
    "resnet50": 224,
}


def encoder_names(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """A comma-separated --encoders value -> names; an unknown one is a usage error."""
    from batch_caption.model.config import ENCODERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENCODERS]
    if unknown or not names:
        parser.error(f"unknown encoder(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ENCODERS)}")
    return names


def random_model(name: str):
    """(ShowAndTell with random weights, Vocabulary, the bundled ModelConfig) for encoder
    `name` at its usual input side, with the bundled model's decoder; no download."""
    from batch_caption import run
    from batch_caption.model import bundle
    from batch_caption.model.config import ModelConfig
    from batch_caption.model.show_and_tell import ShowAndTell
    from batch_caption.model.vocab import Vocabulary

    base = ModelConfig.from_dict(json.loads(bundle.read_bytes(os.path.join(run.DEFAULT_MODEL, "config.json"))))
    vocabulary = Vocabulary.from_json(bundle.read_bytes(os.path.join(run.DEFAULT_MODEL, "vocab.json")).decode())
    config = ModelConfig(
        vocab_size=len(vocabulary), encoder=name, image_size=USUAL_SIZE[name], encoder_weights=None,
        train_encoder=False, image_input=base.image_input, embedding_size=base.embedding_size,
        lstm_units=base.lstm_units, max_length=base.max_length,
    )
    model = ShowAndTell(config)
    model.build_all()
    return model, vocabulary, base


def main(argv=None) -> int:
    from batch_caption.model.config import ENCODERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated subset of " + ",".join(ENCODERS))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "encoders.json"))
    args = p.parse_args(argv)
    names = encoder_names(p, args.encoders)

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # six Captioners each trace once: TF warns of "retracing" across them

    from batch_caption.data import scenes
    from batch_caption.model.captioner import Captioner
    from batch_caption.model.config import DecodeConfig

    decode = DecodeConfig(beam_size=3, max_length=20, num_alternatives=3)

    setups = {}
    for name in names:
        size = USUAL_SIZE[name]
        model, vocabulary, base = random_model(name)
        captioner = Captioner(model, vocabulary, decode)
        encode = tf.function(model.encode, input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        scene_config = scenes.SceneConfig(image_size=size)
        batch = np.stack([np.asarray(scenes.render_scene(s, scene_config))
                          for s in scenes.generate_scenes("test", args.batch, seed=7, config=scene_config)])
        calls = {"caption": lambda c=captioner, b=batch: c.search(b),
                 "encoder": lambda f=encode, b=batch: f(b).numpy()}
        for call in calls.values():
            call()  # trace + warm up
        setups[name] = {
            "image_size": size,
            "params": int(model.count_params()),
            "encoder_params": int(model.backbone.count_params()),
            "feature_size": model.feature_size,
            "calls": calls,
        }
        print(f"built {name} ({size} px, {setups[name]['encoder_params']:,} encoder parameters)", file=sys.stderr)

    times = {name: {"caption": [], "encoder": []} for name in names}
    for r in range(args.rounds):
        for name in names:
            for what, call in setups[name]["calls"].items():
                start = time.perf_counter()
                call()
                times[name][what].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    results = {}
    for name in names:
        med = {what: statistics.median(t) for what, t in times[name].items()}
        results[name] = {
            **{k: v for k, v in setups[name].items() if k != "calls"},
            "seconds_per_batch": times[name],
            "median_seconds_per_batch": med,
            "images_per_s": {what: args.batch / s for what, s in med.items()},
        }
    ref = results.get("small_cnn")
    for name, res in results.items():
        res["speed_vs_small_cnn"] = (
            {what: res["images_per_s"][what] / ref["images_per_s"][what] for what in ("caption", "encoder")}
            if ref else None
        )

    report = {
        "measured": "Captioner.search (backbone + beam search k=3, max 20 tokens) and the backbone alone, "
        "per batch, random weights, median over alternating rounds",
        "decoder": {"vocab_size": len(vocabulary), "image_input": base.image_input,
                    "embedding_size": base.embedding_size, "lstm_units": base.lstm_units},
        "decode": decode.to_dict(),
        "settings": vars(args),
        "tensorflow": tf.__version__,
        "encoders": results,
    }
    print("| encoder | input | encoder params | caption img/s | vs small_cnn | encoder-only img/s | vs small_cnn |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, res in results.items():
        ips, rel = res["images_per_s"], res["speed_vs_small_cnn"]
        rel_c = f"{rel['caption']:.2f}x" if rel else "-"
        rel_e = f"{rel['encoder']:.2f}x" if rel else "-"
        print(f"| {name} | {res['image_size']} | {res['encoder_params'] / 1e6:.2f} M | {ips['caption']:.1f} | {rel_c} "
              f"| {ips['encoder']:.1f} | {rel_e} |")
    print(f"\nbatch {args.batch}, median of {args.rounds} alternating rounds, random weights")
    write_report(args.out, argv, "encoders.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
