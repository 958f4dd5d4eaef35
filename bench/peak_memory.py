"""Peak memory of the job: flat as the input grows, per image of batch, against a revision.

    python bench/peak_memory.py [--sizes 1000,10000] [--image_px 64] [--with_no_dedupe] [--out bench/results/peak_memory.json]
    python bench/peak_memory.py --corpus web --sizes 1000 --batch_sizes 16,41,82 [--baseline REV] [--fold NAME]

For each size, the real job (`python -m batch_caption.run`, bundled default model,
DirectRunner in its default running mode, reported) captions a corpus of that many small
generated JPEG scenes (`corpora.small_images(n, size=--image_px)`), each in its own fresh
process, so every peak starts from nothing. Two measures of each run:

- `ru_maxrss`: the kernel's peak resident set size of the job process, or of any of its
  descendants it waited for (`os.wait4` on the child; on Linux the maximum over them,
  not their sum). Exact, whatever the timing.
- `tree_rss_peak`: the largest sum of VmRSS over the job process and all its descendants,
  sampled from /proc every `--interval` seconds (Linux; can miss a short spike, but counts
  worker processes together, e.g. with --direct_running_mode=multi_processing).

The target: peak(largest size) <= 1.1 x peak(smallest size). `--corpus web|large` uses
640x480 web photos or 12 MP phone photos instead of the scenes. `--batch_sizes` runs each
size at each `--batch_size` and fits peak = fixed + slope x batch size by least squares:
the slope is the memory each image of a batch costs, over every copy the job holds of it
in flight (bytes, pixels, model tensors). `--baseline REV` runs the same at git revision
REV (its tree exported with `git archive`, first on PYTHONPATH) and reports this tree's
peak over REV's at each equal batch size. `--with_no_dedupe`
also runs every size with `--no-dedupe`: the dedupe step groups the files' bytes by
sha256, and the in-memory runner holds a whole GroupByKey's output (every file's bytes)
at once. Extra job flags go after `--`, e.g.
`-- --direct_running_mode=multi_processing --direct_num_workers=2`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import _common as c
from corpora import by_flag


def _rss_tree_kib(root: int) -> int:
    """Sum of VmRSS (KiB) of `root` and its descendants, from /proc (0 if unreadable)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces or parentheses
        parents[int(name)] = int(stat[stat.rfind(")") + 2:].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def measure_process(cmd: list[str], log: str, interval: float, package_root: str | None = None,
                    cwd: str | None = None) -> dict:
    """Runs `cmd` (output to `log`; batch_caption from `package_root` when given, from a
    `cwd` outside the repository so that only PYTHONPATH decides) -> its seconds, ru_maxrss
    and the sampled peak RSS of its process tree (every `interval` s); a failed command
    ends the benchmark."""
    env = c.child_env(package_root)
    samples: list[tuple[float, int]] = []
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        done = threading.Event()

        def sample():
            while not done.wait(interval):
                samples.append((time.perf_counter() - start, _rss_tree_kib(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        with open(log) as f:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{f.read()[-3000:]}")
    peak_at = max(samples, key=lambda s: s[1]) if samples else (0.0, 0)
    return {
        "seconds": seconds,
        "ru_maxrss_mib": usage.ru_maxrss / 1024,  # Linux: KiB
        "tree_rss_peak_mib": peak_at[1] / 1024,
        "tree_rss_peak_at_s": peak_at[0],
        # (seconds, MiB) every ~2 s: where in the run memory grows
        "tree_rss_mib_over_time": [(round(t, 1), round(k / 1024, 1))
                                   for t, k in samples[:: max(1, int(round(2.0 / interval)))]],
    }


def _fit(points: list[tuple[float, float]]) -> dict:
    """Least squares y = fixed + slope * x over (x, y) points."""
    slope, fixed = statistics.linear_regression(*zip(*points))
    return {"fixed_mib": fixed, "slope_mib_per_batch_image": slope}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000", help="comma-separated image counts, smallest first")
    p.add_argument("--corpus", choices=["small", "web", "large"], default="small",
                   help="generated scenes of --image_px (default), 640x480 web photos or 12 MP photos")
    p.add_argument("--image_px", type=int, default=64, help="side of the generated JPEG scenes")
    p.add_argument("--batch_sizes", default="", help="comma-separated --batch_size values (default: the job's)")
    p.add_argument("--baseline", default=None, help="also run git revision REV's job")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between /proc samples")
    p.add_argument("--root", default=None, help="corpus cache (default bench/.corpus)")
    c.add_out_flags(p, "peak_memory")
    p.add_argument("--with_no_dedupe", action="store_true",
                   help="also run every size with --no-dedupe (isolates the dedupe shuffle's share of the peak)")
    p.add_argument("job_args", nargs="*", help="extra batch_caption.run / Beam flags (after --)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    flag_sets = {"job defaults": []}
    if args.with_no_dedupe:
        flag_sets["--no-dedupe"] = ["--no-dedupe"]

    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    options = PipelineOptions(args.job_args)
    direct = options.view_as(DirectOptions)
    runner = {"runner": options.view_as(StandardOptions).runner or "DirectRunner (the job's default)",
              "direct_running_mode": direct.direct_running_mode, "direct_num_workers": direct.direct_num_workers}

    work = tempfile.mkdtemp(prefix="bench_mem_")
    trees = {"this tree": c.REPO}
    report_extra = {}
    if args.baseline:
        trees[args.baseline] = os.path.join(work, "baseline")
        os.makedirs(trees[args.baseline])
        report_extra["baseline_commit"] = c.export_revision(args.baseline, trees[args.baseline])

    def name(tree: str, label: str, batch: int | None) -> str:
        return label + (f", batch {batch}" if batch else "") + (f" ({tree})" if args.baseline else "")

    variants = {name(tree, label, b): [*flags, *(["--batch_size", str(b)] if b else [])]
                for tree in trees for label, flags in flag_sets.items() for b in batch_sizes or [None]}
    results: dict[str, dict[str, dict]] = {v: {} for v in variants}
    try:
        for n in sizes:
            corpus = os.path.dirname(by_flag(args.corpus, n, args.image_px, args.root)[0])
            for tree, root in trees.items():
                for label in flag_sets:
                    for b in batch_sizes or [None]:
                        variant = name(tree, label, b)
                        run_id = f"n{n}-v{list(variants).index(variant)}"
                        cmd = [sys.executable, "-m", "batch_caption.run", "--input", corpus,
                               "--output", os.path.join(work, "out"), "--run_id", run_id, *args.job_args,
                               *variants[variant]]
                        log = os.path.join(work, f"{run_id}.log")
                        res = measure_process(cmd, log, args.interval, package_root=root, cwd=work)
                        with open(log) as f:
                            res["summary"] = [line for line in f.read().splitlines() if line.startswith("run=")][-1:]
                        results[variant][str(n)] = res
                        print(f"{n} images ({variant}): ru_maxrss {res['ru_maxrss_mib']:.0f} MiB, tree RSS peak "
                              f"{res['tree_rss_peak_mib']:.0f} MiB, {res['seconds']:.0f} s", file=sys.stderr,
                              flush=True)
                        shutil.rmtree(os.path.join(work, "out", f"run={run_id}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {"settings": vars(args), "runner": runner, **report_extra, "results": results}
    print(f"runner: {runner['runner']}, direct_running_mode={runner['direct_running_mode']}, "
          f"direct_num_workers={runner['direct_num_workers']}; corpus {args.corpus}\n")
    print("| flags | images | peak RSS (ru_maxrss), MiB | peak RSS of the process tree (sampled), MiB | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for variant, res in results.items():
        for n in sizes:
            r = res[str(n)]
            print(f"| {variant} | {n:,} | {r['ru_maxrss_mib']:.0f} | {r['tree_rss_peak_mib']:.0f} | {r['seconds']:.0f} |")
    print()
    if len(sizes) > 1:
        ratios = {}
        for variant, res in results.items():
            first, last = res[str(sizes[0])], res[str(sizes[-1])]
            ratios[variant] = {
                "ru_maxrss": last["ru_maxrss_mib"] / first["ru_maxrss_mib"],
                "tree_rss_peak": (last["tree_rss_peak_mib"] / first["tree_rss_peak_mib"]
                                  if first["tree_rss_peak_mib"] else None),
            }
            tree = ratios[variant]["tree_rss_peak"]
            print(f"{variant}: {sizes[-1]:,} / {sizes[0]:,} images: ru_maxrss {ratios[variant]['ru_maxrss']:.2f}x, "
                  f"tree peak {f'{tree:.2f}x' if tree else '-'} (target <= 1.1x)")
        report[f"ratio_{sizes[-1]}_over_{sizes[0]}"] = ratios
    if len(batch_sizes) > 1:
        fits = {}
        for tree in trees:
            for label in flag_sets:
                key = name(tree, label, None)
                fits[key] = {str(n): _fit([(b, results[name(tree, label, b)][str(n)]["ru_maxrss_mib"])
                                           for b in batch_sizes]) for n in sizes}
                for n, fit in fits[key].items():
                    print(f"{key}, {int(n):,} images: peak RSS = {fit['fixed_mib']:.0f} MiB + "
                          f"{fit['slope_mib_per_batch_image']:.2f} MiB x batch size")
        report["rss_per_batch_image"] = fits
    if args.baseline:
        over = {}
        for label in flag_sets:
            for b in batch_sizes or [None]:
                for n in sizes:
                    ours = results[name("this tree", label, b)][str(n)]["ru_maxrss_mib"]
                    theirs = results[name(args.baseline, label, b)][str(n)]["ru_maxrss_mib"]
                    key = f"{name('', label, b).removesuffix(' ()')}, {n} images"
                    over[key] = ours / theirs
                    print(f"{key}: peak RSS this tree / {args.baseline}: {ours:.0f} / {theirs:.0f} MiB "
                          f"= {ours / theirs:.2f}x")
        report["peak_rss_over_baseline"] = over
    c.write_report(args, argv, "peak_memory.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
