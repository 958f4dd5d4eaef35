"""The job with the default model against another bundled model, on photos: img/s and RSS.

    python bench/photo_models.py [--new flickr8k] [--old scenes] [--web 3000] [--phone 150]
                                   [--rounds 2] [--out bench/results/photo_models.json]

Each round runs `python -m batch_caption.run` in a process of its own (DirectRunner in
memory, default flags) once per model on each corpus, alternating models, so both see
the same machine load: `--web` generated 640x480 web-sized JPEGs (`corpora.web_photos`)
and `--phone` 4000x3000 phone-sized ones (`corpora.large_photos`). Per run: wall seconds
of the process, the job's rate (inputs / the seconds its summary line gives: flags to
manifest, the model load included), and peak RSS (ru_maxrss of the process, and the sampled peak of the
process tree). Reports medians per model and corpus, and new / old of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import _common as c
import corpora
from peak_memory import measure_process


def _manifest(out_dir: str, run_id: str) -> dict:
    with open(os.path.join(out_dir, f"run={run_id}", "manifest.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", default="flickr8k", help="bundled model name or bundle (default flickr8k)")
    p.add_argument("--old", default="scenes", help="bundled model name or bundle (default scenes)")
    corpora.add_photo_flags(p)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    c.add_out_flags(p, "photo_models")
    args = p.parse_args(argv)
    corpus_dirs = corpora.photo_dirs(args.web, args.phone)
    models = {"new": args.new, "old": args.old}
    work = tempfile.mkdtemp(prefix="bench_models_")
    runs: dict = {corpus: {side: [] for side in models} for corpus in corpus_dirs}
    try:
        for r in range(args.rounds):
            for corpus, directory in corpus_dirs.items():
                for side, model in models.items():
                    run_id = f"r{r}-{side}-{len(runs[corpus][side])}"
                    out = os.path.join(work, "out")
                    cmd = [sys.executable, "-m", "batch_caption.run", "--input", directory, "--output", out,
                           "--run_id", run_id, "--model", model]
                    measured = measure_process(cmd, os.path.join(work, f"{run_id}.log"), args.interval)
                    manifest = _manifest(out, run_id)
                    n = manifest["counts"]["inputs"]
                    elapsed = c.summary_seconds(os.path.join(work, f"{run_id}.log"))
                    runs[corpus][side].append({
                        "images": n, "wall_s": measured["seconds"], "job_img_s": n / elapsed,
                        "ru_maxrss_mib": measured["ru_maxrss_mib"],
                        "tree_rss_peak_mib": measured["tree_rss_peak_mib"], "model": manifest["model"]})
                    c.say(f"round {r} {corpus} {side} ({model}): {n / elapsed:.1f} img/s, "
                          f"{measured['ru_maxrss_mib']:.0f} MiB")
                    shutil.rmtree(os.path.join(out, f"run={run_id}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = ("wall_s", "job_img_s", "ru_maxrss_mib", "tree_rss_peak_mib")
    medians = {corpus: {side: {k: statistics.median(x[k] for x in rs) for k in keys} | {"model": rs[0]["model"]}
                        for side, rs in sides.items()} for corpus, sides in runs.items()}
    ratios = {corpus: {k: m["new"][k] / m["old"][k] for k in keys} for corpus, m in medians.items()}
    print(f"| corpus | model | job img/s | process s | peak RSS MiB | (new: {args.new}, old: {args.old})")
    print("| --- | --- | --- | --- | --- |")
    for corpus, m in medians.items():
        for side in models:
            x = m[side]
            print(f"| {corpus} | {side} | {x['job_img_s']:.1f} | {x['wall_s']:.1f} | {x['ru_maxrss_mib']:.0f} |")
        print(f"| {corpus} | new / old | {ratios[corpus]['job_img_s']:.2f}x | {ratios[corpus]['wall_s']:.2f}x | "
              f"{ratios[corpus]['ru_maxrss_mib']:.2f}x |")
    c.write_report(args, argv, "photo_models.py", {"models": models, "corpora": {k: os.path.basename(v) for k, v in
                   corpus_dirs.items()}, "medians": medians, "new_over_old": ratios, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
