"""The low_score threshold of a model of real photos, from a job run over held-out photos.

    python bench/low_score_photos.py --run RUN_DIR [--model flickr8k] [--percentile 5] [--ood 64]
                                     [--out bench/results/low_score_flickr8k.json]

RUN_DIR is a finished run of the job, with the model's default search, over photos it
never trained on (jobs/train_flickr8k.sh captions the Flickr8k dev split with the shipped
bundle: flickr8k_work/runs/run=shipped-val). Rule: the
--percentile-th percentile of those captions' scores, rounded to 0.01, so that about that
share of in-domain captions is flagged. Beside it, the model captions the package's sample
photos and generated images unlike any photo (bench/low_score.py's noise, gradients,
clouds, stripes and 1/f noise, --ood of each, at the model's input size) and the report
says which share of each set the threshold flags. bench/flags_on_photos.py says whether
the flagged dev captions are the bad ones.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

import _common as c
from low_score import OOD_KINDS, best_captions, ood_images, summary


def run_scores(run_dir: str) -> tuple[np.ndarray, str, dict]:
    """(the best caption's score of every caption record, the model id, the decode settings)."""
    records = []
    for shard in sorted(glob.glob(os.path.join(run_dir, "captions-*.jsonl"))):
        with open(shard) as f:
            records += [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit(f"no caption records in {run_dir}")
    return np.asarray([r["score"] for r in records]), records[0]["model"], records[0]["decode"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished job run over held-out photos")
    p.add_argument("--model", default="flickr8k", help="the bundled model name or bundle the run used")
    p.add_argument("--percentile", type=float, default=5.0, help="share of held-out captions to flag, in percent")
    p.add_argument("--ood", type=int, default=64, help="generated images of each kind unlike photos")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    c.add_out_flags(p, "low_score_flickr8k")
    args = p.parse_args(argv)
    if not 0 < args.percentile < 50 or args.ood < 1:
        p.error("need 0 < --percentile < 50 and --ood >= 1")
    from batch_caption import bundled
    from batch_caption.model.config import DecodeConfig

    scores, model_id, decode = run_scores(args.run)
    captioner = c.load_captioner(bundled.resolve(args.model), DecodeConfig(**decode))
    if captioner.model_id != model_id:
        raise SystemExit(f"{args.run} was captioned by {model_id}, not by {args.model} ({captioner.model_id})")
    threshold = round(float(np.percentile(scores, args.percentile)), 2)
    size = captioner.image_size
    model = bundled.find(args.model)
    samples = model.sample_files() if model else []
    sets = {"samples": np.stack([c.decode(open(f, "rb").read(), size) for f in samples])} if samples else {}
    sets.update({kind: ood_images(kind, args.ood, size, args.seed) for kind in OOD_KINDS})
    results = {"held_out": {"n": int(scores.size), "flagged": round(float(np.mean(scores < threshold)), 4),
                            "percentiles": {f"p{q}": round(float(np.percentile(scores, q)), 4)
                                            for q in (1, 5, 25, 50, 75, 95)}}}
    for name, pixels in sets.items():
        results[name] = summary(best_captions(captioner, pixels), threshold)
        c.say(f"{name}: {len(pixels)} images captioned")
    ood_flagged = float(np.mean([results[k]["flagged"] for k in OOD_KINDS]))
    print("| set | n | low_score flags |")
    print("| --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['n']} | {r['flagged']:.1%} |")
    print(f"\nlow_score = {threshold}   (p{args.percentile:g} of {scores.size} held-out captions; "
          f"{ood_flagged:.0%} of the generated images unlike photos)")
    c.write_report(args, argv, "low_score_photos.py", {
        "model": model_id, "decode": decode, "threshold": threshold, "ood_flagged": round(ood_flagged, 4),
        "rule": f"percentile {args.percentile:g} of the held-out run's best-caption scores, rounded to 0.01",
        "sets": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
