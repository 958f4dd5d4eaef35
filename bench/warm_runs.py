"""Warm runs of the job in processes of their own: this working tree against a git revision.

    python bench/warm_runs.py --baseline REV [--corpus small|large] [--images 2000]
                              [--rounds 3] [--runs 2] [--job_args "--no-dedupe"]
                              [--out bench/results/warm_runs.json]

For a code change that no flag switches, the A/B the other benchmarks make between flags in
one process: each round starts one process per side (the package of `--baseline`, from `git
archive`, first on PYTHONPATH; then this working tree), which runs the job once untimed
(TensorFlow imported, a first run done) and then `--runs` times timed, in process
(`batch_caption.run.run`, bundled model, defaults plus `--job_args`). Sides alternate round
by round; for each it reports the median over all timed runs of

- steady seconds: the manifest's `elapsed_seconds` - its `model_wait_ms`, the time the run
  waited for its model load (as the other benchmarks' "steady"; a baseline from before
  that metric existed loaded the model before any decode, so its `model_load_ms` is the
  wait);
- wall seconds: the whole `run.run` call;

and baseline / working tree for both (> 1: the working tree is faster). Every timed run
must caption every image.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

import corpora
from _common import write_report
from cold_start import REPO, export_revision

# Runs in the child process, with only PYTHONPATH deciding which batch_caption it imports.
# Its steady time is _common.steady_seconds written out (the child does not import bench/),
# with model_load_ms standing in for a baseline from before model_wait_ms existed.
_CHILD = r"""
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
    return {"wall_s": wall, "steady_s": m["elapsed_seconds"] - m["metrics"].get("model_wait_ms", m["metrics"].get("model_load_ms", 0)) / 1000,
            "captioned": c["captioned"]}
once("warm")
print("RESULT " + json.dumps([once(f"t{i}") for i in range(runs)]))
"""


def warm_process(package_root: str, input_dir: str, out_dir: str, runs: int, extra: list[str]) -> list[dict]:
    """A new process importing batch_caption from package_root: one untimed run, then
    `runs` timed ones; -> their timings."""
    env = {**os.environ, "PYTHONPATH": package_root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # cwd outside the repository, so that `batch_caption` resolves through PYTHONPATH only.
    done = subprocess.run([sys.executable, "-c", _CHILD, input_dir, out_dir, str(runs), json.dumps(extra)],
                          capture_output=True, text=True, cwd=os.path.dirname(out_dir), env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the runs with {package_root} failed (rc {done.returncode}): {done.stderr[-1500:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="git revision to compare with (e.g. HEAD~1)")
    corpora.add_corpus_flag(p)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3, help="processes per side, alternating")
    p.add_argument("--runs", type=int, default=2, help="timed runs per process, after one untimed")
    p.add_argument("--job_args", default="", help="extra batch_caption.run flags, one string")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "warm_runs.json"))
    args = p.parse_args(argv)
    paths = corpora.by_flag(args.corpus, args.images)
    input_dir = os.path.dirname(paths[0])
    extra = shlex.split(args.job_args)
    with tempfile.TemporaryDirectory(prefix="warm_runs_") as work:
        os.makedirs(os.path.join(work, "baseline"))
        baseline_commit = export_revision(args.baseline, os.path.join(work, "baseline"))
        sides = {"baseline": os.path.join(work, "baseline"), "working tree": REPO}
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side, root in sides.items():
                out = os.path.join(work, f"out_{r}_{side.replace(' ', '_')}")
                got = warm_process(root, input_dir, out, args.runs, extra)
                runs[side].extend(got)
                print(f"round {r + 1}/{args.rounds} {side}: steady "
                      + ", ".join(f"{x['steady_s']:.2f}" for x in got) + " s", file=sys.stderr, flush=True)
    medians = {side: {k: statistics.median(x[k] for x in rs) for k in ("steady_s", "wall_s")} for side, rs in runs.items()}
    b, w = medians["baseline"], medians["working tree"]
    ratio = {k: b[k] / w[k] for k in b}
    report = {"corpus": args.corpus, "images": args.images, "job_args": extra, "runs": runs, "median": medians,
              "baseline": args.baseline, "baseline_commit": baseline_commit, "baseline_over_working_tree": ratio}
    n = args.rounds * args.runs
    print(f"\n| {args.images} {args.corpus} images, warm runs (median of {n}: {args.runs} per process) "
          f"| steady s | wall s |\n| --- | --- | --- |")
    print(f"| baseline {args.baseline} ({baseline_commit[:7]}) | {b['steady_s']:.2f} | {b['wall_s']:.2f} |")
    print(f"| working tree | {w['steady_s']:.2f} | {w['wall_s']:.2f} |")
    print(f"| baseline / working tree | {ratio['steady_s']:.2f}x | {ratio['wall_s']:.2f}x |")
    write_report(args.out, argv, "warm_runs.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
