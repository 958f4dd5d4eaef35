"""Do the quality flags mark bad captions of real photos more often than good ones?

    python bench/flags_on_photos.py --run RUN_DIR --references references_val.json \
        [--out bench/results/flags_on_photos.json]

RUN_DIR is a finished job run over held-out photos with human references (e.g. the Flickr8k
dev split, captioned by jobs/train_flickr8k.sh). Each caption is scored alone with
CIDEr-D against its image's references (pycocoevalcap, PTB tokens; idf from all the
run's references), and the captions are cut into quartiles of that score. Reports, per
quartile, the share with any flag and with each flag: a useful flag fires more often in
the bottom quartile (captions that share little with what people said) than in the top.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

import _common as c

FLAGS = ("low_score", "repeated_ngram", "truncated", "unknown_word")


def _records(run_dir):
    out = []
    for shard in sorted(glob.glob(os.path.join(run_dir, "captions-*.jsonl"))):
        with open(shard) as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run directory of the job")
    p.add_argument("--references", required=True, help="COCO-format references of the run's images")
    c.add_out_flags(p, "flags_on_photos")
    args = p.parse_args(argv)

    from pycocoevalcap.cider.cider import Cider

    from batch_caption import evaluate
    from batch_caption.evaluation import metrics

    records = _records(args.run)
    file_names, references = evaluate.read_references(args.references)
    by_id = {}
    for r in records:  # one record at a time: the evaluate command's own path matching, per record
        for image_id in evaluate.match_predictions([(r["path"], r["caption"])], file_names).predictions:
            by_id.setdefault(image_id, r)
    ids = sorted(by_id)
    gts = metrics.tokenize({i: references[i] for i in ids})
    res = metrics.tokenize({i: [by_id[i]["caption"]] for i in ids})
    _, per_image = Cider().compute_score(gts, res)
    per_image = np.asarray(per_image, dtype=float)
    edges = np.quantile(per_image, [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, per_image, side="right")
    rows = {}
    for q, name in enumerate(("bottom", "second", "third", "top")):
        members = [by_id[i] for i, k in zip(ids, quartile) if k == q]
        flagged = lambda flag: sum(1 for r in members if flag in r["flags"]) / max(len(members), 1)  # noqa: E731
        rows[name] = {"images": len(members),
                      "cider_d_range": [float(per_image[quartile == q].min()), float(per_image[quartile == q].max())],
                      "any_flag": sum(1 for r in members if r["flags"]) / max(len(members), 1),
                      **{flag: flagged(flag) for flag in FLAGS}}
    report = {"images": len(ids), "model": records[0]["model"] if records else None,
              "decode": records[0]["decode"] if records else None, "quartiles_by_cider_d": rows,
              "bottom_over_top_any_flag": rows["bottom"]["any_flag"] / rows["top"]["any_flag"]
              if rows["top"]["any_flag"] else None}
    print(f"{'quartile':8} {'images':>6} {'CIDEr-D':>13} {'any flag':>8} " + " ".join(f"{f:>14}" for f in FLAGS))
    for name, row in rows.items():
        lo, hi = row["cider_d_range"]
        print(f"{name:8} {row['images']:6d} {lo:6.2f}-{hi:6.2f} {row['any_flag']:8.3f} "
              + " ".join(f"{row[f]:14.3f}" for f in FLAGS))
    c.write_report(args, argv if argv is not None else sys.argv[1:], "flags_on_photos.py", report)


if __name__ == "__main__":
    main()
