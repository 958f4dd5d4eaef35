"""The scenes model's low_score threshold: its scores on held-out scenes and on images unlike training.

    python bench/low_score.py [--model scenes|BUNDLE] [--scenes 1000] [--seed 0] [--ood 64]
                              [--percentile 1] [--out bench/results/low_score_scenes.json]

Captions every image with the model as the job does (the job's default decode settings)
and takes the best caption's score, for these sets:
  scenes     the first --scenes scenes of the val split of --seed (batch_caption.data;
             the split training only validates on; the test split is left to evaluation)
  samples    the scenes model's sample images (batch_caption/samples/scenes), decoded as
             the job decodes them
  noise      uniform RGB noise                         --ood images of each kind
  gradients  smooth two-colour linear gradients
  clouds     smooth multi-scale colour noise
  stripes    sinusoidal stripes and checkers, two random colours
  natural    1/f ("pink") colour noise: the power spectrum of natural photos
Rule: the threshold is the --percentile-th percentile of the scene scores, rounded to two
decimals, so that about that share of in-distribution captions is flagged. Prints each
set's score percentiles, the share of each set the threshold flags, and the threshold
(batch_caption/bundled.py holds each bundled model's as its `low_score`). When images
unlike training score like scenes, it says so: the threshold then marks only the model's
least confident scene captions, not foreign images.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

import _common as c

PERCENTILES = (1, 5, 25, 50, 75, 95)
OOD_KINDS = ("noise", "gradients", "clouds", "stripes", "natural")
BATCH = 32
SCENES = "scenes"  # the bundled model these scenes calibrate


def _noise(rng, s):
    return rng.uniform(0, 255, (s, s, 3))


def _gradient(rng, s):
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:s, 0:s] / (s - 1)
    t = (np.cos(angle) * x + np.sin(angle) * y)
    t = (t - t.min()) / (t.max() - t.min())
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return a + t[:, :, None] * (b - a)


def _clouds(rng, s):
    from PIL import Image

    out = np.zeros((s, s, 3))
    for cells in (2, 4, 8, 16):  # coarse to fine, each octave half as strong
        small = rng.uniform(-1, 1, (cells, cells, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(small[:, :, k]).resize((s, s), Image.BICUBIC)) for k in range(3)], 2)
        out += up * (8 / cells)
    return 127.5 + 60 * out


def _stripes(rng, s):
    y, x = np.mgrid[0:s, 0:s]
    freq, angle = rng.uniform(2, 20) * 2 * math.pi / s, rng.uniform(0, math.pi)
    wave = np.sin(freq * (np.cos(angle) * x + np.sin(angle) * y))
    if rng.random() < 0.5:  # a checker: the product of two crossed gratings
        wave = np.sign(wave * np.sin(freq * (-np.sin(angle) * x + np.cos(angle) * y)))
    t = (wave + 1) / 2
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return a + t[:, :, None] * (b - a)


def _natural(rng, s):
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(s), np.fft.fftfreq(s)))
    f[0, 0] = 1.0
    channels = []
    base = np.fft.ifft2(np.fft.fft2(rng.normal(size=(s, s))) / f).real
    for _ in range(3):  # channels share most of their structure, as in photos
        own = np.fft.ifft2(np.fft.fft2(rng.normal(size=(s, s))) / f).real
        channels.append(0.8 * base + 0.2 * own)
    img = np.stack(channels, 2)
    return 127.5 + 60 * (img - img.mean()) / img.std()


MAKERS = {"noise": _noise, "gradients": _gradient, "clouds": _clouds, "stripes": _stripes, "natural": _natural}


def ood_images(kind: str, n: int, size: int, seed: int) -> np.ndarray:
    """n generated images of `kind`, uint8 [n, size, size, 3], the same for the same seed."""
    rng = np.random.default_rng([seed, OOD_KINDS.index(kind)])
    return np.stack([np.clip(np.rint(MAKERS[kind](rng, size)), 0, 255).astype(np.uint8) for _ in range(n)])


def val_scenes(n: int, size: int, seed: int) -> tuple[list, np.ndarray]:
    """The first n val-split scenes of `seed` and their images rendered at `size`."""
    from batch_caption.data import scenes

    config = scenes.SceneConfig(image_size=size)
    val = scenes.generate_scenes("val", n, seed, config)
    return val, np.stack([np.asarray(scenes.render_scene(s, config)) for s in val])


def sample_images(size: int) -> np.ndarray:
    """The scenes model's sample images as the job decodes them."""
    from batch_caption import bundled

    datas = []
    for path in bundled.BUNDLED[SCENES].sample_files():
        with open(path, "rb") as f:
            datas.append(f.read())
    return np.stack([c.decode(data, size) for data in datas])


def best_captions(captioner, pixels: np.ndarray) -> list:
    """The best caption (a Caption) of every image."""
    out = []
    for i in range(0, len(pixels), BATCH):
        out += [row[0] for row in captioner.caption(pixels[i : i + BATCH])]
    return out


