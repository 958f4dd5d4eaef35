"""The job in processes of its own: this working tree against a git revision.

    python bench/process_runs.py cold [--baseline REV] [--images 8] [--corpus small|large] [--rounds 5]
    python bench/process_runs.py warm --baseline REV [--images 2000] [--corpus small|large] [--rounds 3]
                                      [--runs 2] [--job_args "--no-dedupe"]
    (both: [--out FILE] [--fold NAME])

The other benchmarks time runs inside one warm process. These start a process per run
(`cold`) or per round (`warm`), once with the package of `--baseline` (its tree from `git
archive`, first on PYTHONPATH) and once with this working tree, alternating, with the
bundled model and default flags:

  cold  `python -m batch_caption.run` in a fresh process, what a user of the command waits
        for: process seconds (start to exit: imports, first model load, the interpreter's
        exit) and run seconds (the "in X s" the command prints: flags to manifest).
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
input_dir, out_dir, runs, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
def once(run_id):
    start = time.perf_counter()
    m = run.run(["--input", input_dir, "--output", out_dir, "--run_id", run_id, *extra])
    wall = time.perf_counter() - start
    c = m["counts"]
    if c["failed"] or c["captioned"] != c["matched"]:
        raise SystemExit(f"run {run_id} did not caption every image: {c}")
    wait_ms = m["metrics"].get("model_wait_ms", m["metrics"].get("model_load_ms", 0))
    return {"wall_s": wall, "steady_s": m["elapsed_seconds"] - wait_ms / 1000, "captioned": c["captioned"]}
once("warm")
print("RESULT " + json.dumps([once(f"t{i}") for i in range(runs)]))
"""


def cold_run(package_root: str, input_dir: str, out_dir: str) -> dict:
    """One `python -m batch_caption.run` in a new process; -> its process and run seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    stdout = c.run_child(["-m", "batch_caption.run", "--input", input_dir, "--output", out_dir, "--run_id", "cold"],
                         package_root, cwd=os.path.dirname(out_dir))
    process_s = time.perf_counter() - start
    found = _RUN_SECONDS.search(stdout)
    if not found:
        raise SystemExit(f"the run with {package_root} printed no run time: {stdout[-500:]}")
    return {"process_s": process_s, "run_s": float(found.group(1))}


def warm_process(package_root: str, input_dir: str, out_dir: str, runs: int, extra: list[str]) -> list[dict]:
    """A new process: one untimed run, then `runs` timed ones; -> their timings."""
    os.makedirs(out_dir, exist_ok=True)
    stdout = c.run_child(["-c", _WARM_CHILD, input_dir, out_dir, str(runs), json.dumps(extra)], package_root,
                         cwd=os.path.dirname(out_dir))
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"the runs with {package_root} printed no result")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    cold = sub.add_parser("cold", help="a whole command in a fresh process per run")
    warm = sub.add_parser("warm", help="warm runs in a process per side and round")
    for q, name, images, rounds in ((cold, "cold_start", 8, 5), (warm, "warm_runs", 2000, 3)):
        corpora.add_corpus_flag(q)
        q.add_argument("--images", type=int, default=images)
        q.add_argument("--rounds", type=int, default=rounds, help="processes per side, alternating")
        c.add_out_flags(q, name)
    cold.add_argument("--baseline", default=None, help="git revision to compare with (e.g. HEAD~1)")
    warm.add_argument("--baseline", required=True, help="git revision to compare with (e.g. HEAD~1)")
    warm.add_argument("--runs", type=int, default=2, help="timed runs per process, after one untimed")
    warm.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
    args = p.parse_args(argv)
    input_dir = os.path.dirname(corpora.by_flag(args.corpus, args.images)[0])
    extra = shlex.split(getattr(args, "job_args", ""))
    keys = ("process_s", "run_s") if args.command == "cold" else ("steady_s", "wall_s")
    with tempfile.TemporaryDirectory(prefix="process_runs_") as work:
        roots, baseline_commit = {}, None
        if args.baseline:
            os.makedirs(os.path.join(work, "baseline"))
            baseline_commit = c.export_revision(args.baseline, os.path.join(work, "baseline"))
            roots["baseline"] = os.path.join(work, "baseline")
        roots["working tree"] = c.REPO

        def side(root: str, tag: str):
            if args.command == "cold":
                return lambda r: [cold_run(root, input_dir, os.path.join(work, "out"))]
            return lambda r: warm_process(root, input_dir, os.path.join(work, f"out_{r}_{tag}"), args.runs, extra)

        got = c.alternate(args.rounds, {name: side(root, str(i)) for i, (name, root) in enumerate(roots.items())},
                          log=lambda r, name, xs: c.say(f"round {r + 1}/{args.rounds} {name}: " + ", ".join(
                              " ".join(f"{k} {x[k]:.2f}" for k in keys) for x in xs)))
    runs = {name: [x for xs in per_round for x in xs] for name, per_round in got.items()}
    medians = {name: {k: c.median(rs, lambda x: x[k]) for k in keys} for name, rs in runs.items()}
    report = {"corpus": args.corpus, "images": args.images, "job_args": extra, "rounds": runs, "median": medians,
              "baseline": args.baseline, "baseline_commit": baseline_commit}
    if args.command == "warm":
        report["runs"] = report.pop("rounds")
    print(f"\n| {args.images} {args.corpus} images, {args.command} (median) | {' | '.join(keys)} |\n| --- | --- | --- |")
    for name, m in medians.items():
        label = f"baseline {args.baseline} ({baseline_commit[:7]})" if name == "baseline" else name
        print(f"| {label} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |")
    if args.baseline:
        b, w = medians["baseline"], medians["working tree"]
        report["baseline_over_working_tree"] = {k: b[k] / w[k] for k in keys}
        print("| baseline / working tree | " + " | ".join(f"{b[k] / w[k]:.2f}x" for k in keys) + " |")
    c.write_report(args, argv, "process_runs.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
