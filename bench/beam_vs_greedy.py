"""Cost of beam search k=3 against greedy decoding, per batch, on the bundled model.

    python bench/beam_vs_greedy.py [--batch 32] [--rounds 20] [--out bench/results/beam_vs_greedy.json]

One process, one model: the two Captioners share the weights and are timed alternately
(k=3, k=1, k=3, ...) on the same pre-decoded batch of synthetic scenes, after a warm-up
call each, so both see the same machine load. Reports the median seconds per batch of each
and the ratio k=3 / greedy (the issue's target: <= 1.6).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from _common import write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--model", default=None, help="bundle (default: the bundled model)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "beam_vs_greedy.json"))
    args = p.parse_args(argv)

    from batch_caption import run
    from batch_caption.data import scenes
    from batch_caption.model.bundle import load_captioner
    from batch_caption.model.config import DecodeConfig

    model = args.model or run.DEFAULT_MODEL
    beam = load_captioner(model, DecodeConfig(beam_size=3, num_alternatives=3))
    greedy = beam.with_decode(DecodeConfig(beam_size=1, num_alternatives=1))
    size = beam.image_size
    config = scenes.SceneConfig(image_size=size)
    batch = np.stack([np.asarray(scenes.render_scene(s, config)) for s in scenes.generate_scenes("test", args.batch, seed=7, config=config)])

    times: dict[str, list[float]] = {"beam3": [], "greedy": []}
    for captioner in (beam, greedy):
        captioner.search(batch)  # trace + warm up
    for _ in range(args.rounds):
        for name, captioner in (("beam3", beam), ("greedy", greedy)):
            start = time.perf_counter()
            captioner.search(batch)
            times[name].append(time.perf_counter() - start)

    b, g = statistics.median(times["beam3"]), statistics.median(times["greedy"])
    report = {
        "model": beam.model_id,
        "settings": vars(args),
        "seconds_per_batch": times,
        "median": {"beam3": b, "greedy": g},
        "beam3_over_greedy": b / g,
    }
    print(f"| decoding | s / batch of {args.batch} (median of {args.rounds}) |\n| --- | --- |")
    print(f"| beam k=3 | {b:.4f} |\n| greedy | {g:.4f} |\n\nbeam3 / greedy = {b / g:.2f}x")
    write_report(args.out, argv, "beam_vs_greedy.py", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
