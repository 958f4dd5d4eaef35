"""Tests of `python -m batch_caption.train` and its training package.

Fast tests run in this process (input pipeline, loss normalisation, schedule, flag
errors, single-device runs). Distributed runs use subprocesses of the real entry point:
a multi-worker strategy must never be created inside the pytest process, and logical CPU
devices can only be configured in a fresh one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from batch_caption import train as train_cli
from batch_caption.data.scenes import SceneConfig, generate_scenes, reference_captions, render_scene
from batch_caption.data.tfrecord import DatasetInfo, encode_example, parse_example
from batch_caption.model import vocab as V
from batch_caption.model.vocab import Vocabulary
from batch_caption.training import input as data_input
from batch_caption.training import optim

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
MAX_LENGTH = 10
TINY = ["--embedding_size", "16", "--lstm_units", "16", "--global_batch_size", "8", "--num_samples", "0"]


# --- tiny prepared datasets -------------------------------------------------------------
def _write_dataset(path: Path, mode: str, counts: dict, shards: int = 2, encoder_weights: str | None = None):
    """Synthetic scenes at 32 px, 3 captions each, in the prepared-dataset format."""
    cfg = SceneConfig(image_size=SIZE)
    rows = {
        split: [(s, np.asarray(render_scene(s, cfg)), reference_captions(s, n=3))
                for s in generate_scenes(split, n, seed=0, config=cfg)]
        for split, n in counts.items()
    }
    vocab = Vocabulary.build(c for r in rows.values() for _, _, caps in r for c in caps)
    backbone = None
    if mode == "features":
        from batch_caption.model.config import ModelConfig
        from batch_caption.model.encoder import build_backbone

        backbone = build_backbone(ModelConfig(vocab_size=len(vocab), image_size=SIZE, encoder_weights=encoder_weights))
    path.mkdir(parents=True)
    splits = {}
    for split, items in rows.items():
        names = [f"{split}-{k:05d}-of-{shards:05d}.tfrecord" for k in range(shards)]
        writers = [tf.io.TFRecordWriter(str(path / n)) for n in names]
        for i, (scene, pixels, caps) in enumerate(items):
            tokens = [vocab.encode(c, MAX_LENGTH) for c in caps]
            kw = {"pixels": pixels} if mode == "images" else {"features": backbone(pixels[None]).numpy()[0]}
            writers[i % shards].write(encode_example(scene.id, f"{split}/{i}.png", tokens, **kw))
        for w in writers:
            w.close()
        splits[split] = {"files": names, "images": len(items), "captions": 3 * len(items)}
    info = DatasetInfo(mode=mode, image_size=SIZE, max_length=MAX_LENGTH, vocab_size=len(vocab), splits=splits,
                       encoder="small_cnn" if mode == "features" else None,
                       feature_size=int(backbone.output.shape[-1]) if backbone else None)
    (path / "vocab.json").write_text(vocab.to_json())
    (path / "dataset.json").write_text(info.to_json())
    return {split: np.stack([p for _, p, _ in items]) for split, items in rows.items()}


@pytest.fixture(scope="session")
def images_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "images"
    _write_dataset(path, "images", {"train": 24, "val": 8})
    return str(path)


@pytest.fixture(scope="session")
def encoder_weights(tmp_path_factory):
    """A small_cnn backbone weights file at 32 px (what `prepare` would have used)."""
    import keras

    from batch_caption.model.config import ModelConfig
    from batch_caption.model.encoder import build_backbone

    keras.utils.set_random_seed(5)
    path = str(tmp_path_factory.mktemp("weights") / "small_cnn.weights.h5")
    build_backbone(ModelConfig(vocab_size=10, image_size=SIZE)).save_weights(path)
    return path


@pytest.fixture(scope="session")
def features_dataset(tmp_path_factory, encoder_weights):
    """(dataset path, {split: uint8 images}) of a features dataset made with `encoder_weights`."""
    path = tmp_path_factory.mktemp("data") / "features"
    images = _write_dataset(path, "features", {"train": 24, "val": 8}, encoder_weights=encoder_weights)
    return str(path), images


def _info(path: str) -> DatasetInfo:
    return DatasetInfo.from_json(Path(path, "dataset.json").read_text())


def _files(path: str, split: str) -> list[str]:
    return [str(Path(path, n)) for n in _info(path).splits[split]["files"]]


# --- input pipeline -----------------------------------------------------------------------
def test_caption_to_tokens_adds_start_and_end():
    tokens, targets = data_input.caption_to_tokens(tf.constant([7, 8, 9], tf.int64))
    assert tokens.dtype == tf.int32 and targets.dtype == tf.int32
    assert tokens.numpy().tolist() == [V.START_ID, 7, 8, 9]
    assert targets.numpy().tolist() == [7, 8, 9, V.END_ID]


def _records(tmp_path, captions_per_image):
    """A features dataset file with images 0..n-1 whose feature vector is [i, i]."""
    info = DatasetInfo(mode="features", image_size=32, max_length=6, vocab_size=20, encoder="small_cnn",
                       feature_size=2, splits={"train": {"files": ["t.tfrecord"]}})
    with tf.io.TFRecordWriter(str(tmp_path / "t.tfrecord")) as w:
        for i, caps in enumerate(captions_per_image):
            w.write(encode_example(i, f"{i}.png", caps, features=np.array([i, i], np.float32)))
    return info, [str(tmp_path / "t.tfrecord")]


def test_each_caption_becomes_one_pair_with_its_image(tmp_path):
    info, files = _records(tmp_path, [[[4, 5], [6]], [[7, 8, 9], [10], [11, 12]]])
    pairs = data_input.expand_captions(data_input.shard_records(files, 1, 0, shuffle=False, seed=0), info)
    got = [(int(e["features"][0]), e["tokens"].numpy().tolist(), e["targets"].numpy().tolist()) for e in pairs]
    assert got == [
        (0, [1, 4, 5], [4, 5, 2]),
        (0, [1, 6], [6, 2]),
        (1, [1, 7, 8, 9], [7, 8, 9, 2]),
        (1, [1, 10], [10, 2]),
        (1, [1, 11, 12], [11, 12, 2]),
    ]


def test_padding_to_max_length_gives_static_shapes(tmp_path):
    info, files = _records(tmp_path, [[[4, 5], [6]], [[7, 8, 9], [10]]])
    ds = data_input.make_dataset(files, info, 2, training=False, bucket_width=0)
    assert ds.element_spec["tokens"].shape.as_list() == [2, 7]
    batch = next(iter(ds))
    assert batch["tokens"].numpy().tolist() == [[1, 4, 5, 0, 0, 0, 0], [1, 6, 0, 0, 0, 0, 0]]
    assert batch["targets"].numpy().tolist() == [[4, 5, 2, 0, 0, 0, 0], [6, 2, 0, 0, 0, 0, 0]]


def test_bucketing_groups_lengths_and_pads_to_the_batch_longest(tmp_path):
    lengths = [1, 5, 2, 6, 1, 5, 2, 6, 3, 4]
    info, files = _records(tmp_path, [[list(range(3, 3 + n))] for n in lengths])
    assert data_input.bucket_boundaries(6, 3) == [4, 7]  # L = n + 1 in [1, 3], [4, 6], [7]
    ds = data_input.make_dataset(files, info, 2, training=False, bucket_width=3)
    assert ds.element_spec["tokens"].shape.as_list()[1] is None
    for batch in ds.take(6):
        real = (batch["targets"].numpy() != 0).sum(axis=1)  # = n + 1 per caption
        assert len(set(np.digitize(real, [4, 7]))) == 1, real  # one bucket per batch
        assert batch["tokens"].shape[1] == real.max()  # padded to the batch's longest only
        assert ((batch["tokens"].numpy() != 0).sum(axis=1) == real).all()


@pytest.mark.parametrize("num_files", [1, 3])
def test_pipelines_shard_disjointly(tmp_path, num_files):
    names = []
    for f in range(num_files):
        names.append(str(tmp_path / f"s{f}.tfrecord"))
        with tf.io.TFRecordWriter(names[-1]) as w:
            for i in range(f * 10, f * 10 + 7):
                w.write(tf.constant(str(i)).numpy())
    seen = [sorted(int(r) for r in data_input.shard_records(names, 2, p, shuffle=False, seed=0).as_numpy_iterator())
            for p in range(2)]
    assert not set(seen[0]) & set(seen[1]) and seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == [i for f in range(num_files) for i in range(f * 10, f * 10 + 7)]


def test_training_stream_is_seeded(images_dataset):
    info, files = _info(images_dataset), _files(images_dataset, "train")

    def first_targets(seed):
        ds = data_input.make_dataset(files, info, 4, training=True, seed=seed, bucket_width=0)
        return [b["targets"].numpy().tolist() for b in ds.take(3)]

    one, again, other = first_targets(1), first_targets(1), first_targets(2)
    assert one == again != other


# --- loss normalisation, clipping, schedule ---------------------------------------------
def test_loss_is_normalised_by_the_global_token_count():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(4, 5, 9)), tf.float32)
    # Replica 0 holds two long captions, replica 1 two short ones: the counts differ.
    targets = tf.constant([[3, 4, 5, 6, 2], [4, 4, 5, 2, 0], [7, 2, 0, 0, 0], [2, 0, 0, 0, 0]])
    from batch_caption.model.show_and_tell import caption_loss

    sums, counts = zip(*(caption_loss(targets[i : i + 2], logits[i : i + 2]) for i in (0, 2)))
    loss, _ = optim.normalise([], tf.add_n(sums), tf.add_n(counts))  # what the all-reduce feeds
    whole_sum, whole_count = caption_loss(targets, logits)
    np.testing.assert_allclose(loss.numpy(), (whole_sum / whole_count).numpy(), rtol=1e-6)
    assert float(whole_count) == 12.0
    mean_of_means = np.mean([float(s / c) for s, c in zip(sums, counts)])
    assert abs(mean_of_means - float(loss)) > 1e-3  # per-replica normalisation would be wrong
    assert float(optim.normalise([], tf.constant(0.0), tf.constant(0.0))[0]) == 0.0


def test_clipping_uses_the_global_norm():
    grads = [tf.constant([3.0, 0.0]), tf.constant([[4.0]])]
    clipped, norm = optim.clip_by_global_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(clipped[0].numpy(), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1].numpy(), [[0.8]], rtol=1e-6)
    unclipped, norm = optim.clip_by_global_norm(grads, 0.0)
    assert float(norm) == pytest.approx(5.0) and unclipped[0].numpy().tolist() == [3.0, 0.0]


def test_warmup_then_cosine_schedule():
    s = optim.WarmupDecay(1.0, total_steps=12, warmup_steps=2, kind="cosine", final_ratio=0.1)
    values = [float(s(i)) for i in range(13)]
    assert values[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert values[11] == pytest.approx(0.1) and values[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    e = optim.WarmupDecay(1.0, total_steps=11, kind="exponential", final_ratio=0.01)
    assert float(e(5)) == pytest.approx(0.1, rel=1e-5)
    assert float(optim.WarmupDecay(2.0, 10, kind="constant")(7)) == 2.0


# --- CLI errors (in process: they must come before any TensorFlow work) ----------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output", "o"], "the following arguments are required: --data"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--clip_norm", "-1"], "--clip_norm must be >= 0"),
        (["--strategy", "gpu"], "invalid choice"),
        (["--image_input", "last"], "invalid choice"),
        (["--image_size", "64"], "--image_size 64 does not match the dataset's images (32 px)"),
        (["--strategy", "multi_worker"], "needs the TF_CONFIG environment variable"),
        (["--train_split", "nope"], "has no 'nope' shards"),
    ],
)
def test_bad_flags_fail_in_one_line(images_dataset, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    base = [] if "--output" in argv else ["--data", images_dataset, "--output", str(tmp_path / "out")]
    assert train_cli.main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_dataset_and_missing_encoder_weights_are_reported(features_dataset, tmp_path, capsys):
    assert train_cli.main(["--data", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "no prepared dataset at" in capsys.readouterr().err
    assert train_cli.main(["--data", features_dataset[0], "--output", str(tmp_path / "o")]) == 2
    assert "a features dataset needs --encoder_weights" in capsys.readouterr().err
    assert train_cli.main(["--data", features_dataset[0], "--output", str(tmp_path / "o"), "--train_encoder"]) == 2
    assert "trains the decoder only" in capsys.readouterr().err


# --- single-device runs, in process -------------------------------------------------------
@pytest.mark.parametrize("flags", [["--image_input", "first"], ["--image_input", "every_step"],
                                   ["--decoder", "attention", "--attention_units", "16", "--attention_penalty", "0.3"]])
def test_one_replica_step_is_the_plain_mean_token_loss_step(features_dataset, encoder_weights, tmp_path, flags):
    """One SGD step of the entry point == w - lr * grad(mean token loss) computed by hand
    (plus, for the attention decoder, lambda * its penalty over the same token count)."""
    import keras

    from batch_caption.model.attend_and_tell import attention_penalty
    from batch_caption.model.load import load_bundle
    from batch_caption.model.network import build_model
    from batch_caption.model.show_and_tell import caption_loss

    data, _ = features_dataset
    lr, seed = 0.5, 3
    result = train_cli.run(["--data", data, "--output", str(tmp_path / "out"), "--encoder_weights", encoder_weights,
                            "--strategy", "one_device", "--steps", "1", "--optimizer", "sgd", "--learning_rate", str(lr),
                            "--lr_schedule", "constant", "--clip_norm", "0", "--dropout", "0", "--bucket_width", "0",
                            "--eval_every", "0", "--seed", str(seed), *flags, *TINY])
    trained = load_bundle(result.export_path).model
    assert [trained.config.image_input, trained.config.decoder][flags[0] == "--decoder"] == flags[1]
    # The job decodes inputs at the bundle's image size: the dataset's, as dataset.json records it.
    assert trained.config.image_size == _info(data).image_size
    written = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert written["steps"] == 1 and written["model"]["image_size"] == trained.config.image_size

    # The bundle names the backbone's first weights by file name only (no machine path).
    assert trained.config.encoder_weights == os.path.basename(encoder_weights)
    keras.utils.set_random_seed(seed)
    model = build_model(dataclasses.replace(trained.config, encoder_weights=encoder_weights))
    model.build_all()
    batch = next(iter(data_input.make_dataset(_files(data, "train"), _info(data), 8, training=True, seed=seed,
                                              bucket_width=0)))
    variables = [v for v in model.trainable_variables if not v.path.startswith("small_cnn")]
    inputs = {"features": batch["features"], "tokens": batch["tokens"]}
    with tf.GradientTape() as tape:
        if model.config.decoder == "attention":
            logits, alphas = model.call_with_attention(inputs, training=True)
            loss_sum, count = caption_loss(batch["targets"], logits)
            loss_sum += 0.3 * attention_penalty(alphas, batch["targets"])
        else:
            loss_sum, count = caption_loss(batch["targets"], model(inputs, training=True))
        loss = loss_sum / count
    grads = tape.gradient(loss, variables)
    assert result.loss == pytest.approx(float(loss), rel=1e-5)
    expected = {v.path: v.numpy() - lr * tf.convert_to_tensor(g).numpy() for v, g in zip(variables, grads)}
    got = {w.path: w.numpy() for w in trained.weights if w.path in expected}
    assert got.keys() == expected.keys()
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_features_run_is_reproducible_and_exports_the_feature_backbone(features_dataset, encoder_weights, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from batch_caption.model.load import load_bundle, load_captioner

    data, images = features_dataset
    argv = ["--data", data, "--encoder_weights", encoder_weights, "--strategy", "one_device", "--steps", "6",
            "--log_every", "3", "--seed", "11", *TINY]
    a = train_cli.run(argv + ["--output", str(tmp_path / "a"), "--eval_every", "3", "--eval_steps", "2",
                              "--num_samples", "2"])
    b = train_cli.run(argv + ["--output", str(tmp_path / "b"), "--eval_every", "0"])  # evaluation changes nothing
    assert a.step == b.step == 6 and a.weights_digest == b.weights_digest and a.bundle_id == b.bundle_id
    assert a.val_loss is not None and json.loads((tmp_path / "a" / "result.json").read_text())["bundle_id"] == a.bundle_id

    bundle = load_bundle(a.export_path)
    # The bundle's CNN is the one that computed the dataset's features.
    features = tf.data.TFRecordDataset(_files(data, "val")[:1]).map(
        lambda s: parse_example(s, _info(data))["features"]).take(1)
    np.testing.assert_allclose(bundle.model.encode(images["val"][:1]).numpy()[0], next(iter(features)).numpy(),
                               rtol=1e-4, atol=1e-5)
    captions = load_captioner(a.export_path).caption(images["val"][:2])
    assert len(captions) == 2 and all(row and row[0].text for row in captions)

    events = EventAccumulator(str(tmp_path / "a" / "logs"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"train/loss", "train/learning_rate", "train/examples_per_second", "val/loss", "val/samples"} <= tags
    sample_text = events.Tensors("val/samples")[-1].tensor_proto.string_val[0].decode()
    assert "greedy" in sample_text and "beam 3" in sample_text


def test_second_stage_unfreezes_the_cnn(images_dataset, tmp_path):
    """--fine_tune_after_steps 2: CNN frozen for steps 1-2, trained in 3-4; decoder always."""
    import keras

    from batch_caption.model.show_and_tell import ShowAndTell

    lines: list[str] = []
    argv = ["--data", images_dataset, "--output", str(tmp_path / "out"), "--strategy", "one_device", "--steps", "4",
            "--fine_tune_after_steps", "2", "--encoder_lr_multiplier", "0.5", "--checkpoint_every", "2",
            "--eval_every", "4", "--eval_steps", "1", "--seed", "4", *TINY, "--num_samples", "2"]
    result = train_cli.train(train_cli.parse(argv), log=lines.append)
    assert result.step == 4 and any("step 2: training the encoder too" in line for line in lines)
    assert any('sample: greedy "' in line for line in lines)  # the images-mode Captioner path

    def restored(step):
        keras.utils.set_random_seed(4)  # same initial weights as the run
        model = ShowAndTell(load_config(result.export_path))
        model.build_all()
        if step:
            tf.train.Checkpoint(model=model).restore(str(tmp_path / "out" / "checkpoints" / f"ckpt-{step}")).expect_partial()
        return ({w.path: w.numpy() for w in model.backbone.trainable_weights},
                {w.path: w.numpy() for w in model.trainable_weights if not w.path.startswith("small_cnn")})

    def same(a, b):
        return all(np.array_equal(a[k], b[k]) for k in a)

    (cnn_0, dec_0), (cnn_2, dec_2), (cnn_4, dec_4) = restored(0), restored(2), restored(4)
    assert same(cnn_0, cnn_2) and not same(cnn_2, cnn_4)
    assert not same(dec_0, dec_2) and not same(dec_2, dec_4)


def load_config(bundle_path: str):
    from batch_caption.model.config import ModelConfig

    return ModelConfig.from_dict(json.loads(Path(bundle_path, "config.json").read_text()))


# --- distributed runs, in subprocesses of the real entry point ---------------------------
def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO), **extra)
    return env


def _start(args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batch_caption.train", *args], cwd=REPO, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training timed out:\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


def _result(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _bundle_weights(path: str) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(os.path.join(path, "model.weights.h5"), "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.slow
def test_two_workers_train_in_sync_and_only_the_chief_writes(images_dataset, tmp_path):
    from batch_caption.model.load import load_bundle
    from batch_caption.training.result import weights_digest

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [
        _start(["--data", images_dataset, "--output", str(tmp_path / f"out{i}"), "--steps", "4", "--checkpoint_every", "2",
                "--eval_every", "0", "--log_every", "1", "--strategy", "multi_worker", *TINY],
               TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]
    finished = [_finish(p) for p in procs]
    for rc, out, err in finished:
        assert rc == 0, err[-3000:]
    chief, worker = (_result(out) for _, out, _ in finished)
    assert chief["is_chief"] and not worker["is_chief"]
    assert chief["step"] == worker["step"] == 4 and chief["loss"] == worker["loss"]
    # Every variable, BatchNorm moving statistics included, is the same on both workers...
    assert chief["weights_digest"] == worker["weights_digest"]
    # ...and the chief exported exactly those weights.
    assert weights_digest(load_bundle(chief["export_path"]).model) == chief["weights_digest"]
    assert "2 replica(s)" in finished[0][1]
    assert sorted(os.listdir(tmp_path / "out0")) == ["checkpoints", "export", "logs", "result.json", "train_config.json"]
    assert "ckpt-4.index" in os.listdir(tmp_path / "out0" / "checkpoints")
    assert not (tmp_path / "out1").exists()  # the non-chief wrote nothing under its OUTPUT...
    private = re.search(r"checkpoints -> (\S+)", finished[1][1]).group(1)
    assert not os.path.exists(private)  # ...and deleted its private checkpoint directory


@pytest.mark.slow
@pytest.mark.parametrize("decoder", [[], ["--decoder", "attention", "--attention_penalty", "0.3"]])
def test_mirrored_on_two_cpus_matches_one_device_with_clipping_on(features_dataset, encoder_weights, tmp_path, decoder):
    """2 replicas == 1 device, with SGD (sensitive to a doubled gradient) and clipping active."""
    data, _ = features_dataset
    common = ["--data", data, "--encoder_weights", encoder_weights, "--steps", "4", "--optimizer", "sgd",
              "--learning_rate", "5", "--lr_schedule", "constant", "--clip_norm", "0.05", "--dropout", "0",
              "--bucket_width", "0", "--eval_every", "0", "--log_every", "1", *decoder, *TINY]
    mirrored = _start(common + ["--output", str(tmp_path / "mirrored"), "--strategy", "mirrored", "--num_cpu_devices", "2"])
    # Meanwhile, the one-device reference in this process (a OneDeviceStrategy is safe here).
    one_lines: list[str] = []
    one = train_cli.train(train_cli.parse(common + ["--output", str(tmp_path / "one"), "--strategy", "one_device"]),
                          log=one_lines.append)
    rc, out, err = _finish(mirrored)
    assert rc == 0, err[-3000:]
    assert "2 replica(s) (MirroredStrategy)" in out

    def logged(text):
        return [tuple(map(float, m)) for m in re.findall(r"loss ([\d.]+) .* grad norm ([\d.e+-]+)", text)]

    steps_1, steps_2 = logged("\n".join(one_lines)), logged(out)
    assert len(steps_1) == len(steps_2) == 4
    for (loss_1, norm_1), (loss_2, norm_2) in zip(steps_1, steps_2):
        assert norm_1 > 0.05 and norm_2 > 0.05  # clipping was active at every step
        assert loss_1 == pytest.approx(loss_2, rel=1e-4) and norm_1 == pytest.approx(norm_2, rel=1e-3)
    weights_1, weights_2 = _bundle_weights(one.export_path), _bundle_weights(_result(out)["export_path"])
    assert weights_1.keys() == weights_2.keys()
    for name in weights_1:
        np.testing.assert_allclose(weights_2[name], weights_1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _latest_checkpoint_step(directory: Path) -> int | None:
    try:
        text = (directory / "checkpoint").read_text()
    except OSError:
        return None
    m = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', text)
    return int(m.group(1)) if m else None


def _wait_for_checkpoint(proc, directory: Path, after: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = _latest_checkpoint_step(directory)
        if step is not None and step > after:
            return step
        if proc.poll() is not None:
            pytest.fail(f"training exited early:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_checkpoint_and_sigterm_saves_and_exits(features_dataset, encoder_weights, tmp_path):
    data, _ = features_dataset
    out = tmp_path / "out"
    argv = ["--data", data, "--encoder_weights", encoder_weights, "--output", str(out), "--steps", "1000000",
            "--checkpoint_every", "5", "--keep_checkpoints", "2", "--eval_every", "0", "--log_every", "1000", *TINY]
    first = _start(argv)
    _wait_for_checkpoint(first, out / "checkpoints", after=0)
    first.kill()  # SIGKILL: no chance to save
    first.communicate()
    killed_at = _latest_checkpoint_step(out / "checkpoints")

    second = _start(argv)
    _wait_for_checkpoint(second, out / "checkpoints", after=killed_at)
    second.send_signal(signal.SIGTERM)
    rc, stdout, stderr = _finish(second)
    assert rc == 75, stderr[-3000:]
    result = _result(stdout)
    assert result["resumed_from"] == killed_at and f"at step {killed_at}" in stdout
    assert result["preempted"] and result["step"] > killed_at and result["bundle_id"] is None
    assert f"stopped at step {result['step']} by signal {int(signal.SIGTERM)}" in stdout
    # The checkpoint of the very step it stopped at is the latest one.
    assert _latest_checkpoint_step(out / "checkpoints") == result["step"]
    assert result["checkpoint"].endswith(f"ckpt-{result['step']}")


# --- reading a prepared dataset ----------------------------------------------------------------
def test_shards_are_listed_by_pattern_when_dataset_json_names_none(tmp_path):
    from batch_caption.cli import UsageError
    from batch_caption.training.preflight import read_dataset

    vocab = Vocabulary.build(["a red square"])
    info = DatasetInfo(mode="images", image_size=32, max_length=6, vocab_size=len(vocab),
                       splits={"train": {"images": 2, "captions": 2}, "val": {"files": ["val-0.tfrecord"]}})
    (tmp_path / "dataset.json").write_text(info.to_json())
    (tmp_path / "vocab.json").write_text(vocab.to_json())
    for name in ("train-00001-of-00002.tfrecord", "train-00000-of-00002.tfrecord", "val-0.tfrecord", "other.tfrecord"):
        (tmp_path / name).write_bytes(b"")
    spec = read_dataset(str(tmp_path))
    assert spec.files["train"] == tuple(str(tmp_path / f"train-0000{k}-of-00002.tfrecord") for k in (0, 1))
    assert spec.files["val"] == (str(tmp_path / "val-0.tfrecord"),)
    os.remove(tmp_path / "val-0.tfrecord")
    with pytest.raises(UsageError, match="shard .*val-0.tfrecord is missing"):
        read_dataset(str(tmp_path))


# --- small_cnn's pooled grid follows the features dataset -------------------------------------
def _features_spec(tmp_path, grid, feature_size):
    from batch_caption.training.preflight import DatasetSpec

    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"only checked for existence here")
    source = {"encoder_weights": str(weights)} if grid is None else {"encoder_weights": str(weights), "small_cnn_grid": grid}
    info = DatasetInfo(mode="features", image_size=96, max_length=6, vocab_size=9, encoder="small_cnn",
                       feature_size=feature_size, source=source,
                       splits={"train": {"files": ["train-0.tfrecord"], "images": 2, "captions": 2}})
    vocab = Vocabulary.build(["a red square", "a blue circle"])
    return DatasetSpec(str(tmp_path), info, vocab, {"train": (str(tmp_path / "train-0.tfrecord"),)})


@pytest.mark.parametrize("recorded, feature_size, flag, want", [
    (3, 9 * 128, None, 3),     # the dataset's record decides
    (None, 16 * 128, None, 4),  # a dataset prepared before the record existed
    (3, 9 * 128, 3, 3),        # an agreeing flag is fine
    (3, 9 * 128, 4, "does not match the grid of the dataset's features (3)"),
    (None, 9 * 128, None, "have 1152 floats, not the 2048 of small_cnn pooled to 4x4"),
])
def test_features_dataset_decides_the_small_cnn_grid(tmp_path, recorded, feature_size, flag, want):
    from batch_caption.cli import UsageError
    from batch_caption.training.preflight import resolve

    spec = _features_spec(tmp_path, recorded, feature_size)
    given = [] if flag is None else ["--small_cnn_grid", str(flag)]
    config = train_cli.parse(["--data", spec.path, "--output", str(tmp_path / "out"), "--eval_every", "0", *given])
    if isinstance(want, str):
        with pytest.raises(UsageError, match=re.escape(want)):
            resolve(config, spec)
    else:
        assert resolve(config, spec)[0].model.small_cnn_grid == want


def test_a_model_flag_the_dataset_decides_is_checked_against_it_even_at_its_default(tmp_path):
    """--encoder small_cnn is ModelConfig's default, yet given: another encoder's features
    are refused. Imagenet weights are checked against the encoder the dataset names."""
    from batch_caption.cli import UsageError
    from batch_caption.training.preflight import resolve

    spec = _features_spec(tmp_path, None, 576)
    spec = dataclasses.replace(spec, info=dataclasses.replace(spec.info, encoder="mobilenet_v3_small"))
    base = ["--data", spec.path, "--output", str(tmp_path / "out"), "--eval_every", "0"]
    with pytest.raises(UsageError, match=re.escape("--encoder small_cnn does not match the encoder that made the "
                                                   "features (mobilenet_v3_small)")):
        resolve(train_cli.parse([*base, "--encoder", "small_cnn"]), spec)
    model = resolve(train_cli.parse([*base, "--encoder_weights", "imagenet"]), spec)[0].model
    assert (model.encoder, model.encoder_weights, model.train_encoder) == ("mobilenet_v3_small", "imagenet", False)
    with pytest.raises(UsageError, match="small_cnn has no imagenet weights"):
        train_cli.parse([*base, "--encoder", "small_cnn", "--encoder_weights", "imagenet"])


def _resolved(tmp_path, **model):
    """A TrainConfig whose model is complete, as preflight.resolve leaves it."""
    from batch_caption.model.config import ModelConfig
    from batch_caption.training.config import TrainConfig

    return TrainConfig(data=str(tmp_path), output=str(tmp_path / "out"), model=ModelConfig(vocab_size=9, **model))


@pytest.mark.parametrize("field, changed, message", [
    ("small_cnn_grid", 3, "small_cnn_grid 4 -> 3"),
    ("image_input", "every_step", "image_input 'first' -> 'every_step'"),
])
def test_a_run_from_before_a_model_field_still_resumes(tmp_path, field, changed, message):
    from batch_caption.cli import UsageError
    from batch_caption.training.preflight import TRAIN_CONFIG_NAME, check_output

    (tmp_path / "out").mkdir()
    old = _resolved(tmp_path).model.to_dict()
    del old[field]  # train_config.json as written before the field existed
    (tmp_path / "out" / TRAIN_CONFIG_NAME).write_text(json.dumps({"model": old}))
    assert check_output(_resolved(tmp_path)) is True
    with pytest.raises(UsageError, match=message):
        check_output(_resolved(tmp_path, **{field: changed}))


def test_train_config_json_holds_the_model_in_the_options_and_a_flat_one_still_resumes(tmp_path):
    """train_config.json is TrainConfig.to_dict (the model nested); the flat form written
    before, {"train": options with the model's fields, "model": config.json's}, is read too."""
    from batch_caption.cli import UsageError
    from batch_caption.training.preflight import TRAIN_CONFIG_NAME, check_output

    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / TRAIN_CONFIG_NAME
    config = _resolved(tmp_path, decoder="attention", lstm_units=64)
    written = config.to_dict()
    assert written["model"] == config.model.to_dict() and "lstm_units" not in written and written["steps"] == 10_000
    path.write_text(config.to_json())
    assert check_output(config) is True
    flat = {k: v for k, v in written.items() if k not in ("model", "given")}
    flat.update(encoder="small_cnn", image_size=96, small_cnn_grid=4, image_input="first", decoder="attention",
                attention_units=256, deep_output=False, embedding_size=256, lstm_units=64, dropout=0.3,
                encoder_weights=None, train_encoder=True)
    path.write_text(json.dumps({"train": flat, "model": config.model.to_dict()}))
    assert check_output(config) is True
    with pytest.raises(UsageError, match="lstm_units 64 -> 32"):
        check_output(_resolved(tmp_path, decoder="attention", lstm_units=32))


@pytest.mark.parametrize("made_for, decoder, ok", [
    ("attention", "attention", True), ("show_and_tell", "show_and_tell", True), (None, "show_and_tell", True),
    ("show_and_tell", "attention", False), ("attention", "show_and_tell", False),
])
def test_application_features_must_be_made_for_the_decoder(tmp_path, made_for, decoder, ok):
    """efficientnet_lite0 features are a grid for attention and pooled for Show and Tell."""
    from batch_caption.cli import UsageError
    from batch_caption.training.preflight import resolve

    spec = _features_spec(tmp_path, None, 49 * 1280 if made_for == "attention" else 1280)
    source = dict(spec.info.source, **({"decoder": made_for} if made_for else {}))
    spec = dataclasses.replace(spec, info=dataclasses.replace(spec.info, encoder="efficientnet_lite0", image_size=224,
                                                              source=source))
    config = train_cli.parse(["--data", spec.path, "--output", str(tmp_path / "out"), "--decoder", decoder,
                              "--eval_every", "0"])
    if ok:
        model = resolve(config, spec)[0].model
        assert model.encoder == "efficientnet_lite0" and model.decoder == decoder
    else:
        with pytest.raises(UsageError, match=f"made for --decoder {made_for}, not {decoder}"):
            resolve(config, spec)


# --- distillation from --teachers -------------------------------------------------------
def test_distillation_loss_mixes_the_reference_word_with_the_teachers_distribution():
    from batch_caption.model.show_and_tell import caption_loss
    from batch_caption.training.distill import distillation_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    teacher = rng.dirichlet(np.ones(6), size=(2, 4)).astype(np.float32)
    targets = np.array([[3, 5, 2, 0], [4, 2, 0, 0]], np.int32)  # <pad> (0) after each caption's end
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = targets != 0
    want = sum(-(0.7 * log_p[b, t, targets[b, t]] + 0.3 * (teacher[b, t] * log_p[b, t]).sum())
               for b, t in zip(*np.nonzero(real)))
    total, count = distillation_loss(targets, logits, teacher, 0.3)
    assert float(total) == pytest.approx(want, rel=1e-5) and float(count) == real.sum()
    # Weight 0 is the plain loss; a one-hot teacher on the references gives it at any weight.
    plain = float(caption_loss(targets, logits)[0])
    assert float(distillation_loss(targets, logits, teacher, 0.0)[0]) == pytest.approx(plain, rel=1e-6)
    onehot = np.eye(6, dtype=np.float32)[targets]
    assert float(distillation_loss(targets, logits, onehot, 0.8)[0]) == pytest.approx(plain, rel=1e-5)


def test_a_step_with_teachers_descends_the_distillation_loss(features_dataset, encoder_weights, tmp_path):
    """One SGD step with two --teachers == w - lr * grad of the loss against their mean
    distribution, computed here by hand from the teachers' bundles."""
    import keras

    from batch_caption.model.load import load_bundle
    from batch_caption.model.network import build_model
    from batch_caption.training.distill import distillation_loss

    data, _ = features_dataset
    base = ["--data", data, "--encoder_weights", encoder_weights, "--strategy", "one_device", "--eval_every", "0",
            "--bucket_width", "0", "--dropout", "0", *TINY]
    teachers = [train_cli.run(base + ["--output", str(tmp_path / f"t{seed}"), "--steps", "3", "--seed", str(seed)])
                .export_path for seed in (1, 2)]
    lr, seed, weight = 0.5, 3, 0.4
    result = train_cli.run(base + ["--output", str(tmp_path / "student"), "--steps", "1", "--optimizer", "sgd",
                                   "--learning_rate", str(lr), "--lr_schedule", "constant", "--clip_norm", "0",
                                   "--seed", str(seed), "--teachers", ",".join(teachers),
                                   "--teacher_weight", str(weight)])
    written = json.loads((tmp_path / "student" / "train_config.json").read_text())
    assert written["teachers"] == teachers and written["teacher_weight"] == weight

    trained = load_bundle(result.export_path).model
    keras.utils.set_random_seed(seed)
    model = build_model(dataclasses.replace(trained.config, encoder_weights=encoder_weights))
    model.build_all()
    batch = next(iter(data_input.make_dataset(_files(data, "train"), _info(data), 8, training=True, seed=seed,
                                              bucket_width=0)))
    inputs = {"features": batch["features"], "tokens": batch["tokens"]}
    mean = sum(tf.nn.softmax(load_bundle(t).model(inputs)) for t in teachers) / 2
    variables = [v for v in model.trainable_variables if not v.path.startswith("small_cnn")]
    with tf.GradientTape() as tape:
        loss_sum, count = distillation_loss(batch["targets"], model(inputs, training=True), mean, weight)
        loss = loss_sum / count
    grads = tape.gradient(loss, variables)
    assert result.loss == pytest.approx(float(loss), rel=1e-5)
    for v, g in zip(variables, grads):
        got = next(w for w in trained.weights if w.path == v.path).numpy()
        np.testing.assert_allclose(got, v.numpy() - lr * tf.convert_to_tensor(g).numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=v.path)


def test_teachers_that_cannot_score_the_dataset_are_refused(features_dataset, encoder_weights, tiny_bundle, tmp_path,
                                                           capsys):
    data, _ = features_dataset
    base = ["--data", data, "--output", str(tmp_path / "out"), "--encoder_weights", encoder_weights]
    assert train_cli.main(base + ["--teachers", tiny_bundle]) == 2
    assert "has another vocabulary than the dataset" in capsys.readouterr().err
    assert train_cli.main(base + ["--teachers", str(tmp_path / "none")]) == 2
    assert "--teachers: " in capsys.readouterr().err
    assert train_cli.main(base + ["--teachers", f"{tiny_bundle},{tiny_bundle}"]) == 2
    assert "--teachers names a bundle twice" in capsys.readouterr().err
    assert train_cli.main(base + ["--teachers", tiny_bundle, "--teacher_weight", "0"]) == 2
    assert "--teacher_weight must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
