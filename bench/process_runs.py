"""The job in processes of its own: this working tree against a git revision.

    python bench/process_runs.py cold [--baseline REV] [--images 8] [--corpus bundled|small|large|web] [--rounds 5]
    python bench/process_runs.py warm --baseline REV [--images 2000] [--corpus small|large|web] [--rounds 3]
                                      [--runs 2]
    (both: [--model NAME|BUNDLE] [--job_args "--no-dedupe"] [--baseline_job_args ...] [--out FILE] [--fold NAME])

The other benchmarks time runs inside one warm process. These start a process per run
(`cold`) or per round (`warm`), once with the package of `--baseline` (its tree from `git
archive`, first on PYTHONPATH) and once with this working tree, alternating, with one
bundle (`--model`, given to both as a path; default: the default model) and default flags
(plus `--job_args`, and `--baseline_job_args` for the baseline alone):

  cold  the command (`batch_caption.run.main`) in a fresh process, what a user of the command
        waits for: process seconds (start to exit: imports, first model load, the
        interpreter's exit), run seconds (the "in X s" the command prints: flags to
        manifest) and first-caption seconds (process start to the first batch's captions:
        the job's first_caption_ms plus the interpreter's start before the package's import;
        absent for a revision without that metric). `--corpus bundled` runs the README's
        command 1 as it is: the default model on its bundled samples, no --input.
        Without --baseline only the working tree is timed.
  warm  for a code change that no flag switches: each process runs the job once untimed,
        then --runs times timed (`batch_caption.run.run` in process): steady seconds
        (elapsed - model_wait_ms; model_load_ms for a baseline without that metric) and
        wall seconds.

Reports the medians and baseline / working tree (> 1: the working tree is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time

import _common as c
import corpora

_RUN_SECONDS = re.compile(r" in ([0-9.]+) s \(")

# Runs in the child process, with only PYTHONPATH deciding which batch_caption it imports,
# so it imports nothing from bench/: its steady time is _common.steady_seconds written out.
_WARM_CHILD = r"""
import json, sys, time
from batch_caption import run
out_dir, runs, job_args = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
def once(run_id):
    start = time.perf_counter()
    m = run.run([*job_args, "--output", out_dir, "--run_id", run_id])
    wall = time.perf_counter() - start
    c = m["counts"]
    if c["failed"] or c["captioned"] != c["matched"]:
        raise SystemExit(f"run {run_id} did not caption every image: {c}")
    wait_ms = m["metrics"].get("model_wait_ms", m["metrics"].get("model_load_ms", 0))
    return {"wall_s": wall, "steady_s": m["elapsed_seconds"] - wait_ms / 1000, "captioned": c["captioned"]}
once("warm")
print("RESULT " + json.dumps([once(f"t{i}") for i in range(runs)]))
"""


# The command's own main, plus its metrics on a last line: `python -m batch_caption.run`
# would print no metrics. The wall clock at the interpreter's start goes first, so the
# first-caption time counts from there.
_COLD_CHILD = r"""
import time; started = time.time()
import json, sys
import batch_caption
from batch_caption import run
manifests = []
real_run = run.run
run.run = lambda argv=None: manifests.append(real_run(argv)) or manifests[-1]
code = run.main(sys.argv[1:])
m = manifests[-1]["metrics"] if manifests else {}
first = m.get("first_caption_ms")
before_import = getattr(batch_caption, "IMPORTED_AT", started) - started
print("RESULT " + json.dumps({"first_caption_s": None if first is None else first / 1000 + before_import}))
sys.exit(code)
"""


def cold_run(package_root: str, job_args: list[str], out_dir: str) -> dict:
    """The command in a new process; -> its process, run and first-caption seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    stdout = c.run_child(["-c", _COLD_CHILD, *job_args, "--output", out_dir, "--run_id", "cold"],
                         package_root, cwd=os.path.dirname(out_dir))
    process_s = time.perf_counter() - start
    found = _RUN_SECONDS.search(stdout)
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not found or not results:
        raise SystemExit(f"the run with {package_root} printed no run time: {stdout[-500:]}")
    return {"process_s": process_s, "run_s": float(found.group(1)),
            **json.loads(results[-1][len("RESULT "):])}


def warm_process(package_root: str, job_args: list[str], out_dir: str, runs: int) -> list[dict]:
    """A new process: one untimed run, then `runs` timed ones; -> their timings."""
    os.makedirs(out_dir, exist_ok=True)
    stdout = c.run_child(["-c", _WARM_CHILD, out_dir, str(runs), json.dumps(job_args)], package_root,
                         cwd=os.path.dirname(out_dir))
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"the runs with {package_root} printed no result")
    return json.loads(lines[-1][len("RESULT "):])


