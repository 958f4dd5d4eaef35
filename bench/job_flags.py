"""The captioning job under several sets of flags, side by side in one process.

    python bench/job_flags.py [--images 2000] [--size 256] [--corpus small|large] [--rounds 3]
                              [--variants "--batch_size 32" "--batch_size 128" ...]   (--variants last)
                              [--out bench/results/job_flags.json]

Runs the real job (`batch_caption.run.run`, DirectRunner in memory, bundled default model)
over the fixed small corpus (`corpora.small_images`; `--corpus large`: the 12 MP photos of
`corpora.large_photos`) once per variant per round,
alternating (A B C A B C ...), after one untimed warm-up run, and reports for each variant
the median images/s, steady (elapsed minus the wait for the model load + trace, as in job_vs_ceiling.py)
and wall (the whole `run.run` call), CPU ms per image (all threads, the whole call), and
the ratio of its steady rate to the first variant's. An empty string is the job's defaults.
Every variant must give the same captions (checked; exit 1 if not).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile

from _common import read_run, write_report

import corpora
from job_vs_ceiling import job_rates, job_round


def flags_round(input_dir: str, work: str, run_id: str, flags: str) -> dict:
    """One job run (job_vs_ceiling.job_round) plus its rates, options and captions."""
    job = job_round(input_dir, work, run_id, shlex.split(flags))
    run_dir = os.path.join(work, f"run={run_id}")
    with open(os.path.join(run_dir, "manifest.json")) as f:
        job["options"] = json.load(f)["options"]
    captions, _ = read_run(run_dir)
    shutil.rmtree(run_dir)
    job["steady_images_per_s"], job["wall_images_per_s"] = job_rates(job)
    job["captions"] = {os.path.basename(p): r["caption"] for p, r in captions.items()}
    return job


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="corpus image side in pixels")
    corpora.add_corpus_flag(p, " (e.g. --images 200)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "job_flags.json"))
    p.add_argument("--variants", nargs="*", default=["--batch_size 32", "--batch_size 64", "--batch_size 128"],
                   help="last: every argument after it is one variant's flag string (\"\" = the defaults, "
                        "\"--no-dedupe\" ...); the first is the reference")
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse would read a lone "--no-dedupe" as an option of this script, so the
    # variants are taken off the command line before it parses the rest.
    variants = argv[argv.index("--variants") + 1:] if "--variants" in argv else None
    args = p.parse_args(argv if variants is None else argv[: argv.index("--variants")])
    if variants is not None:
        if not variants:
            p.error("--variants needs at least one flag string")
        args.variants = variants

    paths = corpora.by_flag(args.corpus, args.images, args.size)
    input_dir = os.path.dirname(paths[0])
    from batch_caption import run

    # A variant the job's flag parser or model check refuses stops here, not after the
    # other variants' rounds; so does one that sets what job_round sets itself.
    fixed = ["--input", input_dir, "--output", "unset-output", "--run_id", "unset"]
    plain = run.parse(fixed)[0]
    for flags in args.variants:
        try:
            config = run.parse([*fixed, *shlex.split(flags)])[0]
            run.check_model(config.model)
        except run.UsageError as e:
            p.error(f"variant {flags!r}: {e}")
        if (config.inputs, config.input_lists, config.output, config.run_id) != (
                plain.inputs, plain.input_lists, plain.output, plain.run_id):
            p.error(f"variant {flags!r} sets the input, --output or --run_id, which the benchmark sets")
    work = tempfile.mkdtemp(prefix="bench_flags_")
    runs: list[list[dict]] = [[] for _ in args.variants]
    try:
        flags_round(input_dir, work, "warm", args.variants[0])  # imports, first TensorFlow use
        for r in range(args.rounds):
            for i, flags in enumerate(args.variants):
                runs[i].append(flags_round(input_dir, work, f"r{r}v{i}", flags))
                print(f"round {r}: [{flags}] {runs[i][-1]['steady_images_per_s']:.1f} img/s steady", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(i: int, key: str) -> float:
        return statistics.median(j[key] for j in runs[i])

    reference = runs[0][0]["captions"]
    same = all(j["captions"] == reference for js in runs for j in js)
    base = median(0, "steady_images_per_s")
    variants = []
    for i, flags in enumerate(args.variants):
        variants.append({
            "flags": flags,
            "steady_images_per_s": median(i, "steady_images_per_s"),
            "wall_images_per_s": median(i, "wall_images_per_s"),
            "cpu_ms_per_image": 1000 * statistics.median(j["cpu_s"] / j["captioned"] for j in runs[i]),
            "steady_over_first": median(i, "steady_images_per_s") / base,
            "rounds": [{k: v for k, v in j.items() if k != "captions"} for j in runs[i]],
        })
    print(f"\n| flags | steady img/s (median of {args.rounds}) | wall img/s | CPU ms / image | steady / first |")
    print("| --- | --- | --- | --- | --- |")
    for v in variants:
        print(f"| `{v['flags'] or '(defaults)'}` | {v['steady_images_per_s']:.1f} | {v['wall_images_per_s']:.1f} | "
              f"{v['cpu_ms_per_image']:.2f} | {v['steady_over_first']:.2f}x |")
    what = f"{args.size} px" if args.corpus == "small" else "4000x3000"
    print(f"\n{args.images} images of {what}; same captions in every run: {same}")
    write_report(args.out, argv, "job_flags.py",
                 {"settings": vars(args), "corpus": input_dir, "same_captions_in_every_run": same, "variants": variants})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
