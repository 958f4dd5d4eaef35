"""The bundled Flickr8k model: what its card and report promise holds for the files shipped.

Its figures come from the Flickr8k dev and test splits, which are not in the repository
(jobs/train_flickr8k.sh makes them); here the bundle, its report, its card and its
behaviour on the shipped sample photos are checked.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from batch_caption import bundled

MODEL = bundled.BUNDLED["flickr8k"]
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
DECODERS = ("attention", "attention_seed1", "distilled", "show_and_tell")  # jobs/train_flickr8k.sh's candidates
pytestmark = pytest.mark.skipif(not MODEL.installed(), reason="no flickr8k model installed")


def _evaluation():
    with open(os.path.join(MODEL.path, "EVALUATION.json")) as f:
        return json.load(f)


def test_the_bundle_verifies_and_fits_in_30_mb():
    from batch_caption.model.bundle import verify_bundle

    manifest, config = verify_bundle(MODEL.path)
    assert manifest["bundle_id"] == MODEL.bundle_id()
    assert (config.encoder, config.image_size, config.decoder) == ("efficientnet_lite0", 224, "attention")
    size = sum(os.path.getsize(os.path.join(MODEL.path, n)) for n in os.listdir(MODEL.path))
    assert size <= 30 * 2**20


def test_no_file_of_the_bundle_names_a_machine_path():
    for name in os.listdir(MODEL.path):
        if name.endswith((".json", ".md")):
            text = open(os.path.join(MODEL.path, name), encoding="utf-8").read()
            assert not re.search(r"(^|[\s\"'(])/(work|root|home|tmp|Users)/", text), name


def test_the_report_holds_every_metric_by_dataset_and_split():
    report = _evaluation()
    for split, n in (("val", 1000), ("test", 1000)):
        figures = report["flickr8k"][split]
        assert set(METRICS) <= set(figures)
        assert figures["counts"]["n_scored"] == n and figures["counts"]["n_missing"] == 0
        for decoder in DECODERS:
            assert set(METRICS) <= set(report["decoders"][decoder][split])
    kept = report["choice"]["kept"]
    assert set(report["decoders"]) == set(DECODERS) and kept in report["decoders"]
    # The choices looked at the dev split only: the decoder, then its search settings.
    cider = report["choice"]["val_CIDEr-D"]
    assert kept == max(cider, key=cider.get)
    search = report["search"]["val_CIDEr-D"]
    assert len(search) == 16 and report["search"]["chosen"] == max(search, key=search.get)
    assert report["flickr8k"]["val"]["CIDEr-D"] == search[report["search"]["chosen"]]
    # The shipped figures are the bundle's own search: the one decode.json gives the job.
    with open(os.path.join(MODEL.path, "decode.json")) as f:
        assert report["decode"] == json.load(f)
    assert report["plain_decode"] == {"beam_size": 3, "length_normalization": 0.7, "max_length": 20,
                                      "num_alternatives": 3}


def test_the_card_gives_the_data_terms_licence_limits_and_the_reports_figures():
    card = open(os.path.join(MODEL.path, "MODEL_CARD.md"), encoding="utf-8").read()
    for needed in ("Flickr8k", "research", "Apache-2.0", "224x224", "Limits"):
        assert needed in card
    test = _evaluation()["flickr8k"]["test"]
    for metric in ("BLEU-4", "METEOR", "CIDEr-D"):
        assert f"{metric} {test[metric]:.3f}" in card


def test_the_sample_photos_get_distinct_captions_and_flags(tmp_path):
    """README command 1 on the shipped photos: one caption each, no two alike."""
    from batch_caption import run

    manifest = run.run(["--output", str(tmp_path), "--run_id", "samples"])
    assert manifest["model"] == MODEL.bundle_id()
    assert manifest["counts"]["captioned"] == len(MODEL.sample_files()) == 5
    run_dir = tmp_path / "run=samples"
    records = [json.loads(line) for shard in sorted(run_dir.glob("captions-*.jsonl")) for line in open(shard)]
    captions = [r["caption"] for r in records]
    assert len(set(captions)) == len(captions)
    with open(os.path.join(MODEL.path, "decode.json")) as f:
        shipped = json.load(f)
    assert all(r["decode"] == shipped for r in records)
    # Flags follow the model's own threshold.
    for r in records:
        assert ("low_score" in r["flags"]) == (r["score"] < MODEL.low_score)
    # The README shows what the command gives.
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `(\w+\.jpg)` \| (.*?) \| (-?\d+\.\d\d) \| (.*?) \|$", readme, re.M)
    shown = {name: (caption.replace("\\<", "<"), float(score), re.findall(r"`(\w+)`", flags))
             for name, caption, score, flags in rows}
    got = {os.path.basename(r["path"]): (r["caption"], round(r["score"], 2), r["flags"]) for r in records}
    assert shown == got