def _fmt(value, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    cold = sub.add_parser("cold", help="a whole command in a fresh process per run")
    warm = sub.add_parser("warm", help="warm runs in a process per side and round")
    for q, name, images, rounds in ((cold, "cold_start", 8, 5), (warm, "warm_runs", 2000, 3)):
        q.add_argument("--corpus", choices=(*(("bundled",) if q is cold else ()), "small", "large", "web"),
                       default="small", help="bundled: the default command's samples (no --input); small: "
                       "synthetic scenes; large: 12 MP photos; web: 640x480 photos")
        q.add_argument("--images", type=int, default=images)
        q.add_argument("--rounds", type=int, default=rounds, help="processes per side, alternating")
        q.add_argument("--model", default=None, help="a bundled model's name or a bundle: both sides get its path "
                       "(default: the default model, or none with --corpus bundled)")
        q.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
        q.add_argument("--baseline_job_args", default=None, help="the baseline's flags instead of --job_args")
        c.add_out_flags(q, name)
    cold.add_argument("--baseline", default=None, help="git revision to compare with (e.g. HEAD~1)")
    warm.add_argument("--baseline", required=True, help="git revision to compare with (e.g. HEAD~1)")
    warm.add_argument("--runs", type=int, default=2, help="timed runs per process, after one untimed")
    args = p.parse_args(argv)
    extra = shlex.split(args.job_args)
    base_extra = extra if args.baseline_job_args is None else shlex.split(args.baseline_job_args)
    inputs = []
    if args.corpus != "bundled":
        paths = corpora.by_flag(args.corpus, args.images)
        inputs = ["--input", os.path.dirname(paths[0])]
    if args.model or args.corpus != "bundled":
        inputs += ["--model", os.path.abspath(c.model_path(args.model))]
    keys = ("process_s", "run_s", "first_caption_s") if args.command == "cold" else ("steady_s", "wall_s")
    with tempfile.TemporaryDirectory(prefix="process_runs_") as work:
        roots, baseline_commit = {}, None
        if args.baseline:
            os.makedirs(os.path.join(work, "baseline"))
            baseline_commit = c.export_revision(args.baseline, os.path.join(work, "baseline"))
            roots["baseline"] = os.path.join(work, "baseline")
        roots["working tree"] = c.REPO

        def side(root: str, tag: str):
            job_args = [*inputs, *(base_extra if tag == "baseline" else extra)]
            if args.command == "cold":
                return lambda r: [cold_run(root, job_args, os.path.join(work, "out"))]
            return lambda r: warm_process(root, job_args, os.path.join(work, f"out_{r}_{tag.replace(' ', '_')}"),
                                          args.runs)

        if args.command == "cold":  # untimed: the OS's file cache, and the LiteRT compile cache
            for name, root in roots.items():
                side(root, name)(-1)
        got = c.alternate(args.rounds, {name: side(root, name) for name, root in roots.items()},
                          log=lambda r, name, xs: c.say(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                              " ".join(f"{k} {_fmt(x.get(k))}" for k in keys) for x in xs)))
    runs = {name: [x for xs in per_round for x in xs] for name, per_round in got.items()}
    medians = {name: {k: c.median([x[k] for x in rs]) if all(x.get(k) is not None for x in rs) else None
                      for k in keys} for name, rs in runs.items()}
    report = {"corpus": args.corpus, "images": None if args.corpus == "bundled" else args.images,
              "model": args.model, "job_args": extra, "baseline_job_args": base_extra, "rounds": runs,
              "median": medians, "baseline": args.baseline, "baseline_commit": baseline_commit}
    if args.command == "warm":
        report["runs"] = report.pop("rounds")
    corpus = "the bundled samples" if args.corpus == "bundled" else f"{args.images} {args.corpus} images"
    print(f"\n| {corpus}, {args.command} (median) | {' | '.join(keys)} |\n|" + " --- |" * (len(keys) + 1))
    for name, m in medians.items():
        label = f"baseline {args.baseline} ({baseline_commit[:7]})" if name == "baseline" else name
        print(f"| {label} | " + " | ".join(_fmt(m[k]) for k in keys) + " |")
    if args.baseline:
        b, w = medians["baseline"], medians["working tree"]
        report["baseline_over_working_tree"] = {k: b[k] / w[k] if b[k] and w[k] else None for k in keys}
        print("| baseline / working tree | " + " | ".join(
            _fmt(v, "x") for v in report["baseline_over_working_tree"].values()) + " |")
    c.write_report(args, argv, "process_runs.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
