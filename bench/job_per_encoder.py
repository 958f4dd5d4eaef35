"""The job and its ceiling for several encoders, on whatever device TensorFlow sees.

    python bench/job_per_encoder.py [--encoders small_cnn,mobilenet_v3_small] [--images 1000]
                                    [--rounds 2] [--batches 32,64,128,256] [--require_gpu]
                                    [--out bench/results/job_per_encoder.json]

This is the GPU script of the performance issue: on a machine whose TensorFlow sees a GPU
it measures the job and the ceiling there (`--require_gpu` refuses to run otherwise); on a
CPU-only machine it measures the same on the CPU. For each encoder a model bundle with
random weights is written to a temp dir (`encoders.random_model`: the bundled model's
decoder, the encoder's usual input side, no download; the bundle is saved with
`bundle.save_bundle`, as training exports one). Then, per encoder:

- ceiling: that bundle's Captioner on images decoded beforehand (the job's own
  `images.decode_image` at the encoder's input side), at the best batch size of a sweep;
- job: the real job (`batch_caption.run.run`, DirectRunner in memory, `--model` that
  bundle, every other flag at its default, batch size included) over the fixed small
  corpus (`corpora.small_images`, 256 px JPEG), steady and wall as in job_vs_ceiling.py.

After the sweeps, rounds alternate over encoders and sides (job, ceiling, job, ceiling,
...) so every measurement sees the same machine load; medians are reported, with
job / ceiling per encoder. With random weights the decoder seldom emits the end token, so
beam search runs all its steps: an upper bound of a trained decoder's cost, the same for
every encoder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import numpy as np
from _common import write_report

import corpora
from encoders import USUAL_SIZE, encoder_names, random_model
from job_vs_ceiling import ceiling_pass, job_rates, job_round, median_job_rates


def main(argv=None) -> int:
    from batch_caption.model.config import ENCODERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default="small_cnn,mobilenet_v3_small",
                   help="comma-separated, one or more of " + ",".join(ENCODERS) + " (the GPU point asks for two)")
    p.add_argument("--images", type=int, default=1000, help="small corpus size (256 px JPEG)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="32,64,128,256", help="ceiling batch sizes to sweep")
    p.add_argument("--require_gpu", action="store_true", help="exit 2 unless TensorFlow sees a GPU")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "job_per_encoder.json"))
    args = p.parse_args(argv)
    names = encoder_names(p, args.encoders)

    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    if args.require_gpu and not gpus:
        print("job_per_encoder.py: --require_gpu, but TensorFlow sees no GPU", file=sys.stderr)
        return 2
    tf.get_logger().setLevel("ERROR")  # one Captioner per encoder: TF warns of "retracing" across them

    from batch_caption import images
    from batch_caption.model import bundle
    from batch_caption.model.bundle import load_captioner

    paths = corpora.small_images(args.images, 256)
    input_dir = os.path.dirname(paths[0])
    datas = [open(path, "rb").read() for path in paths]
    batches = [int(b) for b in args.batches.split(",")]
    work = tempfile.mkdtemp(prefix="bench_encoders_")
    setups: dict[str, dict] = {}
    try:
        for name in names:
            model, vocabulary, _ = random_model(name)
            model_dir = os.path.join(work, f"bundle_{name}")
            bundle.save_bundle(model, vocabulary, model_dir)
            captioner = load_captioner(model_dir)  # the bundle as the job loads it
            config = images.ImageConfig(image_size=captioner.image_size)
            pixels = np.stack([images.decode_image(data, config).pixels for data in datas])
            captioner.caption(pixels[: batches[0]])  # trace once; the batch axis is None
            sweep = {b: len(pixels) / ceiling_pass(captioner, pixels, b)[0] for b in batches}
            setups[name] = {"model_dir": model_dir, "captioner": captioner, "pixels": pixels, "sweep": sweep,
                            "best_batch": max(sweep, key=sweep.get), "jobs": [], "ceiling": []}
            print(f"{name}: ceiling sweep " + ", ".join(f"{b}: {v:.1f}" for b, v in sweep.items()), file=sys.stderr)

        for r in range(args.rounds):
            for name, s in setups.items():
                s["jobs"].append(job_round(input_dir, work, f"{name}_r{r}", ["--model", s["model_dir"]]))
                shutil.rmtree(os.path.join(work, f"run={name}_r{r}"))
                s["ceiling"].append(len(s["pixels"]) / ceiling_pass(s["captioner"], s["pixels"], s["best_batch"])[0])
                print(f"round {r}: {name}: job %.1f img/s steady, %.1f wall; ceiling {s['ceiling'][-1]:.1f} img/s"
                      % job_rates(s["jobs"][-1]), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for name, s in setups.items():
        steady, wall = median_job_rates(s["jobs"])
        top = statistics.median(s["ceiling"])
        results[name] = {
            "image_size": USUAL_SIZE[name],
            "ceiling_sweep_images_per_s": s["sweep"],
            "ceiling_batch": s["best_batch"],
            "job_batch_size": s["jobs"][0]["batch_size"],
            "rounds": {"job": s["jobs"], "ceiling_images_per_s": s["ceiling"]},
            "median_images_per_s": {"job_steady": steady, "job_wall": wall, "ceiling": top},
            "job_steady_over_ceiling": steady / top,
            "job_wall_over_ceiling": wall / top,
        }
    device = f"GPU ({', '.join(gpus)})" if gpus else f"CPU only ({os.cpu_count()} cores)"
    report = {"device": device, "tensorflow": tf.__version__, "settings": vars(args), "images": len(paths),
              "corpus": input_dir, "encoders": results}
    print(f"\n| encoder ({device}) | input | ceiling img/s (batch) | job img/s steady / wall (batch) | job / ceiling |")
    print("| --- | --- | --- | --- | --- |")
    for name, res in results.items():
        m = res["median_images_per_s"]
        print(f"| {name} | {res['image_size']} | {m['ceiling']:.1f} ({res['ceiling_batch']}) | "
              f"{m['job_steady']:.1f} / {m['job_wall']:.1f} ({res['job_batch_size']}) | "
              f"{res['job_steady_over_ceiling']:.2f} |")
    print(f"\n{len(paths)} images of 256 px, random weights, median of {args.rounds} alternating rounds")
    write_report(args.out, argv, "job_per_encoder.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
