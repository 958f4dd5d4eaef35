"""Profile the captioning job with py-spy, and summarise the profile.

    pip install py-spy        # into the dev venv only; not a project dependency
    py-spy record --idle --format raw --rate 100 -o /tmp/job.prof -- \
        python bench/profile_job.py run --images 300
    python bench/profile_job.py summary /tmp/job.prof [--under Captioner.search] [--top 40]
    python bench/profile_job.py timeline [--corpus large --images 200]

`run` runs the real job (`batch_caption.run.run`, DirectRunner in memory, bundled model)
twice in one process over `corpora.small_images` (or, with `--corpus large`,
`corpora.large_photos`): `warm_up_run` first (imports, first
TensorFlow use), then `measured_run`, the one to read. `summary` keeps the samples of
`measured_run` (its main thread: the model load runs in a thread of its own,
`BackgroundLoad`, which --with_load adds, for both runs, since a raw profile has no time
order), and prints, per function, the share of samples with it on the stack (inclusive), then the
share by the function at the top of the stack (self). With --idle, waiting (for a lock, for
TensorFlow's threads) counts too, so the main thread's samples add up to its wall time.
`timeline` needs no profiler: after a warm-up run it times one more run's phases (match,
hash, model load, read + decode, each batch, shards, manifest) by wrapping those methods,
and prints when each first started and last ended.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import sys
import tempfile
import time

import _common as c
import corpora


def _job(input_dir: str, out: str, run_id: str, extra: list[str]) -> dict:
    return c.run_job(["--input", input_dir, "--output", out, "--run_id", run_id, *extra])


def warm_up_run(input_dir: str, out: str, extra: list[str]) -> None:
    _job(input_dir, out, "warm", extra)


def measured_run(input_dir: str, out: str, extra: list[str]) -> None:
    start = time.perf_counter()
    manifest = _job(input_dir, out, "measured", extra)
    load = manifest["metrics"].get("model_load_ms", 0) / 1000
    wait = manifest["metrics"].get("model_wait_ms", 0) / 1000
    print(f"measured run: {time.perf_counter() - start:.2f} s wall, elapsed {manifest['elapsed_seconds']:.2f} s, "
          f"model load + trace {load:.2f} s (the first batch waited {wait:.2f} s for it)", file=sys.stderr)


def timeline(input_dir: str, out: str, extra: list[str]) -> list[tuple[str, int, float, float, float]]:
    """A warm run with the job's phases timed: (label, calls, first start, last end, sum of
    call seconds), seconds from the start of the `run.run` call; "pipeline.run" marks where
    pipeline construction ends. Generators are drained inside the timing."""
    import functools
    import threading

    import apache_beam as beam

    calls: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    lock, t0 = threading.Lock(), [0.0]

    def timed(f, label):
        @functools.wraps(f)
        def g(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = f(*args, **kwargs)
                return list(result) if hasattr(result, "__next__") else result
            finally:
                with lock:
                    calls[label].append((start - t0[0], time.perf_counter() - t0[0]))
        return g

    patched = [(beam.Pipeline, "run", "pipeline.run"), *c.job_phases()]
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patched]
    warm_up_run(input_dir, out, extra)
    try:
        for owner, name, label in patched:
            setattr(owner, name, timed(owner.__dict__[name], label))
        t0[0] = time.perf_counter()
        manifest = _job(input_dir, out, "timeline", extra)
        total = time.perf_counter() - t0[0]
    finally:
        for owner, name, f in originals:
            setattr(owner, name, f)
    rows = [(label, len(c), min(s for s, _ in c), max(e for _, e in c), sum(e - s for s, e in c))
            for label, c in calls.items()]
    rows.sort(key=lambda r: r[2])
    print(f"run.run: {total:.2f} s, {manifest['counts']['inputs']} images, model load + trace "
          f"{manifest['metrics'].get('model_load_ms', 0) / 1000:.2f} s, the first batch waited "
          f"{manifest['metrics'].get('model_wait_ms', 0) / 1000:.2f} s for it")
    print("| phase | calls | first starts, s | last ends, s | sum of calls, s |\n| --- | --- | --- | --- | --- |")
    for label, n, first, last, busy in rows:
        print(f"| {label} | {n} | {first:.2f} | {last:.2f} | {busy:.2f} |")
    return rows


_LOAD_THREAD = re.compile(c.LOAD_THREAD_FRAME)


def summary(path: str, under: str | None, top: int, with_load: bool) -> None:
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if "measured_run (" not in stack and not (with_load and _LOAD_THREAD.search(stack)):
                continue
            if under and under not in stack:
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            for frame in set(frames):
                inclusive[frame] += n
            own[frames[-1]] += n
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"--- {title}")
        for frame, n in counter.most_common(top):
            print(f"{n:7d} {100 * n / max(total, 1):5.1f}%  {frame[:160]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the job twice in this process (profile it with py-spy)")
    t = sub.add_parser("timeline", help="a warm run with its phases timed (no profiler needed)")
    for q in (r, t):
        q.add_argument("--images", type=int, default=300)
        q.add_argument("--size", type=int, default=256)
        corpora.add_corpus_flag(q)
        q.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
    s = sub.add_parser("summary", help="summarise a py-spy raw profile of `run`")
    s.add_argument("profile")
    s.add_argument("--under", default=None, help="only samples with this text on the stack")
    s.add_argument("--top", type=int, default=40)
    s.add_argument("--with_load", action="store_true", help="add the model-load thread (both runs)")
    args = p.parse_args(argv)
    if args.command == "summary":
        summary(args.profile, args.under, args.top, args.with_load)
        return 0
    paths = corpora.by_flag(args.corpus, args.images, args.size)
    input_dir = os.path.dirname(paths[0])
    extra = shlex.split(args.job_args)
    with tempfile.TemporaryDirectory(prefix="profile_job_") as out:
        if args.command == "timeline":
            timeline(input_dir, out, extra)
            return 0
        warm_up_run(input_dir, out, extra)
        measured_run(input_dir, out, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
