"""The captioning job against the model alone: its ceiling, a hand-written loop, per encoder.

    python bench/job_vs_model.py ceiling [--images 2000] [--size 256] [--rounds 3] [--batches 16,32,64,128]
    python bench/job_vs_model.py loop [--images 2000] [--loop_images 200] [--corpus small|large] [--rounds 3]
    python bench/job_vs_model.py encoders [--encoders small_cnn,mobilenet_v3_small] [--images 1000]
                                          [--rounds 2] [--batches 32,64,128,256] [--require_gpu]
    (all: [--head N] [--job_args "..."] [--out FILE] [--fold NAME])

One process; every round runs each side once, in order, so all see the same machine load,
and medians over rounds are reported. The sides:

  job          the real job (`batch_caption.run`, DirectRunner in memory, bundled model,
               default flags plus --job_args) over a fixed corpus (`corpora`), real output
               to a temp dir. Steady: images / (elapsed_seconds - model_wait_ms), all the
               run's work except the time its first batch stood waiting for the model load
               (whose CPU, beside the first decodes, stays in). Wall: the whole call.
  job at scale (images - head) / (T(images) - T(head)), T the steady time of the full run
               and of a run over the corpus's first --head images in the same round: the
               per-image rate without a run's fixed cost.
  ceiling      (`ceiling`) the same bundle's model as the job loads it (its --runtime:
               LiteRT's compiled graph by default) on pre-decoded uint8 arrays, texts
               included, at each batch size of --batches; the best median is the ceiling.
  loop         (`loop`) what one writes by hand, im2txt style: per file PIL open, full
               decode, BICUBIC resize, caption alone (batch 1), on the first --loop_images.
               Its captions are compared with the job's.
  decode + ceiling  the job's decoding (its config and thread count) feeding the Captioner
               in batches of the job's size, bytes already in memory, no Beam: what any
               pipeline could reach here.

`encoders` runs job and ceiling for bundles with random weights, one per encoder (the
bundled model's decoder at the encoder's usual input side), on whatever device TensorFlow
sees: the script for a GPU machine (`--require_gpu` refuses a CPU-only TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time

import _common as c
import corpora


def loop_pass(captioner, paths: list[str]) -> tuple[float, dict[str, str]]:
    """Seconds to caption `paths` one by one, and each file name's best caption."""
    import numpy as np
    from PIL import Image

    size = captioner.image_size
    captions = {}
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        captions[os.path.basename(path)] = captioner.caption(pixels[None])[0][0].text
    return time.perf_counter() - start, captions


