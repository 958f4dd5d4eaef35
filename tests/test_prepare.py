"""Dataset preparation end to end: records, vocabulary, references, errors, flags."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import varied_images
from PIL import Image

from batch_caption import api, prepare
from batch_caption.data import sources, tfrecord
from batch_caption.images import decoding
from batch_caption.model.vocab import UNK_ID, Vocabulary, tokenize
from batch_caption.prepare.config import check_inputs, parse
from batch_caption.prepare.read import source_tasks
from batch_caption.prepare.write import vocabulary_from_counts

SYNTHETIC_COUNTS = {"train": 24, "val": 6, "test": 6, "compositional": 6}
MAX_LENGTH = 12  # below the longest synthetic captions, so some are cut


def read_dataset(out) -> tuple[tfrecord.DatasetInfo, Vocabulary, dict[str, list[dict]]]:
    """(info, vocabulary, split -> parsed records as numpy, sorted by image id)."""
    import tensorflow as tf

    with open(os.path.join(out, tfrecord.INFO_NAME)) as f:
        info = tfrecord.DatasetInfo.from_json(f.read())
    with open(os.path.join(out, tfrecord.VOCAB_NAME)) as f:
        vocab = Vocabulary.from_json(f.read())
    parsed = {}
    for split, meta in info.splits.items():
        files = [os.path.join(out, name) for name in meta["files"]]
        rows = []
        for ex in tf.data.TFRecordDataset(files).map(lambda s: tfrecord.parse_example(s, info)):
            row = {"image_id": int(ex["image_id"]), "captions": [list(c) for c in ex["captions"].numpy()]}
            row.update({k: ex[k].numpy() for k in ("image", "features") if k in ex})
            rows.append(row)
        parsed[split] = sorted(rows, key=lambda r: r["image_id"])
    return info, vocab, parsed


def read_errors(out) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "errors-*.jsonl"))):
        rows += [json.loads(line) for line in open(path, encoding="utf-8")]
    return rows


def coco_captions(path) -> tuple[dict[int, str], dict[int, list[str]]]:
    with open(path) as f:
        data = json.load(f)
    names = {im["id"]: im["file_name"] for im in data["images"]}
    caps: dict[int, list[str]] = {i: [] for i in names}
    for ann in data["annotations"]:
        caps[ann["image_id"]].append(ann["caption"])
    return names, caps


def expected_ids(vocab: Vocabulary, caption: str) -> list[int]:
    return [vocab.token_id(t) for t in tokenize(caption)][:MAX_LENGTH]


# --- synthetic, end to end -------------------------------------------------------------


def _synthetic_args(out, num_shards):
    counts = ",".join(f"{k}={v}" for k, v in SYNTHETIC_COUNTS.items())
    return ["--source", "synthetic", "--synthetic_counts", counts, "--seed", "3", "--image_size", "32",
            "--max_length", str(MAX_LENGTH), "--min_word_count", "1", "--num_shards", str(num_shards),
            "--output", str(out), "--run_id", "syn"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "data"
    info = prepare.run(_synthetic_args(out, num_shards=2))
    return str(out), info


def test_synthetic_dataset_info_and_shards(synthetic):
    out, info = synthetic
    on_disk, _, _ = read_dataset(out)
    assert on_disk == info
    assert (info.mode, info.image_size, info.max_length, info.encoder) == ("images", 32, MAX_LENGTH, None)
    assert set(info.splits) == set(SYNTHETIC_COUNTS)
    src = os.path.join(out, "source")
    for split, n in SYNTHETIC_COUNTS.items():
        meta = info.splits[split]
        assert meta["files"] == [f"{split}-0000{i}-of-00002.tfrecord" for i in range(2)]
        _, caps = coco_captions(os.path.join(src, f"captions_{split}.json"))
        assert meta["images"] == meta["listed_images"] == n
        assert meta["captions"] == sum(len(c) for c in caps.values())
        assert meta["truncated_captions"] == sum(len(tokenize(c)) > MAX_LENGTH for cs in caps.values() for c in cs) > 0
        assert meta["errors"] == {}
    assert sorted(glob.glob(os.path.join(out, "*.tfrecord"))) == sorted(
        os.path.join(out, f) for m in info.splits.values() for f in m["files"])
    assert info.source["name"] == "synthetic" and info.source["synthetic"]["counts"] == SYNTHETIC_COUNTS
    assert info.source["errors"]["total"] == 0 and read_errors(out) == []
    # dataset.json is written last.
    info_time = os.path.getmtime(os.path.join(out, tfrecord.INFO_NAME))
    others = [p for p in glob.glob(os.path.join(out, "*")) if os.path.isfile(p) and not p.endswith(tfrecord.INFO_NAME)]
    assert others and all(os.path.getmtime(p) <= info_time for p in others)


def test_records_hold_the_jobs_pixels_and_encoded_captions(synthetic):
    """The stored pixels are what the job makes of the file for a model of the size that
    dataset.json records (a bundle trained on it has that size), with its default settings."""
    out, _ = synthetic
    info, vocab, parsed = read_dataset(out)
    assert info.image_size == 32
    src = os.path.join(out, "source")
    for split in SYNTHETIC_COUNTS:
        names, caps = coco_captions(os.path.join(src, f"captions_{split}.json"))
        assert [r["image_id"] for r in parsed[split]] == sorted(names)
        for r in parsed[split]:
            with open(os.path.join(src, names[r["image_id"]]), "rb") as f:
                want = api.decode_example(f.read(), info.image_size).pixels
            np.testing.assert_array_equal(r["image"], want)
            assert r["captions"] == [expected_ids(vocab, c) for c in caps[r["image_id"]]]
    # Train words are all known (min_word_count 1): ids decode back to the captions.
    names, caps = coco_captions(os.path.join(src, "captions_train.json"))
    for r in parsed["train"]:
        for ids, caption in zip(r["captions"], caps[r["image_id"]]):
            assert UNK_ID not in ids
            assert [vocab.words[i] for i in ids] == tokenize(caption)[:MAX_LENGTH]


def test_vocabulary_is_built_from_the_train_split_only(synthetic):
    out, info = synthetic
    _, vocab, _ = read_dataset(out)
    src = os.path.join(out, "source")
    train = [c for cs in coco_captions(os.path.join(src, "captions_train.json"))[1].values() for c in cs]
    assert vocab == Vocabulary.build(train, min_count=1)
    assert info.vocab_size == len(vocab)
    held_out = [c for s in ("val", "test", "compositional")
                for cs in coco_captions(os.path.join(src, f"captions_{s}.json"))[1].values() for c in cs]
    unseen = {t for c in held_out for t in tokenize(c)} - {t for c in train for t in tokenize(c)}
    assert all(vocab.token_id(t) == UNK_ID for t in unseen)


def test_vocabulary_from_counts_orders_like_vocabulary_build():
    captions = ["b a c a", "c c d e e", "f, a zebra.", "a b"]
    counts = {}
    for t in (t for c in captions for t in tokenize(c)):
        counts[t] = counts.get(t, 0) + 1
    for min_count in (1, 2, 3):
        assert vocabulary_from_counts(reversed(list(counts.items())), min_count) == Vocabulary.build(
            captions, min_count)


def test_references_list_the_image_paths_and_raw_captions(synthetic):
    out, info = synthetic
    src = os.path.join(out, "source")
    for split in SYNTHETIC_COUNTS:
        assert info.source["references"][split] == f"references_{split}.json"
        with open(os.path.join(out, f"references_{split}.json")) as f:
            refs = json.load(f)
        names, caps = coco_captions(os.path.join(src, f"captions_{split}.json"))
        assert {im["id"]: im["file_name"] for im in refs["images"]} == {
            i: os.path.join(src, n) for i, n in names.items()}
        got = {}
        for ann in refs["annotations"]:
            got.setdefault(ann["image_id"], []).append(ann["caption"])
        assert got == caps
        assert len({a["id"] for a in refs["annotations"]}) == len(refs["annotations"])


def test_rerun_replaces_shards_and_is_deterministic(synthetic, tmp_path):
    out, _ = synthetic
    _, vocab_before, records_before = read_dataset(out)
    with open(os.path.join(out, tfrecord.VOCAB_NAME), "rb") as f:
        vocab_bytes = f.read()
    # Another shard count into the same directory: the 2-shard files must go.
    info = prepare.run(_synthetic_args(out, num_shards=1))
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tfrecord"))) == sorted(
        f"{s}-00000-of-00001.tfrecord" for s in SYNTHETIC_COUNTS)
    assert all(m["files"] == [f"{s}-00000-of-00001.tfrecord"] for s, m in info.splits.items())
    with open(os.path.join(out, tfrecord.VOCAB_NAME), "rb") as f:
        assert f.read() == vocab_bytes
    _, _, records_after = read_dataset(out)
    for split in SYNTHETIC_COUNTS:
        assert len(records_after[split]) == len(records_before[split])
        for a, b in zip(records_after[split], records_before[split]):
            assert a["image_id"] == b["image_id"] and a["captions"] == b["captions"]
            np.testing.assert_array_equal(a["image"], b["image"])


# --- precomputed features --------------------------------------------------------------


def _write_coco(root, split, entries, extra_annotations=()):
    """entries: [(image_id, file_name, [captions])] -> root/captions_<split>.json."""
    data = {"images": [{"id": i, "file_name": n} for i, n, _ in entries],
            "annotations": [{"id": i * 100 + k, "image_id": i, "caption": c}
                            for i, _, cs in entries for k, c in enumerate(cs)] + list(extra_annotations)}
    path = os.path.join(root, f"captions_{split}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


@pytest.mark.parametrize("size, grid", [(32, None), (48, 3)])
def test_precomputed_features_equal_the_backbones(tmp_path, size, grid):
    import keras

    from batch_caption.model.config import ModelConfig
    from batch_caption.model.encoder import build_backbone

    keras.utils.set_random_seed(5)
    config = ModelConfig(vocab_size=5, encoder="small_cnn", image_size=size, small_cnn_grid=grid or 4)
    weights = str(tmp_path / "small_cnn.weights.h5")
    backbone = build_backbone(config)
    backbone.save_weights(weights)
    features = backbone.output_shape[-1]
    root = tmp_path / "coco"
    (root / "img").mkdir(parents=True)
    entries = []
    for i, px in enumerate(varied_images(6, 48, seed=11)):
        Image.fromarray(px).save(root / "img" / f"{i}.png")
        entries.append((i + 1, f"img/{i}.png", [f"picture number {i}", "a picture"]))
    train = _write_coco(str(root), "train", entries[:4])
    test = _write_coco(str(root), "test", entries[4:])
    out = str(tmp_path / "out")
    info = prepare.run(["--source", "coco", "--split", f"train={train}", "--split", f"test={test}",
                        "--image_root", str(root), "--output", out, "--image_size", str(size), "--min_word_count", "1",
                        "--precompute_features", "--encoder", "small_cnn", "--encoder_weights", weights,
                        "--batch_size", "3", *(["--small_cnn_grid", str(grid)] if grid else [])])
    assert (info.mode, info.encoder, info.feature_size) == ("features", "small_cnn", features)
    assert features == (grid or 4) ** 2 * 128
    assert info.source["encoder_weights"] == weights and info.source["small_cnn_grid"] == (grid or 4)
    assert info.source["decoder"] == "show_and_tell"  # the default: train checks it for application encoders
    _, _, parsed = read_dataset(out)
    keras.utils.set_random_seed(6)  # a fresh backbone gets other weights unless they are loaded
    backbone = build_backbone(dataclasses.replace(config, encoder_weights=weights))
    image_config = decoding.ImageConfig(image_size=size)
    for split, rows in parsed.items():
        assert len(rows) == info.splits[split]["images"] == {"train": 4, "test": 2}[split]
        pixels = np.stack([decoding.decode_image(open(root / "img" / f"{r['image_id'] - 1}.png", "rb").read(),
                                               image_config).pixels for r in rows])
        want = backbone(pixels, training=False).numpy()
        got = np.stack([r["features"] for r in rows])
        assert got.shape == (len(rows), features) and np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- COCO with bad images and captions -------------------------------------------------


def test_bad_images_and_captions_become_error_records(tmp_path, capsys):
    root = tmp_path / "coco"
    root.mkdir()
    for name, px in zip(("a.png", "b.png", "e.png", "f.png"), varied_images(4, 40, seed=3)):
        Image.fromarray(px).save(root / name)
    (root / "c.png").write_bytes(b"not an image at all")
    train = _write_coco(str(root), "train", [
        (1, "a.png", ["A dog runs.", "   "]),
        (2, "b.png", ["", " "]),          # only empty captions
        (3, "c.png", ["a broken file"]),   # cannot be decoded
        (4, "d.png", ["a missing file"]),  # does not exist
        (5, "e.png", []),                  # no caption at all
    ], extra_annotations=[{"id": 77, "image_id": 999, "caption": "of nothing"}])
    test = _write_coco(str(root), "test", [(6, "f.png", ["a zebra runs"]), (7, "c.png", ["broken again"])])
    out = str(tmp_path / "out")
    code = prepare.main(["--source", "coco", "--split", f"train={train}", "--split", f"test={test}",
                         "--image_root", str(root), "--output", out, "--min_word_count", "1", "--image_size", "32",
                         "--run_id", "bad"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"prepared {out} (images 32 px): test 1 images / 1 captions, train 1 images / 1 captions")
    assert "9 errors (caption 6, decode 2, read 1)" in line

    p = lambda name: os.path.join(str(root), name)  # noqa: E731
    got = sorted((r["split"], os.path.basename(r["path"]), r["stage"], r["error"]) for r in read_errors(out))
    assert got == sorted([
        ("train", "a.png", "caption", "EmptyCaption"),
        ("train", "b.png", "caption", "EmptyCaption"),
        ("train", "b.png", "caption", "EmptyCaption"),
        ("train", "b.png", "caption", "NoValidCaption"),
        ("train", "c.png", "decode", "UnsupportedImageError"),
        ("test", "c.png", "decode", "UnsupportedImageError"),
        ("train", "d.png", "read", "FileNotFoundError"),
        ("train", "e.png", "caption", "NoCaption"),
        ("train", "captions_train.json#annotation=77", "caption", "UnknownImage"),
    ])
    assert all(r["run_id"] == "bad" and r["message"] for r in read_errors(out))
    assert {r["path"] for r in read_errors(out) if r["stage"] != "caption" or r["error"] != "UnknownImage"} == {
        p(n) for n in ("a.png", "b.png", "c.png", "d.png", "e.png")}

    info, vocab, parsed = read_dataset(out)
    assert info.splits["train"] == {**info.splits["train"], "listed_images": 5, "images": 1, "captions": 1,
                                    "errors": {"caption": 6, "decode": 1, "read": 1}}
    assert info.splits["test"] == {**info.splits["test"], "listed_images": 2, "images": 1, "captions": 1,
                                   "errors": {"decode": 1}}
    assert info.source["errors"] == {**info.source["errors"], "total": 9, "without_split": 0,
                                     "by_stage": {"caption": 6, "decode": 2, "read": 1}}
    # Every listed image ends as a record or as one image-level error.
    # The vocabulary counts the train split's checked captions, the unreadable images'
    # too ("a broken file", "a missing file"): most frequent first, then alphabetical.
    assert vocab.words[4:] == ("a", "file", ".", "broken", "dog", "missing", "runs")
    assert [r["captions"] for r in parsed["train"]] == [[[vocab.token_id(t) for t in ("a", "dog", "runs", ".")]]]
    assert [r["captions"] for r in parsed["test"]] == [[[vocab.token_id("a"), UNK_ID, vocab.token_id("runs")]]]
    with open(os.path.join(out, "references_train.json")) as f:
        refs = json.load(f)
    assert refs["images"] == [{"id": 1, "file_name": p("a.png")}]
    assert [a["caption"] for a in refs["annotations"]] == ["A dog runs."]


def test_flags_become_reader_calls(tmp_path):
    """parse -> check_inputs -> source_tasks, without a pipeline: what each source reads."""
    from batch_caption.data.sources import CaptionedImage

    (tmp_path / "img").mkdir()
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": f"{i}.jpg", "split": s, "imgid": i, "sentences": [{"raw": f"cap {i}"}]}
        for i, s in enumerate(["train", "restval", "val", "test"])]}))
    config, _ = parse(["--source", "karpathy", "--captions", str(karpathy), "--image_root", str(tmp_path / "img"),
                       "--output", str(tmp_path / "o"), "--restval", "none", "--split", "train",
                       "--split", "test"])
    config = check_inputs(config)
    assert config.split_names == ("train", "test")
    items = [i for task in source_tasks(config) for i in task()]
    assert [(i.image_id, i.split) for i in items] == [(0, "train"), (3, "test")]

    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    (text / "Flickr8k.token.txt").write_text("a.jpg#0\tA cat\nb.jpg#0\tA dog\n")
    for split, name in sources.FLICKR8K_SPLIT_FILES.items():
        (text / name).write_text({"train": "a.jpg\n", "val": "", "test": ""}[split])
    (tmp_path / "mytest.txt").write_text("b.jpg\n")
    config, _ = parse(["--source", "flickr8k", "--captions", str(text / "Flickr8k.token.txt"),
                       "--image_root", str(tmp_path / "img"), "--output", str(tmp_path / "o"),
                       "--split", "train", "--split", f"test={tmp_path / 'mytest.txt'}"])
    config = check_inputs(config)
    assert config.flickr8k_lists()["test"] == str(tmp_path / "mytest.txt")
    assert config.flickr8k_lists()["val"] == str(text / "Flickr_8k.devImages.txt")
    items = [i for task in source_tasks(config) for i in task()]
    assert items == [CaptionedImage(1, str(tmp_path / "img" / "a.jpg"), "train", ("A cat",)),
                     CaptionedImage(2, str(tmp_path / "img" / "b.jpg"), "test", ("A dog",))]


# --- the command line ------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path):
    """A coco captions file and image root, a Karpathy JSON, and weights-less paths."""
    (tmp_path / "img").mkdir()
    coco = _write_coco(str(tmp_path), "train", [(1, "a.png", ["a cat"])])
    karpathy = tmp_path / "dataset.json"
    karpathy.write_text('{"images": []}')
    return {"coco": coco, "root": str(tmp_path / "img"), "karpathy": str(karpathy), "dir": tmp_path}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "coco", "--split", "train={coco}", "--image_root", "{root}", "--no_such_flag=1"],
         "unknown option --no_such_flag; see --help"),
        (["--source", "cocoa"], "invalid choice"),
        (["--source", "coco", "--split", "train=/nonexistent.json", "--image_root", "{root}"], "does not exist"),
        (["--source", "coco", "--split", "train={coco}"], "needs --image_root"),
        (["--source", "coco", "--split", "train={coco}", "--image_root", "/nonexistent/dir"], "is not a directory"),
        (["--source", "coco", "--split", "val={coco}", "--image_root", "{root}"], "--vocab_split 'train'"),
        (["--source", "coco", "--split", "train-2={coco}", "--image_root", "{root}"], "split name 'train-2'"),
        (["--source", "coco", "--split", "train={coco}", "--split", "train={coco}", "--image_root", "{root}"],
         "more than once"),
        (["--source", "karpathy", "--captions", "{karpathy}", "--image_root", "{root}", "--split", "train2"],
         "unknown karpathy split 'train2'"),
        (["--source", "karpathy", "--image_root", "{root}"], "needs --captions"),
        (["--source", "flickr8k", "--captions", "{karpathy}", "--image_root", "{root}"], "Flickr_8k.trainImages.txt"),
        (["--source", "synthetic", "--synthetic_counts", "train=x"], "not SPLIT=N"),
        (["--source", "synthetic", "--synthetic_counts", "train=3,holdout=2"], "unknown synthetic split 'holdout'"),
        (["--source", "synthetic", "--split", "train"], "from --synthetic_counts"),
        (["--source", "synthetic", "--image_size", "16"], "--image_size"),
        (["--source", "synthetic", "--precompute_features"], "needs --encoder_weights"),
        (["--source", "synthetic", "--precompute_features", "--encoder_weights", "imagenet"], "no imagenet weights"),
        (["--source", "synthetic", "--precompute_features", "--encoder", "vgg", "--encoder_weights", "imagenet"],
         "--encoder must be one of"),
        (["--source", "synthetic", "--precompute_features", "--encoder_weights", "/nonexistent.weights.h5"],
         "does not exist"),
        (["--source", "synthetic", "--encoder", "small_cnn"], "only apply with --precompute_features"),
        (["--source", "synthetic", "--small_cnn_grid", "3"], "only apply with --precompute_features"),
        (["--source", "synthetic", "--decoder", "attention"], "only apply with --precompute_features"),
        (["--source", "synthetic", "--precompute_features", "--encoder_weights", "/w.weights.h5", "--decoder", "lstm"],
         "invalid choice: 'lstm'"),
        (["--source", "synthetic", "--precompute_features", "--encoder_weights", "/w.weights.h5", "--small_cnn_grid",
          "9"], "--small_cnn_grid must be in [1, 8]"),
        (["--source", "synthetic", "--precompute_features", "--encoder", "resnet50", "--encoder_weights", "imagenet",
          "--small_cnn_grid", "3"], "only applies to --encoder small_cnn"),
        (["--source", "synthetic", "--min_word_count", "0"], "--min_word_count"),
    ],
)
def test_bad_command_lines_fail_fast_with_one_line(args, message, inputs, capsys):
    out = inputs["dir"] / "out"
    full = [a.format(**inputs) for a in args] + ["--output", str(out)]
    assert prepare.main(full) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # no work started


def _cli(*args, timeout=180):
    """`python -m batch_caption.prepare ARGS`; a run past `timeout` seconds is killed with
    its worker processes (its own session) and fails the test."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen([sys.executable, "-m", "batch_caption.prepare", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        _, err = child.communicate()
        pytest.fail(f"prepare did not finish within {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_cli_help():
    helped = _cli("--help")
    assert helped.returncode == 0
    assert all(flag in helped.stdout for flag in ("--source", "--split", "--precompute_features", "--runner"))


def test_the_join_shuffles_no_image():
    """Captions are looked up by path (a side input): a GroupByKey of the pixels would reach
    each multi-processing worker as one data-plane message holding all of its images."""
    import apache_beam as beam
    from apache_beam.portability import common_urns

    from batch_caption.prepare.read import ERRORS, JoinCaptionsToImages

    pipeline = beam.Pipeline()
    inputs = {
        "items": pipeline | "Items" >> beam.Create([sources.CaptionedImage(1, "a.png", "train", ("a cat",))]),
        "payloads": pipeline | "Payloads" >> beam.Create([("a.png", np.zeros((2, 2, 3), np.uint8))]),
        ERRORS: pipeline | "Errors" >> beam.Create([{"path": "a.png", "stage": "decode"}]),
    }
    _ = inputs | "Join" >> JoinCaptionsToImages()
    transforms = pipeline.to_runner_api().components.transforms.values()
    assert any(t.unique_name.startswith("Join/") for t in transforms)
    assert not [t.unique_name for t in transforms if t.unique_name.startswith("Join/")
                and t.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["images", "features"])
def test_cli_on_the_multi_processing_runner(tmp_path, mode):
    """`python -m` on two worker processes, in both modes, within a time limit: the workers
    unpickle the job's classes by module name and receive the images in a stream."""
    out = tmp_path / "data"
    flags = []
    if mode == "features":
        import keras

        from batch_caption.model.config import ModelConfig
        from batch_caption.model.encoder import build_backbone

        keras.utils.set_random_seed(5)
        weights = str(tmp_path / "small_cnn.weights.h5")
        build_backbone(ModelConfig(vocab_size=5, encoder="small_cnn", image_size=32, small_cnn_grid=2)).save_weights(
            weights)
        flags = ["--precompute_features", "--encoder", "small_cnn", "--small_cnn_grid", "2", "--encoder_weights",
                 weights]
    done = _cli("--source", "synthetic", "--synthetic_counts", "train=6,val=2", "--image_size", "32",
                "--min_word_count", "1", "--output", str(out), "--direct_num_workers=2",
                "--direct_running_mode=multi_processing", *flags, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    what = "features of small_cnn, 512 floats" if mode == "features" else "images 32 px"
    assert done.stdout.strip().splitlines()[-1].startswith(
        f"prepared {out} ({what}): train 6 images / 30 captions, val 2 images / 10 captions; vocabulary ")
    info, _, parsed = read_dataset(out)
    assert info.mode == mode
    assert {s: len(r) for s, r in parsed.items()} == {"train": 6, "val": 2}
    payload = "features" if mode == "features" else "image"
    assert all(r[payload].shape == ((512,) if mode == "features" else (32, 32, 3)) for r in parsed["train"])
