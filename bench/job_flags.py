"""The captioning job under several sets of flags, side by side in one process.

    python bench/job_flags.py [--images 2000] [--size 256] [--corpus small|large] [--rounds 3]
                              [--latency_ms MS] [--out FILE] [--fold NAME]
                              [--variants "--batch_size 32" "--batch_size 128" ...]   (--variants last)

Runs the real job (`batch_caption.run`, DirectRunner in memory, bundled default model)
over a fixed corpus (`corpora`: small synthetic scenes, or with `--corpus large` the 12 MP
photos) once per variant per round, alternating (A B C A B C ...) after one untimed
warm-up run, and reports for each variant the median images/s, steady (elapsed minus the
wait for the model load) and wall (the whole `run.run` call), CPU ms per image (all
threads, the whole call), and its steady rate over the first variant's. An empty string
is the job's defaults. Every variant must give the same captions (checked; exit 1 if not).

`--latency_ms` reads the corpus through `slowfs://`, the local filesystem with a fixed
sleep before every open (an object store's time to first byte; matching is not delayed),
e.g. to compare `--read_threads` values:

    python bench/job_flags.py --images 500 --rounds 2 --latency_ms 30 --out bench/results/slow_storage.json \\
        --variants "--read_threads 0" "--read_threads 2" "--read_threads 8" "--read_threads 16" "--read_threads 32"
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

import _common as c
import corpora

SCHEME = "slowfs"


def register_slow_filesystem(latency_s: float) -> None:
    """Defines (once) and configures the slowfs:// FileSystem: Beam finds FileSystem
    subclasses by their scheme, in this process (the in-memory runner's)."""
    from apache_beam.io.filesystem import FileMetadata, MatchResult
    from apache_beam.io.localfilesystem import LocalFileSystem

    global SlowFileSystem
    if "SlowFileSystem" not in globals():
        prefix = SCHEME + "://"

        class SlowFileSystem(LocalFileSystem):
            latency_s = 0.0

            @classmethod
            def scheme(cls):
                return SCHEME

            def match(self, patterns, limits=None):
                results = super().match([p[len(prefix):] for p in patterns], limits)
                return [MatchResult(prefix + r.pattern,
                                    [FileMetadata(prefix + m.path, m.size_in_bytes, m.last_updated_in_seconds)
                                     for m in r.metadata_list]) for r in results]

            def open(self, path, *args, **kwargs):
                time.sleep(type(self).latency_s)
                return super().open(path[len(prefix):], *args, **kwargs)

        globals()["SlowFileSystem"] = SlowFileSystem
    SlowFileSystem.latency_s = latency_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="corpus image side in pixels")
    corpora.add_corpus_flag(p, " (e.g. --images 200)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency_ms", type=float, default=None, help="read through slowfs://: a sleep before every open")
    c.add_out_flags(p, "job_flags")
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
    # A variant the job refuses stops here, not after the other variants' rounds.
    for flags in args.variants:
        why = c.check_variant(input_dir, flags)
        if why:
            p.error(f"variant {flags!r}: {why}")
    if args.latency_ms is not None:
        register_slow_filesystem(args.latency_ms / 1000)
        input_dir = f"{SCHEME}://{input_dir}/*.jpg"
    work = tempfile.mkdtemp(prefix="bench_flags_")
    try:
        c.job_round(input_dir, work, "warm", shlex.split(args.variants[0]))  # imports, first TensorFlow use
        sides = {flags: lambda r, i=i, flags=flags: c.job_round(input_dir, work, f"r{r}v{i}", shlex.split(flags),
                                                                captions=True)
                 for i, flags in enumerate(args.variants)}
        runs = c.alternate(args.rounds, sides, log=c.log_round)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = runs[args.variants[0]][0]["captions"]
    same = all(j["captions"] == reference for js in runs.values() for j in js)
    base = c.median(runs[args.variants[0]], lambda j: j["steady_images_per_s"])
    report = []
    for flags, js in runs.items():
        steady = c.median(js, lambda j: j["steady_images_per_s"])
        report.append({
            "flags": flags,
            "steady_images_per_s": steady,
            "wall_images_per_s": c.median(js, lambda j: j["wall_images_per_s"]),
            "cpu_ms_per_image": 1000 * c.median(js, lambda j: j["cpu_s"] / j["captioned"]),
            "steady_over_first": steady / base,
            "rounds": [{k: v for k, v in j.items() if k != "captions"} for j in js],
        })
    print(f"\n| flags | steady img/s (median of {args.rounds}) | wall img/s | CPU ms / image | steady / first |")
    print("| --- | --- | --- | --- | --- |")
    for v in report:
        print(f"| `{v['flags'] or '(defaults)'}` | {v['steady_images_per_s']:.1f} | {v['wall_images_per_s']:.1f} | "
              f"{v['cpu_ms_per_image']:.2f} | {v['steady_over_first']:.2f}x |")
    print(f"\n{args.images} images ({args.corpus} corpus); same captions in every run: {same}")
    c.write_report(args, argv, "job_flags.py",
                   {"settings": vars(args), "corpus": input_dir, "same_captions_in_every_run": same, "variants": report})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
