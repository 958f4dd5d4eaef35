"""A whole command-line run in a fresh process: this working tree against a git revision.

    python bench/cold_start.py --baseline REV [--images 8] [--corpus small|large] [--rounds 5]
                               [--out bench/results/cold_start.json]

The other benchmarks time runs inside one warm process (TensorFlow imported, a first run
done), as a long job's steady state. What a user of `python -m batch_caption.run` waits for
is also the process's start and end: importing Beam and TensorFlow, the first model load,
and the interpreter's exit. Here each round runs `python -m batch_caption.run --input
CORPUS --output TMP` (bundled model, defaults) in a new process, once with the package of
`--baseline` (its tree from `git archive`, put first on PYTHONPATH) and once with this
working tree, alternating, and reports for each the median of

- process seconds: from starting the process until it has exited;
- run seconds: what the command itself prints ("... in X s": flags to manifest, model
  load included, Python start-up and exit not);

and baseline / working tree for both. Without `--baseline` only the working tree is timed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import corpora
from _common import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUN_SECONDS = re.compile(r" in ([0-9.]+) s \(")


def export_revision(rev: str, dest: str) -> str:
    """The tree of git revision `rev` under dest; -> its commit id."""
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of this repository")
    archive = subprocess.run(["git", "-C", REPO, "archive", commit.stdout.strip()], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return commit.stdout.strip()


def cold_run(package_root: str, input_dir: str, out_dir: str) -> dict:
    """One `python -m batch_caption.run` in a new process, importing batch_caption from
    package_root; -> its process and run seconds."""
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": package_root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    # cwd outside the repository, so that `batch_caption` resolves through PYTHONPATH only.
    done = subprocess.run([sys.executable, "-m", "batch_caption.run", "--input", input_dir, "--output", out_dir,
                           "--run_id", "cold"], capture_output=True, text=True, cwd=os.path.dirname(out_dir), env=env)
    process_s = time.perf_counter() - start
    found = _RUN_SECONDS.search(done.stdout)
    if done.returncode != 0 or not found:
        raise SystemExit(f"the run with {package_root} failed (rc {done.returncode}): {done.stderr[-1500:]}")
    return {"process_s": process_s, "run_s": float(found.group(1))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None, help="git revision to compare with (e.g. HEAD~1)")
    corpora.add_corpus_flag(p)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "cold_start.json"))
    args = p.parse_args(argv)
    paths = corpora.by_flag(args.corpus, args.images)
    input_dir = os.path.dirname(paths[0])
    with tempfile.TemporaryDirectory(prefix="cold_start_") as work:
        sides = {}
        baseline_commit = None
        if args.baseline:
            os.makedirs(os.path.join(work, "baseline"))
            baseline_commit = export_revision(args.baseline, os.path.join(work, "baseline"))
            sides["baseline"] = os.path.join(work, "baseline")
        sides["working tree"] = REPO
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side, root in sides.items():
                runs[side].append(cold_run(root, input_dir, os.path.join(work, "out")))
                print(f"round {r + 1}/{args.rounds} {side}: process {runs[side][-1]['process_s']:.2f} s, "
                      f"run {runs[side][-1]['run_s']:.2f} s", file=sys.stderr, flush=True)
    medians = {side: {k: statistics.median(x[k] for x in rs) for k in ("process_s", "run_s")}
               for side, rs in runs.items()}
    report = {"corpus": args.corpus, "images": args.images, "rounds": runs, "median": medians,
              "baseline": args.baseline, "baseline_commit": baseline_commit}
    print(f"\n| {args.images} {args.corpus} images, fresh process each (median of {args.rounds}) "
          f"| process s | run s |\n| --- | --- | --- |")
    for side, m in medians.items():
        label = f"baseline {args.baseline} ({baseline_commit[:7]})" if side == "baseline" else side
        print(f"| {label} | {m['process_s']:.2f} | {m['run_s']:.2f} |")
    if args.baseline:
        b, w = medians["baseline"], medians["working tree"]
        report["baseline_over_working_tree"] = {k: b[k] / w[k] for k in b}
        print(f"| baseline / working tree | {b['process_s'] / w['process_s']:.2f}x | {b['run_s'] / w['run_s']:.2f}x |")
    write_report(args.out, argv, "cold_start.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
