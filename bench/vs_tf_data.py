"""The job against the tf.data pipeline a user would write instead, whole process: seconds, RSS.

    python bench/vs_tf_data.py [--web 3000] [--phone 150] [--model NAME_OR_BUNDLE] [--rounds 3]
                               [--job_args "FLAGS"] [--out bench/results/vs_tf_data.json] [--fold NAME]

Each round runs, on each corpus, the job (`python -m batch_caption.run --model M`, its
default flags and `--job_args`) and then `bench/tf_data_pipeline.py` (the same Captioner
behind tf.data: DCT-scaled JPEG decode, parallel map, batch, prefetch), each in a fresh
process, so both see the same machine load (A B A B ...): `--web` 640x480 JPEGs
(`corpora.web_photos`), `--phone` 4000x3000 ones (`corpora.large_photos`). Both import
batch_caption from this checkout. Per run: the process's wall seconds (the figure
compared: Python start, imports, model load, everything), the seconds its own summary line
gives, and peak RSS (ru_maxrss of the process; the sampled peak of its process tree).
Reports medians per corpus and side, the job's speed-up (pipeline s / job s = job
throughput / pipeline throughput), whether both captioned the same paths, and how many
best captions agree (the resize differs, Pillow's against TensorFlow's, so near-ties may).

Issue 29's targets: >= 1.2x on 3000 web photos and >= 1.3x on 150 phone photos (the
defaults); at least par on 30000 web photos (`--web 30000 --phone 0 --fold web30k`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile

import _common as c
import corpora
from peak_memory import measure_process

PIPELINE = os.path.join(c.BENCH, "tf_data_pipeline.py")
KEYS = ("wall_s", "own_s", "ru_maxrss_mib", "tree_rss_peak_mib")


def _measure(cmd: list[str], log: str, prefix: str, interval: float) -> dict:
    """One process: wall seconds, the seconds of its summary line starting `prefix`, peak RSS."""
    measured = measure_process(cmd, log, interval)
    with open(log) as f:
        summary = [line for line in f.read().splitlines() if line.startswith(prefix)][-1:]
    return {"wall_s": measured["seconds"], "own_s": c.summary_seconds(log, prefix),
            "ru_maxrss_mib": measured["ru_maxrss_mib"], "tree_rss_peak_mib": measured["tree_rss_peak_mib"],
            "summary": summary}


def _job(directory: str, model: str, job_args: list[str], work: str, run_id: str, interval: float) -> dict:
    out = os.path.join(work, "out")
    cmd = [sys.executable, "-m", "batch_caption.run", "--input", directory, "--output", out, "--run_id", run_id,
           "--model", model, *job_args]
    result = _measure(cmd, os.path.join(work, f"{run_id}.log"), "run=", interval)
    run_dir = os.path.join(out, f"run={run_id}")
    records, result["errors"] = c.read_run(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {**result, "captions": {os.path.normpath(p): r["caption"] for p, r in records.items()}}


def _pipeline(directory: str, model: str, work: str, run_id: str, interval: float) -> dict:
    output = os.path.join(work, f"{run_id}.jsonl")
    cmd = [sys.executable, PIPELINE, "--input", directory, "--model", model, "--output", output]
    result = _measure(cmd, os.path.join(work, f"{run_id}.log"), "tf.data:", interval)
    with open(output, encoding="utf-8") as f:
        captions = {os.path.normpath(r["path"]): r["caption"] for r in map(json.loads, f)}
    os.remove(output)
    return {**result, "errors": 0, "captions": captions}


def _compare(job: dict, pipeline: dict) -> dict:
    """Paths and best captions of one round's two runs."""
    both = job.keys() & pipeline.keys()
    return {"job_images": len(job), "pipeline_images": len(pipeline), "same_paths": job.keys() == pipeline.keys(),
            "captions_agree": sum(job[p] == pipeline[p] for p in both)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpora.add_photo_flags(p)
    p.add_argument("--model", default=None, help="bundled model name or bundle (default: the job's default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    c.add_out_flags(p, "vs_tf_data")
    args = p.parse_args(argv)
    corpus_dirs = corpora.photo_dirs(args.web, args.phone)
    if not corpus_dirs:
        p.error("no corpus: give --web or --phone a count")
    refused = c.check_variant(next(iter(corpus_dirs.values())), args.job_args)
    if refused:
        p.error(f"--job_args {args.job_args!r}: {refused}")
    model, job_args = c.model_path(args.model), shlex.split(args.job_args)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [c.REPO, os.environ.get("PYTHONPATH")]))

    work = tempfile.mkdtemp(prefix="bench_tf_data_")
    sides = {}
    for i, (corpus, directory) in enumerate(corpus_dirs.items()):
        sides[(corpus, "job")] = lambda r, d=directory, i=i: _job(d, model, job_args, work, f"r{r}-c{i}-job",
                                                                  args.interval)
        sides[(corpus, "pipeline")] = lambda r, d=directory, i=i: _pipeline(d, model, work, f"r{r}-c{i}-tf",
                                                                            args.interval)

    def log(r, side, x):
        c.say(f"round {r}: {side[0]} {side[1]}: {x['wall_s']:.1f} s process ({x['own_s']:.1f} s its own), "
              f"{x['ru_maxrss_mib']:.0f} MiB")

    try:
        got = c.alternate(args.rounds, sides, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {}
    for corpus, directory in corpus_dirs.items():
        job, pipeline = got[(corpus, "job")], got[(corpus, "pipeline")]
        rounds = [_compare(j.pop("captions"), t.pop("captions")) for j, t in zip(job, pipeline)]
        medians = {side: {k: c.median(runs, key=lambda x, k=k: x[k]) for k in KEYS}
                   for side, runs in (("job", job), ("pipeline", pipeline))}
        report[corpus] = {
            "corpus": os.path.basename(directory), "images": rounds[0]["job_images"], "medians": medians,
            "job_speedup": medians["pipeline"]["wall_s"] / medians["job"]["wall_s"],
            "job_speedup_own_s": medians["pipeline"]["own_s"] / medians["job"]["own_s"],
            "same_paths": all(x["same_paths"] for x in rounds), "captions_agree": rounds[-1]["captions_agree"],
            "job_errors": max(j["errors"] for j in job), "rounds": rounds, "runs": {"job": job, "pipeline": pipeline}}

    print(f"| corpus | images | job s | tf.data s | job speed-up | own lines: job s, tf.data s | "
          f"peak RSS job / tf.data MiB | same paths | best captions agree |  ({args.rounds} rounds, medians)")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for corpus, x in report.items():
        job, tf = x["medians"]["job"], x["medians"]["pipeline"]
        print(f"| {corpus} | {x['images']} | {job['wall_s']:.1f} | {tf['wall_s']:.1f} | {x['job_speedup']:.2f}x | "
              f"{job['own_s']:.1f}, {tf['own_s']:.1f} ({x['job_speedup_own_s']:.2f}x) | "
              f"{job['ru_maxrss_mib']:.0f} / {tf['ru_maxrss_mib']:.0f} | {'yes' if x['same_paths'] else 'NO'} | "
              f"{x['captions_agree']}/{x['images']} |")
    c.write_report(args, argv, "vs_tf_data.py", {"model": model, "job_args": job_args, "corpora": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