def compare(args, argv) -> int:
    """`ceiling` and `loop`: job, head, [ceiling sweep], [loop], decode + ceiling per round."""
    import numpy as np

    against = args.command
    paths = corpora.by_flag(args.corpus, args.images, args.size)
    input_dir = os.path.dirname(paths[0])
    head = (args.images // 10 if against == "loop" else 200) if args.head is None else args.head
    # The same first images in a directory of their own: the same matching as the full run.
    head_dir = os.path.dirname(corpora.by_flag(args.corpus, head, args.size)[0]) if 0 < head < args.images else None
    extra = shlex.split(args.job_args)
    config = c.job_config(input_dir, extra)
    captioner = c.load_job_model(config)  # the job's model, runtime and search
    size, draft = captioner.image_size, config.draft
    datas = [open(path, "rb").read() for path in paths]
    n = len(paths)
    batches = [int(b) for b in args.batches.split(",")] if against == "ceiling" else []
    if batches:
        pixels = np.stack([c.decode(data, size, draft) for data in datas])
        captioner.caption(pixels[: batches[0]])  # trace once; the signature's batch axis is None
    else:
        captioner.warm_up()
    loop_paths = paths[: args.loop_images] if against == "loop" else []
    captions: dict[str, dict] = {}

    work = tempfile.mkdtemp(prefix="bench_job_")

    def job(r):
        got = c.job_round(input_dir, work, f"r{r}", extra, captions=bool(loop_paths) and "job" not in captions)
        captions.setdefault("job", got.pop("captions", None))
        return got

    sides = {"job": job}
    if head_dir:
        sides["job_head"] = lambda r: c.job_round(head_dir, work, f"h{r}", extra)
    # Every batch size every round: one sweep pass each can pick a low ceiling on a noisy machine.
    for b in batches:
        sides[f"ceiling_{b}"] = lambda r, b=b: ceiling_rate(captioner, pixels, b)
    if loop_paths:
        def loop(r):
            seconds, got = loop_pass(captioner, loop_paths)
            captions.setdefault("loop", got)
            return len(loop_paths) / seconds
        sides["loop"] = loop
    sides["decode_and_ceiling"] = lambda r: per_image(
        c.decode_and_caption_pass(captioner, datas, size, draft, config.batch_size, config.read_threads), n)
    try:
        rounds = c.alternate(args.rounds, sides, log=c.log_round)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    jobs, heads = rounds["job"], rounds.get("job_head", [])
    steady, wall = c.median_job_rates(jobs)
    at_scale = c.median([c.marginal_rate(j, h) for j, h in zip(jobs, heads)]) if heads else None
    bound, bound_cpu = [x[0] for x in rounds["decode_and_ceiling"]], [x[1] for x in rounds["decode_and_ceiling"]]
    no_beam = c.median(bound)
    medians = {"job_steady": steady, "job_wall": wall, "job_at_scale": at_scale, "decode_and_ceiling": no_beam}
    report = {"model": captioner.model_id, "settings": vars(args), "images": n, "corpus": input_dir,
              "job_batch_size": jobs[0]["batch_size"], "decode_threads": config.read_threads,
              "head_images": head if heads else 0}
    table = [(f"decode + ceiling: {config.read_threads} decode threads feeding the Captioner, no Beam", no_beam),
             (f"job, steady (excl. the wait for the model, {c.median(jobs, lambda j: j['model_wait_s']):.2f} s)", steady),
             ("job, wall (whole run.run call)", wall)]
    if at_scale:
        table.append((f"job at scale: ({n} - {head}) / (T({n}) - T({head})), steady times", at_scale))
    if batches:
        sweep = {b: c.median(rounds[f"ceiling_{b}"], lambda x: x[0]) for b in batches}
        best = max(sweep, key=sweep.get)
        top = sweep[best]
        medians["ceiling"] = top
        ceiling_cpu = [x[1] for x in rounds[f"ceiling_{best}"]]
        report.update({
            "ceiling_sweep_images_per_s": sweep, "ceiling_batch": best,
            "rounds": {"job": jobs, "job_head": heads, "ceiling_images_per_s": [x[0] for x in rounds[f"ceiling_{best}"]],
                       "ceiling_cpu_s_per_image": ceiling_cpu, "decode_and_ceiling_images_per_s": bound,
                       "decode_and_ceiling_cpu_s_per_image": bound_cpu},
            "median_images_per_s": medians,
            "job_at_scale_over_ceiling": at_scale / top if at_scale else None,
            "job_steady_over_ceiling": steady / top,
            "job_wall_over_ceiling": wall / top,
            "decode_and_ceiling_over_ceiling": no_beam / top,
            "job_steady_over_decode_and_ceiling": steady / no_beam,
            "job_model_load_s_median": c.median(jobs, lambda j: j["model_load_s"]),
            "job_model_wait_s_median": c.median(jobs, lambda j: j["model_wait_s"]),
            "cpu_ms_per_image_median": {"job": 1000 * c.median(jobs, lambda j: j["cpu_s"] / j["captioned"]),
                                        "ceiling": 1000 * c.median(ceiling_cpu),
                                        "decode_and_ceiling": 1000 * c.median(bound_cpu)},
        })
        reference, name = top, "ceiling"
        table.insert(0, (f"ceiling: Captioner, pre-decoded, batch {best}", top))
    else:
        per_image_loop = c.median(rounds["loop"])
        medians["loop"] = per_image_loop
        same = sum(captions["job"].get(name) == text for name, text in captions["loop"].items())
        report.update({
            "loop_images": len(loop_paths),
            "rounds": {"job": jobs, "job_head": heads, "loop_images_per_s": rounds["loop"],
                       "decode_and_ceiling_images_per_s": bound},
            "median_images_per_s": medians,
            "job_at_scale_over_loop": at_scale / per_image_loop if at_scale else None,
            "job_steady_over_loop": steady / per_image_loop,
            "job_wall_over_loop": wall / per_image_loop,
            "decode_and_ceiling_over_loop": no_beam / per_image_loop,
            "job_steady_over_decode_and_ceiling": steady / no_beam,
            "loop_seconds_per_image": 1 / per_image_loop,
            "loop_captions_equal_to_job": f"{same}/{len(loop_paths)}",
        })
        reference, name = per_image_loop, "loop"
        table.insert(0, (f"loop: PIL full decode + resize, batch 1 ({len(loop_paths)} images)", per_image_loop))
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {n} images ({args.corpus} corpus) | images/s (median of {args.rounds}) | / {name} |\n| --- | --- | --- |")
    for label, rate in table:
        print(f"| {label} | {rate:.1f} | {rate / reference:.2f} |")
    c.write_report(args, argv, "job_vs_model.py", report)
    return 0


def ceiling_rate(captioner, pixels, batch: int) -> tuple[float, float]:
    """(images/s, CPU s per image) of one ceiling pass."""
    return per_image(c.ceiling_pass(captioner, pixels, batch), len(pixels))


def per_image(seconds: tuple[float, float], n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of a pass over n images -> (images/s, CPU s per image)."""
    return n / seconds[0], seconds[1] / n


def per_encoder(args, argv) -> int:
    """`encoders`: job and ceiling for a random-weight bundle per encoder."""
    import numpy as np
    import tensorflow as tf

    names = c.encoder_names(args.parser, args.encoders)
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    if args.require_gpu and not gpus:
        print("job_vs_model.py encoders: --require_gpu, but TensorFlow sees no GPU", file=sys.stderr)
        return 2
    tf.get_logger().setLevel("ERROR")  # one Captioner per encoder: TF warns of "retracing" across them
    paths = corpora.small_images(args.images, 256)
    input_dir = os.path.dirname(paths[0])
    datas = [open(path, "rb").read() for path in paths]
    batches = [int(b) for b in args.batches.split(",")]
    work = tempfile.mkdtemp(prefix="bench_encoders_")
    setups: dict[str, dict] = {}
    try:
        for name in names:
            model, vocabulary, _ = c.random_model(name)
            model_dir = os.path.join(work, f"bundle_{name}")
            c.save_bundle(model, vocabulary, model_dir)
            captioner = c.load_captioner(model_dir)  # the bundle as the job loads it
            pixels = np.stack([c.decode(data, captioner.image_size) for data in datas])
            captioner.caption(pixels[: batches[0]])  # trace once; the batch axis is None
            sweep = {b: ceiling_rate(captioner, pixels, b)[0] for b in batches}
            setups[name] = {"model_dir": model_dir, "captioner": captioner, "pixels": pixels, "sweep": sweep,
                            "best_batch": max(sweep, key=sweep.get)}
            c.say(f"{name}: ceiling sweep " + ", ".join(f"{b}: {v:.1f}" for b, v in sweep.items()))
        sides = {}
        for name, s in setups.items():
            sides[f"{name} job"] = lambda r, name=name, s=s: c.job_round(input_dir, work, f"{name}_r{r}",
                                                                          ["--model", s["model_dir"]])
            sides[f"{name} ceiling"] = lambda r, s=s: ceiling_rate(s["captioner"], s["pixels"], s["best_batch"])[0]
        rounds = c.alternate(args.rounds, sides, log=c.log_round)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {}
    for name, s in setups.items():
        jobs = rounds[f"{name} job"]
        steady, wall = c.median_job_rates(jobs)
        top = c.median(rounds[f"{name} ceiling"])
        results[name] = {
            "image_size": c.USUAL_SIZE[name], "ceiling_sweep_images_per_s": s["sweep"], "ceiling_batch": s["best_batch"],
            "job_batch_size": jobs[0]["batch_size"],
            "rounds": {"job": jobs, "ceiling_images_per_s": rounds[f"{name} ceiling"]},
            "median_images_per_s": {"job_steady": steady, "job_wall": wall, "ceiling": top},
            "job_steady_over_ceiling": steady / top, "job_wall_over_ceiling": wall / top,
        }
    device = f"GPU ({', '.join(gpus)})" if gpus else f"CPU only ({os.cpu_count()} cores)"
    print(f"| encoder ({device}) | input | ceiling img/s (batch) | job img/s steady / wall (batch) | job / ceiling |")
    print("| --- | --- | --- | --- | --- |")
    for name, res in results.items():
        m = res["median_images_per_s"]
        print(f"| {name} | {res['image_size']} | {m['ceiling']:.1f} ({res['ceiling_batch']}) | {m['job_steady']:.1f} / "
              f"{m['job_wall']:.1f} ({res['job_batch_size']}) | {res['job_steady_over_ceiling']:.2f} |")
    c.write_report(args, argv, "job_vs_model.py", {"device": device, "tensorflow": tf.__version__,
                                                   "settings": {k: v for k, v in vars(args).items() if k != "parser"},
                                                   "images": len(paths), "corpus": input_dir, "encoders": results})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ceiling = sub.add_parser("ceiling", help="the job against the Captioner on pre-decoded images")
    loop = sub.add_parser("loop", help="the job against a hand-written per-image loop")
    encoders = sub.add_parser("encoders", help="job and ceiling per encoder, random weights (the GPU script)")
    for q, name, images in ((ceiling, "job_vs_ceiling", 2000), (loop, "job_vs_loop", 2000),
                            (encoders, "job_per_encoder", 1000)):
        q.add_argument("--images", type=int, default=images, help="job corpus size")
        q.add_argument("--rounds", type=int, default=3 if q is not encoders else 2)
        c.add_out_flags(q, name)
    for q in (ceiling, loop):
        q.add_argument("--size", type=int, default=256, help="small corpus image side in pixels")
        q.add_argument("--head", type=int, default=None,
                       help="images of a second, smaller job run each round, for the job at scale "
                            "(default: 200 for ceiling, a tenth of --images for loop; 0: none)")
        q.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
    ceiling.set_defaults(corpus="small", loop_images=0)
    ceiling.add_argument("--batches", default="16,32,64,128", help="ceiling batch sizes to sweep")
    corpora.add_corpus_flag(loop)
    loop.add_argument("--loop_images", type=int, default=200, help="the loop captions the first N images")
    encoders.add_argument("--encoders", default="small_cnn,mobilenet_v3_small", help="comma-separated, two or more")
    encoders.add_argument("--batches", default="32,64,128,256", help="ceiling batch sizes to sweep")
    encoders.add_argument("--require_gpu", action="store_true", help="exit 2 unless TensorFlow sees a GPU")
    args = p.parse_args(argv)
    if args.command == "encoders":
        args.parser = encoders
        return per_encoder(args, argv)
    return compare(args, argv)


if __name__ == "__main__":
    sys.exit(main())