def threshold_rule(scene_scores: np.ndarray, percentile: float) -> float:
    """The --percentile-th percentile of the scene scores, rounded to two decimals."""
    return round(float(np.percentile(scene_scores, percentile)), 2)


def summary(captions: list, threshold: float) -> dict:
    """A set's score percentiles and the share of its captions each flag marks."""
    from batch_caption import quality

    scores = np.asarray([x.score for x in captions])
    flags = [quality.caption_flags(x.text, x.score, threshold, x.truncated) for x in captions]
    return {"n": len(scores), "percentiles": {f"p{p}": round(float(np.percentile(scores, p)), 4) for p in PERCENTILES},
            "min": round(float(scores.min()), 4), "max": round(float(scores.max()), 4),
            "flagged": round(float(np.mean(scores < threshold)), 4),
            "flags": {f: round(sum(f in fl for fl in flags) / len(flags), 4) for f in quality.FLAGS}}


def accuracy_by_flag(scenes: list, captions: list, threshold: float) -> dict:
    """Content accuracy (every statement true, batch_caption.data.facts) of the scene
    captions low_score flags and of the others: what a flag is worth."""
    from batch_caption.data import facts

    correct = np.asarray([facts.check_caption(x.text, s.to_facts()).correct for s, x in zip(scenes, captions)])
    low = np.asarray([x.score < threshold for x in captions])
    return {name: {"n": int(part.sum()), "accuracy": round(float(correct[part].mean()), 4) if part.any() else None}
            for name, part in (("flagged", low), ("unflagged", ~low))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=SCENES, help=f"bundled model name or bundle (default: {SCENES})")
    p.add_argument("--scenes", type=int, default=1000, help="held-out scenes (val split)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (the scenes model's training seed)")
    p.add_argument("--ood", type=int, default=64, help="generated images of each kind unlike training")
    p.add_argument("--percentile", type=float, default=1.0, help="share of scene captions to flag, in percent")
    c.add_out_flags(p, f"low_score_{SCENES}")
    args = p.parse_args(argv)
    if args.scenes < 100 or args.ood < 1 or not 0 < args.percentile < 50:
        p.error("need --scenes >= 100, --ood >= 1 and 0 < --percentile < 50")
    from batch_caption import bundled, quality

    samples = bundled.BUNDLED[SCENES].samples_dir
    decode = c.job_config(samples, []).decode  # the job's default search settings
    captioner = c.load_captioner(bundled.resolve(args.model), decode)
    size = captioner.image_size
    scenes, scene_pixels = val_scenes(args.scenes, size, args.seed)
    sets = {"scenes": scene_pixels, "samples": sample_images(size)}
    sets.update({kind: ood_images(kind, args.ood, size, args.seed) for kind in OOD_KINDS})
    captions = {}
    for name, pixels in sets.items():
        captions[name] = best_captions(captioner, pixels)
        c.say(f"{name}: {len(pixels)} images captioned")
    threshold = threshold_rule(np.asarray([x.score for x in captions["scenes"]]), args.percentile)
    results = {name: summary(x, threshold) for name, x in captions.items()}
    accuracy = accuracy_by_flag(scenes, captions["scenes"], threshold)
    ood_flagged = float(np.mean([x.score < threshold for k in OOD_KINDS for x in captions[k]]))
    separates = ood_flagged >= 0.5
    verdict = (f"low_score flags {ood_flagged:.0%} of the images unlike training" if separates else
               f"images unlike training score like scenes: low_score flags only {ood_flagged:.0%} of them; "
               f"it marks the model's least confident scene captions, not foreign images")

    print(f"| set | n | {' | '.join(f'p{q}' for q in PERCENTILES)} | low_score | truncated | repeated_ngram |")
    print("| --- " * (len(PERCENTILES) + 5) + "|")
    for name, r in results.items():
        cells = " | ".join(f"{v:.3f}" for v in r["percentiles"].values())
        rates = " | ".join(f"{r['flags'][f]:.1%}" for f in (quality.LOW_SCORE, quality.TRUNCATED, quality.REPEATED_NGRAM))
        print(f"| {name} | {r['n']} | {cells} | {rates} |")
    print(f"\nrule: p{args.percentile:g} of {args.scenes} val scenes (seed {args.seed}), rounded to 0.01")
    print(verdict)
    print("scene captions with every statement true: " + ", ".join(
        f"{name} {a['accuracy']:.1%} of {a['n']}" if a["n"] else f"{name}: none" for name, a in accuracy.items()))
    known = bundled.find(args.model)
    held = f"batch_caption/bundled.py has {known.low_score} for {known.name}" if known else "not a bundled model"
    print(f"\nlow_score = {threshold}   ({held})")
    c.write_report(args, argv, "low_score.py", {
        "model": captioner.model_id, "decode": decode.to_dict(),
        "rule": f"percentile {args.percentile:g} of the val scenes' best-caption scores, rounded to 0.01",
        "threshold": threshold, "ood_flagged": round(ood_flagged, 4), "separates_ood": separates,
        "verdict": verdict, "scene_accuracy": accuracy, "sets": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
