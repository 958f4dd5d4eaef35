"""The job on 12 MP photos: JPEG draft decoding (the default) vs full-resolution decoding.

    python bench/large_photos.py [--n 200] [--rounds 3] [--out bench/results/large_photos.json]

The real job (`batch_caption.run`, DirectRunner in memory, bundled default model) captions
the same `--n` generated 4000x3000 JPEGs (`corpora.large_photos`) with `--draft` and with
`--no-draft`, alternating in one process after an untimed warm-up run of each on a few
photos, so both see the same machine load and neither pays the one-time imports.
Throughput is the job's own: inputs / the manifest's `elapsed_seconds` (model load
included). A timed run of `--warmup` photos per mode gives each run's fixed cost, and the
rate without it: (n - warmup) / (T(n) - T(warmup)), T a run's steady time (elapsed -
`model_wait_ms`; a short run waits for the whole load, which a long one hides behind
decoding). Reports the median images/s of each, their ratio, and the two modes' captions
compared file by file (last round). As context, `images.decoding.decode_image` alone on every
photo's bytes, draft and full alternately: median ms per image and the mean / max absolute
pixel difference of the two outputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import _common as c
from corpora import large_photos

MODES = {"draft": ["--draft"], "full": ["--no-draft"]}


def _job(inputs: list[str], out: str, run_id: str, mode: str, batch_size: int | None) -> dict:
    argv = [a for p in inputs for a in ("--input", p)]
    argv += ["--output", out, "--run_id", run_id, *MODES[mode]]
    if batch_size is not None:
        argv += ["--batch_size", str(batch_size)]
    manifest = c.run_job(argv)
    captions, errors = c.read_run(os.path.join(out, f"run={run_id}"))
    return {"manifest": manifest, "captions": captions, "errors": errors}


def _decode_timing(paths: list[str], image_size: int) -> dict:
    ms: dict[str, list[float]] = {mode: [] for mode in MODES}
    diffs_mean, diffs_max = [], []
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            data = f.read()
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
        pixels = {}
        for mode in order:
            start = time.perf_counter()
            decoded = c.decode(data, image_size, draft=(mode == "draft"))
            ms[mode].append((time.perf_counter() - start) * 1e3)
            pixels[mode] = decoded.astype(np.int16)
        diff = np.abs(pixels["draft"] - pixels["full"])
        diffs_mean.append(float(diff.mean()))
        diffs_max.append(int(diff.max()))
    med = {mode: statistics.median(v) for mode, v in ms.items()}
    return {
        "image_size": image_size,
        "images": len(paths),
        "median_ms_per_image": med,
        "full_over_draft": med["full"] / med["draft"],
        "pixel_abs_diff": {"mean": float(np.mean(diffs_mean)), "max": max(diffs_max)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="photos in the corpus (4000x3000 JPEG)")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of each mode, alternating (the ratio moves with the host's load: a median of 3)")
    p.add_argument("--warmup", type=int, default=4, help="photos in the untimed warm-up run of each mode")
    p.add_argument("--batch_size", type=int, default=None, help="the job's --batch_size (default: the job's own)")
    p.add_argument("--root", default=None, help="corpus cache (default bench/.corpus)")
    c.add_out_flags(p, "large_photos")
    args = p.parse_args(argv)

    paths = large_photos(args.n, root=args.root)
    corpus_dir = os.path.dirname(paths[0])
    model_id, image_size = c.model_image_size(c.model_path())
    work = tempfile.mkdtemp(prefix="bench_large_")
    try:
        for mode in MODES:  # Beam and TensorFlow imports, first traces: paid once, untimed
            _job(paths[: args.warmup], os.path.join(work, "warmup"), f"warmup-{mode}", mode, args.batch_size)
        small: dict[str, float] = {}  # steady seconds of a run of --warmup photos: the per-run fixed cost
        for mode in MODES:
            job = _job(paths[: args.warmup], os.path.join(work, "warmup"), f"small-{mode}", mode, args.batch_size)
            small[mode] = c.steady_seconds(job["manifest"])
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        last: dict[str, dict] = {}
        unstable = {mode: set() for mode in MODES}  # paths whose caption changed between rounds of one mode
        for r in range(args.rounds):
            for mode in MODES:
                job = _job([corpus_dir], os.path.join(work, "runs"), f"{mode}-{r}", mode, args.batch_size)
                m = job["manifest"]
                rate = m["counts"]["inputs"] / m["elapsed_seconds"]
                runs[mode].append({"seconds": m["elapsed_seconds"], "steady_s": c.steady_seconds(m), "images_per_s": rate,
                                   "captioned": m["counts"]["captioned"], "errors": job["errors"],
                                   "model_loads": m["metrics"].get("model_loads")})
                print(f"round {r + 1}/{args.rounds} {mode}: {m['counts']['captioned']} captioned in "
                      f"{m['elapsed_seconds']:.1f} s ({rate:.2f} img/s)", file=sys.stderr, flush=True)
                if mode in last:
                    unstable[mode] |= {p for p, r in job["captions"].items()
                                       if p in last[mode] and last[mode][p]["caption"] != r["caption"]}
                last[mode] = job["captions"]
                shutil.rmtree(os.path.join(work, "runs", f"run={mode}-{r}"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    draft, full = last["draft"], last["full"]
    common = sorted(set(draft) & set(full))
    differing = [
        {"path": os.path.relpath(path, corpus_dir), "draft": draft[path]["caption"], "full": full[path]["caption"],
         "draft_score": draft[path]["score"], "full_score": full[path]["score"]}
        for path in common if draft[path]["caption"] != full[path]["caption"]
    ]
    score_diff = [abs(draft[p]["score"] - full[p]["score"]) for p in common]
    med = {mode: statistics.median(x["images_per_s"] for x in rs) for mode, rs in runs.items()}
    # Without the fixed cost of a run: (n - w) photos in (T(n) - T(w)) steady seconds, same mode.
    marginal = {}
    for mode, rs in runs.items():
        extra = statistics.median(x["steady_s"] for x in rs) - small[mode]
        marginal[mode] = (len(paths) - args.warmup) / extra if extra > 0 and len(paths) > args.warmup else None
    decode = _decode_timing(paths, image_size)
    report = {
        "model": model_id,
        "settings": vars(args),
        "corpus": {"dir": corpus_dir, "files": len(paths),
                   "mean_bytes": int(np.mean([os.path.getsize(x) for x in paths]))},
        "runner": "DirectRunner (default: in_memory, 1 worker)",
        "runs": runs,
        "median_images_per_s": med,
        "draft_over_full": med["draft"] / med["full"],
        "seconds_of_a_run_of_warmup_photos": small,
        "marginal_images_per_s": marginal,
        "marginal_draft_over_full": marginal["draft"] / marginal["full"] if all(marginal.values()) else None,
        "captions": {
            "compared": len(common),
            "only_in_one_mode": len(set(draft) ^ set(full)),
            "identical": len(common) - len(differing),
            "differing": differing,
            "max_abs_score_diff": max(score_diff, default=0.0),
            "changed_between_rounds_of_one_mode": {mode: len(paths_) for mode, paths_ in unstable.items()},
        },
        "decode_only": decode,
    }
    print(f"| decoding | job img/s (median of {args.rounds}) | job img/s without the fixed cost of a run "
          "| decode only, ms / photo (median) |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        m = f"{marginal[mode]:.2f}" if marginal[mode] else "-"
        print(f"| {mode} | {med[mode]:.2f} | {m} | {decode['median_ms_per_image'][mode]:.1f} |")
    ratio = report["marginal_draft_over_full"]
    print(f"\ndraft / full: job {med['draft'] / med['full']:.2f}x "
          f"(without the fixed cost {f'{ratio:.2f}x' if ratio else '-'}), decode alone {decode['full_over_draft']:.2f}x "
          f"({len(paths)} photos of 4000x3000, model input {image_size} px)")
    cap = report["captions"]
    print(f"captions identical: {cap['identical']}/{cap['compared']} (max |score diff| {cap['max_abs_score_diff']:.4f}); "
          f"pixels |draft - full|: mean {decode['pixel_abs_diff']['mean']:.3f}, max {decode['pixel_abs_diff']['max']}; "
          f"changed between rounds of one mode: {cap['changed_between_rounds_of_one_mode']}")
    for d in differing:
        print(f"  {d['path']}: draft {d['draft']!r} ({d['draft_score']:.3f}) | full {d['full']!r} ({d['full_score']:.3f})")
    c.write_report(args, argv, "large_photos.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
