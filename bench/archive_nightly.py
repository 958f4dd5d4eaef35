"""The nightly drill: an archive of N small images, a first full run, then nightly
--incremental runs with churn, through jobs/nightly_archive.sh, beside a baseline revision.

    python bench/archive_nightly.py --files 100000 --nights 10 --baseline 4902db0
    python bench/archive_nightly.py --files 1000000 --nights 3 --baseline 4902db0 --fold n1m

Each night first changes the archive (new, modified, deleted and touched files, each
--churn of N; a last, extra night changes nothing), then runs this tree and the baseline on
it, each into an output of its own, with the runner settings this tree's
jobs/nightly_archive.sh gives (the baseline's package first on PYTHONPATH). Per night and side: wall time, peak RSS of
the whole process tree, files read and catalog rows (from the manifest, where that code
writes them), captioned and skipped.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import _common as c


def _contents(distinct: int, seed: int) -> list[bytes]:
    """`distinct` small PNGs of different colours and sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(distinct):
        side = 12 + i % 9
        px = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _path(root: str, i: int) -> str:
    return os.path.join(root, f"d{i // 1000:05d}", f"img{i:08d}.png")


def build_archive(root: str, n: int, contents: list[bytes]) -> None:
    for d in range((n + 999) // 1000):
        os.makedirs(os.path.join(root, f"d{d:05d}"), exist_ok=True)
    for i in range(n):
        with open(_path(root, i), "wb") as f:
            f.write(contents[i % len(contents)])


def churn(root: str, live: list[int], next_id: int, k: int, contents: list[bytes], rng: random.Random):
    """k new, k modified (other bytes), k deleted, k touched files -> (live, next_id)."""
    if k == 0:
        return live, next_id
    picked = rng.sample(range(len(live)), 3 * k)
    modified, deleted, touched = picked[:k], set(picked[k:2 * k]), picked[2 * k:]
    for j in modified:
        with open(_path(root, live[j]), "wb") as f:
            f.write(rng.choice(contents) + b"\0")  # a trailing byte: other content, other size
    for j in touched:
        p = _path(root, live[j])
        st = os.stat(p)
        os.utime(p, (st.st_atime, st.st_mtime + 60))
    for j in deleted:
        os.remove(_path(root, live[j]))
    live = [x for j, x in enumerate(live) if j not in deleted]
    for i in range(next_id, next_id + k):
        os.makedirs(os.path.dirname(_path(root, i)), exist_ok=True)
        with open(_path(root, i), "wb") as f:
            f.write(rng.choice(contents))
        live.append(i)
    return live, next_id + k


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
        rss[int(name)] = int(fields[21]) * page
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def timed(cmd: list[str], env: dict, cwd: str) -> tuple[float, int, int, str]:
    """Runs cmd in `cwd` -> (wall seconds, peak RSS of its process tree, exit code, stderr tail).

    `cwd` must lie outside the repository: `python -m` puts the working directory first on
    sys.path, ahead of PYTHONPATH, which would run this tree's package for the baseline."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    return time.time() - started, peak, proc.returncode, err[-1500:]


def nightly_command(script: str, archive: str, out: str, run_id: str, extra: list[str]) -> list[str]:
    """The command `script` (a jobs/nightly_archive.sh) runs, as it prints it with DRY_RUN=1."""
    env = {**os.environ, "ARCHIVE": archive, "OUT": out, "RUN_ID": run_id, "PYTHON": sys.executable, "DRY_RUN": "1"}
    printed = subprocess.run(["bash", script, *extra], env=env, capture_output=True, text=True, check=True).stdout
    return shlex.split(printed)


def read_manifest(out: str, run_id: str) -> dict:
    import json

    with open(os.path.join(out, f"run={run_id}", "manifest.json")) as f:
        return json.load(f)


def run_side(name: str, side: dict, archive: str, night: int) -> dict:
    """One night of one side, with its own bundled default model."""
    run_id = f"night{night:02d}"
    cmd = nightly_command(side["script"], archive, side["out"], run_id, [])
    env = c.child_env(side["root"])
    wall, peak, code, err = timed(cmd, env, cwd=os.path.dirname(side["out"]))
    if code != 0:
        raise SystemExit(f"{name} night {night} failed (rc {code}):\n{err}")
    counts = read_manifest(side["out"], run_id)["counts"]
    row = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1), "captioned": counts["captioned"],
           "failed": counts["failed"], "skipped": counts["skipped"], "matched": counts["matched"],
           "read": counts.get("read"), "catalog_rows": counts.get("catalog_rows")}
    c.say(f"night {night} {name}: {row}")
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000, help="archive size N")
    p.add_argument("--nights", type=int, default=3,
                   help="nightly runs with churn after the first full run; one night without churn follows")
    p.add_argument("--churn", type=float, default=0.001, help="share of N new, modified, deleted and touched each night")
    p.add_argument("--rss_per_file_from", default=None, metavar="JSON",
                   help="an earlier report of this drill at a smaller N: report the growth of the no-change "
                        "night's peak RSS per archived file between the two")
    p.add_argument("--distinct", type=int, default=300, help="distinct image contents in the archive")
    p.add_argument("--baseline", default=None, help="git revision run beside this tree (its own nightly script)")
    p.add_argument("--baseline_nights", choices=("all", "ends"), default="all",
                   help="nights the baseline runs: all, or the first, the last with churn and the one without "
                        "(its history is then shorter, which can only make it faster)")
    p.add_argument("--work", default=None, help="folder for the archive and outputs (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    c.add_out_flags(p, "archive_nightly")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="archive_nightly-"))
    try:
        sides = {"tree": {"root": c.REPO, "script": os.path.join(c.REPO, "jobs", "nightly_archive.sh"),
                          "out": os.path.join(work, "out-tree")}}
        if args.baseline:
            base_root = os.path.join(work, "baseline")
            os.makedirs(base_root)
            commit = c.export_revision(args.baseline, base_root)
            sides["baseline"] = {"root": base_root, "script": sides["tree"]["script"],
                                 "out": os.path.join(work, "out-baseline"), "commit": commit}
        archive = os.path.join(work, "archive")
        contents = _contents(args.distinct, args.seed)
        t = time.time()
        build_archive(archive, args.files, contents)
        c.say(f"archive of {args.files:,} files built in {time.time() - t:.0f} s")
        rng = random.Random(args.seed)
        live, next_id = list(range(args.files)), args.files
        k = round(args.churn * args.files)
        nights = []
        for night in range(args.nights + 2):
            changes = k if 1 <= night <= args.nights else 0
            live, next_id = churn(archive, live, next_id, changes, contents, rng)
            runs_here = {name: side for name, side in sides.items()
                         if name == "tree" or args.baseline_nights == "all" or night in (0, args.nights, args.nights + 1)}
            rows = {name: run_side(name, side, archive, night) for name, side in runs_here.items()}
            nights.append({"night": night, "churn_each": changes, "live_files": len(live), **rows})
        report = {"files": args.files, "nights": args.nights, "churn": args.churn, "distinct": args.distinct,
                  "baseline": sides.get("baseline", {}).get("commit"), "per_night": nights}
        last = nights[-1]
        if "baseline" in last:
            report["no_change_wall_ratio"] = round(last["tree"]["wall_s"] / last["baseline"]["wall_s"], 3)
        churned = [n for n in nights if n["churn_each"]]
        if len(churned) >= 2:
            report["last_vs_first_churn_night"] = round(churned[-1]["tree"]["wall_s"] / churned[0]["tree"]["wall_s"], 3)
        if args.rss_per_file_from:
            import json

            with open(args.rss_per_file_from) as f:
                small = json.load(f)  # the file's main report
            a, b = small["per_night"][-1]["tree"]["peak_rss_mb"], last["tree"]["peak_rss_mb"]
            report["rss_growth_bytes_per_file"] = round((b - a) * 2**20 / (args.files - small["files"]), 1)
        return c.write_report(args, argv, "archive_nightly.py", report)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
