"""The job over storage with a per-file latency, by --read_threads.

    python bench/slow_storage.py [--images 500] [--size 256] [--latency_ms 30] [--threads 0,2,8,16,32]
                                 [--rounds 2] [--out bench/results/slow_storage.json]

An object store (gs://, s3://) answers each read after tens of milliseconds, whatever the
file's size; a job that reads one file at a time waits that long for every image. This
script registers a Beam FileSystem, `slowfs://`, that is the local filesystem with a fixed
sleep before every open (time to first byte; matching is not delayed), and runs the real
job (`batch_caption.run.run`, DirectRunner in memory, bundled default model, default
flags otherwise, so dedupe is on and every file is opened twice: once to hash it, once to
decode it) over `slowfs://` + the small corpus (`corpora.small_images`), once per
`--read_threads` value per round, alternating, in one process. It reports the job's
images/s (steady: elapsed minus model load + trace, as in job_vs_ceiling.py) for each
value and its ratio to inline reading (`--read_threads 0`), and checks that every run
gives the same captions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from _common import write_report

import corpora
from job_flags import flags_round

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


def threads_round(pattern: str, work: str, run_id: str, threads: int) -> dict:
    """One job run with --read_threads (job_flags.flags_round), tagged with the value."""
    return {**flags_round(pattern, work, run_id, f"--read_threads {threads}"), "threads": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--size", type=int, default=256, help="corpus image side in pixels")
    p.add_argument("--latency_ms", type=float, default=30.0, help="sleep before every file open")
    p.add_argument("--threads", default="0,2,8,16,32", help="--read_threads values to compare (the first is the baseline)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "slow_storage.json"))
    args = p.parse_args(argv)

    paths = corpora.small_images(args.images, args.size)
    pattern = f"{SCHEME}://{os.path.dirname(paths[0])}/*.jpg"
    register_slow_filesystem(args.latency_ms / 1000)
    values = [int(t) for t in args.threads.split(",")]
    work = tempfile.mkdtemp(prefix="bench_slow_")
    runs: dict[int, list[dict]] = {t: [] for t in values}
    try:
        threads_round(pattern, work, "warm", values[-1])  # imports, first TensorFlow use
        for r in range(args.rounds):
            for t in values:
                runs[t].append(threads_round(pattern, work, f"r{r}t{t}", t))
                print(f"round {r}: --read_threads {t}: {runs[t][-1]['steady_images_per_s']:.1f} img/s steady",
                      file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rates = {t: statistics.median(j["steady_images_per_s"] for j in runs[t]) for t in values}
    reference = runs[values[0]][0]["captions"]
    same = all(j["captions"] == reference for js in runs.values() for j in js)
    base = rates[values[0]]
    report = {
        "settings": vars(args),
        "corpus": os.path.dirname(paths[0]),
        "same_captions_in_every_run": same,
        "median_steady_images_per_s": rates,
        "over_first": {t: rates[t] / base for t in values},
        "rounds": {t: [{k: v for k, v in j.items() if k != "captions"} for j in js] for t, js in runs.items()},
    }
    print(f"\n| --read_threads | job img/s, steady (median of {args.rounds}) | / --read_threads {values[0]} |")
    print("| --- | --- | --- |")
    for t in values:
        print(f"| {t} | {rates[t]:.1f} | {rates[t] / base:.2f}x |")
    print(f"\n{args.images} images of {args.size} px, {args.latency_ms:g} ms before every open; "
          f"same captions in every run: {same}")
    write_report(args.out, argv, "slow_storage.py", report)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
