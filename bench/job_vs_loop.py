"""The captioning job against a hand-written per-image loop, on the bundled model.

    python bench/job_vs_loop.py [--images 2000] [--loop_images 200] [--size 256] [--rounds 3]
                                [--corpus small|large] [--head N] [--job_args "..."] [--out FILE]

One process, alternating rounds (J L J L ...) so both see the same machine load. The job
is the real one (`batch_caption.run.run`, DirectRunner in memory, default bundled model,
real output to a temp dir) over the fixed small corpus (`corpora.small_images`). The loop
is what one writes by hand in the im2txt style: for each file, open it with PIL, decode it
fully, resize it to the model's input size (BICUBIC, as the job), and caption it alone
(batch 1, the same Captioner and beam search settings). The loop runs on the first
`--loop_images` files of the same corpus (it is slow), so both are compared per image.
`--corpus large` uses the 12 MP photos of `corpora.large_photos` instead (e.g. `--images 200
--loop_images 20`), where the job's JPEG draft decoding also counts; the loop's captions
then come from other pixels and may differ from the job's.

Reported: images/s of the job (steady: excluding the time it waited for its one-time
model load and trace, which its own metrics give; and wall: the whole `run.run` call),
images/s of the loop (the model loaded once beforehand, as the job's wait is excluded), and job / loop (the issue's
target: >= 10x). Also the job at scale, as in job_vs_ceiling.py: (images - head) / (T(images) -
T(head)) from steady times, T(head) a run over the corpus's first --head images in the same
round: the job's per-image rate without a run's fixed cost. The loop's captions are checked against the job's for the same files.
A third side, alternating with the other two, is job_vs_ceiling's "decode + ceiling": the
job's decoding (`images.decode_image`, the job's config, its number of decode threads)
feeding the same Captioner in batches of the job's size, with the files' bytes already in
memory and no Beam: what a pipeline could reach here if Beam, reading and hashing cost
nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from _common import read_run, write_report
from PIL import Image

import corpora
from job_vs_ceiling import decode_and_caption_pass, job_rates, job_round, marginal_rate, median_job_rates


def loop_pass(captioner, paths: list[str]) -> tuple[float, dict[str, str]]:
    """Seconds to caption `paths` one by one, and each path's best caption."""
    size = captioner.image_size
    captions = {}
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
        captions[path] = captioner.caption(pixels[None])[0][0].text
    return time.perf_counter() - start, captions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="job corpus size")
    p.add_argument("--loop_images", type=int, default=200, help="the loop captions the first N of them")
    p.add_argument("--size", type=int, default=256, help="corpus image side in pixels (small corpus)")
    corpora.add_corpus_flag(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--head", type=int, default=None,
                   help="images of a second, smaller job run each round (the corpus's first ones), for the job at "
                        "scale (default: a tenth of --images; 0: none)")
    p.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
    p.add_argument("--out", default=None,
                   help="JSON report (default bench/results/job_vs_loop.json, job_vs_loop_large.json for --corpus large)")
    args = p.parse_args(argv)
    if args.out is None:
        name = "job_vs_loop.json" if args.corpus == "small" else "job_vs_loop_large.json"
        args.out = os.path.join(os.path.dirname(__file__), "results", name)

    from batch_caption import images, run
    from batch_caption.model.bundle import load_captioner

    paths = corpora.by_flag(args.corpus, args.images, args.size)
    input_dir = os.path.dirname(paths[0])
    head = args.images // 10 if args.head is None else args.head
    # The same first images in a directory of their own: the same matching as the full run.
    head_dir = os.path.dirname(corpora.by_flag(args.corpus, head, args.size)[0]) if 0 < head < args.images else None
    loop_paths = paths[: args.loop_images]
    extra = shlex.split(args.job_args)
    job_config = run.parse(["--input", input_dir, *extra])[0]
    captioner = load_captioner(job_config.model, job_config.decode)  # the job's model and search
    captioner.warm_up()
    config = images.ImageConfig(image_size=captioner.image_size, draft=job_config.draft)
    datas = [open(path, "rb").read() for path in paths]

    work = tempfile.mkdtemp(prefix="bench_job_")
    jobs: list[dict] = []
    heads: list[dict] = []
    loop: list[float] = []
    bound: list[float] = []
    same = None
    try:
        for r in range(args.rounds):
            jobs.append(job_round(input_dir, work, f"r{r}", extra))
            if same is None:  # the job's and the loop's captions of the loop's files
                job_captions = {path: rec["caption"] for path, rec in read_run(os.path.join(work, f"run=r{r}"))[0].items()}
            shutil.rmtree(os.path.join(work, f"run=r{r}"))
            if head_dir:
                heads.append(job_round(head_dir, work, f"h{r}", extra))
                shutil.rmtree(os.path.join(work, f"run=h{r}"))
            seconds, loop_captions = loop_pass(captioner, loop_paths)
            loop.append(len(loop_paths) / seconds)
            seconds, _ = decode_and_caption_pass(captioner, datas, config, jobs[-1]["batch_size"], job_config.read_threads)
            bound.append(len(datas) / seconds)
            if same is None:
                same = sum(job_captions.get(path) == text for path, text in loop_captions.items())
            j = jobs[-1]
            print(f"round {r}: job %.1f img/s steady, %.1f wall; " % job_rates(j)
                  + (f"job at scale {marginal_rate(j, heads[-1]):.1f} img/s; " if heads else "")
                  + f"loop {loop[-1]:.1f} img/s; decode + ceiling {bound[-1]:.1f} img/s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    steady, wall = median_job_rates(jobs)
    at_scale = statistics.median(marginal_rate(j, h) for j, h in zip(jobs, heads)) if heads else None
    per_image = statistics.median(loop)
    no_beam = statistics.median(bound)
    report = {
        "model": captioner.model_id,
        "settings": vars(args),
        "images": len(paths),
        "loop_images": len(loop_paths),
        "corpus": input_dir,
        "job_batch_size": jobs[0]["batch_size"],
        "decode_threads": job_config.read_threads,
        "head_images": head if heads else 0,
        "rounds": {"job": jobs, "job_head": heads, "loop_images_per_s": loop, "decode_and_ceiling_images_per_s": bound},
        "median_images_per_s": {"job_steady": steady, "job_wall": wall, "job_at_scale": at_scale, "loop": per_image,
                                "decode_and_ceiling": no_beam},
        "job_at_scale_over_loop": at_scale / per_image if at_scale else None,
        "job_steady_over_loop": steady / per_image,
        "job_wall_over_loop": wall / per_image,
        "decode_and_ceiling_over_loop": no_beam / per_image,
        "job_steady_over_decode_and_ceiling": steady / no_beam,
        "loop_seconds_per_image": 1 / per_image,
        "loop_captions_equal_to_job": f"{same}/{len(loop_paths)}",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    what = f"{args.size} px JPEG" if args.corpus == "small" else "4000x3000 JPEG"
    print(f"| {what} | images/s (median of {args.rounds}) | job / loop |\n| --- | --- | --- |")
    print(f"| loop: PIL full decode + resize, batch 1 ({len(loop_paths)} images) | {per_image:.1f} "
          f"({1000 / per_image:.1f} ms/image) | |")
    print(f"| job, steady (excl. the wait for the model load + trace; {len(paths)} images) | {steady:.1f} | {steady / per_image:.1f}x |")
    print(f"| job, wall (whole run.run call; {len(paths)} images) | {wall:.1f} | {wall / per_image:.1f}x |")
    if at_scale:
        print(f"| job at scale: ({len(paths)} - {head}) / (T({len(paths)}) - T({head})), steady times | {at_scale:.1f} | "
              f"{at_scale / per_image:.1f}x |")
    print(f"| decode + ceiling: {job_config.read_threads} decode threads feeding the Captioner, no Beam | "
          f"{no_beam:.1f} | {no_beam / per_image:.1f}x |")
    print(f"\nloop captions equal to the job's: {same}/{len(loop_paths)}")
    write_report(args.out, argv, "job_vs_loop.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
