"""Self-critical fine-tuning (`python -m batch_caption.training.self_critical`) on a tiny
features dataset made by the real prepare and train commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from batch_caption import prepare
from batch_caption import train as train_cli
from batch_caption.model import vocab as V
from batch_caption.training import self_critical as sc
from batch_caption.training.cider import read_references

TINY = ["--samples_per_image", "3", "--images_per_batch", "4", "--log_every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(features dataset, a bundle trained on it) for the attention decoder at 32 px."""
    import keras

    from batch_caption.model.config import ModelConfig
    from batch_caption.model.encoder import build_backbone

    root = tmp_path_factory.mktemp("scst")
    keras.utils.set_random_seed(5)
    weights = str(root / "small_cnn.weights.h5")
    build_backbone(ModelConfig(vocab_size=5, encoder="small_cnn", image_size=32, small_cnn_grid=2)).save_weights(weights)
    data = str(root / "data")
    prepare.run(["--source", "synthetic", "--synthetic_counts", "train=12,val=6", "--image_size", "32",
                 "--min_word_count", "1", "--output", data, "--precompute_features", "--encoder", "small_cnn",
                 "--small_cnn_grid", "2", "--encoder_weights", weights, "--decoder", "attention"])
    result = train_cli.run(["--data", data, "--output", str(root / "xe"), "--decoder", "attention", "--steps", "30",
                            "--embedding_size", "16", "--lstm_units", "16", "--attention_units", "8",
                            "--global_batch_size", "8", "--num_samples", "0", "--eval_every", "0",
                            "--strategy", "one_device", "--learning_rate", "1e-2"])
    return data, result.export_path


def _trainer(trained, tmp_path, *extra):
    data, bundle = trained
    args = vars(sc.build_parser().parse_args(["--init", bundle, "--data", data, "--output", str(tmp_path / "out"),
                                              *TINY, *extra]))
    return sc.SelfCriticalTrainer(sc.SelfCriticalConfig(**args), log=lambda line: None)


def test_samples_are_captions_the_decoder_could_say(trained, tmp_path):
    trainer = _trainer(trained, tmp_path)
    _, features = next(iter(trainer._images("train", training=True, seed=0)))
    samples = trainer._sample(features).numpy()
    assert samples.shape == (4 * 3, trainer.max_tokens)
    for row in samples.tolist():
        end = row.index(V.END_ID) if V.END_ID in row else len(row)
        assert end >= 1  # never an empty caption
        assert all(t not in (V.PAD_ID, V.START_ID, V.END_ID) for t in row[:end])
        assert all(t == V.PAD_ID for t in row[end + 1:])
    # Sampling draws from the generator: the next draw differs, a reseeded one repeats.
    assert not np.array_equal(samples, trainer._sample(features).numpy())


def test_the_loss_is_the_advantage_weighted_log_probability_of_the_search_step(trained, tmp_path):
    """The teacher-forced log-probs the gradient flows through equal those of `step`, the
    callback that sampled the captions (summed to <end>)."""
    trainer = _trainer(trained, tmp_path, "--clip_norm", "0")
    model = trainer.model
    _, features = next(iter(trainer._images("train", training=True, seed=1)))
    samples = trainer._sample(features).numpy()
    advantages = np.linspace(-1.0, 1.0, len(samples)).astype(np.float32)

    state = tf.nest.map_structure(lambda s: tf.repeat(s, 3, axis=0), model.initial_state(features))
    prev = tf.fill([len(samples)], V.START_ID)
    total = np.zeros(len(samples))
    alive = np.ones(len(samples), bool)
    for t in range(samples.shape[1]):
        log_probs, state = model.step(prev, state)
        tokens = samples[:, t]
        picked = log_probs.numpy()[np.arange(len(samples)), np.where(alive, tokens, 0)]
        total += np.where(alive, picked, 0.0)
        alive &= tokens != V.END_ID
        prev = tf.constant(tokens)
    before = [v.numpy() for v in trainer.decoder_vars]
    loss, _ = trainer._train_step(features, samples, advantages)
    assert float(loss) == pytest.approx(-np.mean(advantages * total), rel=1e-4, abs=1e-5)
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, trainer.decoder_vars))


def test_rewards_are_cider_d_of_the_words_and_unk_matches_nothing(trained, tmp_path):
    data, _ = trained
    trainer = _trainer(trained, tmp_path)
    key, refs = next(iter(read_references(f"{data}/references_train.json").items()))
    word = refs[0][0]
    ids = [trainer.vocabulary.token_id(word), V.UNK_ID, V.END_ID, V.PAD_ID]
    assert key in trainer.reward and trainer._words(ids) == [word, V.UNK]
    samples = np.array([ids, [V.UNK_ID, V.END_ID, V.PAD_ID, V.PAD_ID], ids])
    rewards = trainer._rewards(np.array([key]), samples)
    assert rewards.shape == (1, 3) and rewards[0, 0] == rewards[0, 2] == trainer.reward.score(key, [word, V.UNK])
    assert rewards[0, 1] == 0.0


def test_run_keeps_the_best_validation_weights_and_resumes(trained, tmp_path, capsys):
    from batch_caption.model.load import load_bundle

    data, bundle = trained
    out = tmp_path / "out"
    argv = ["--init", bundle, "--data", data, "--output", str(out), *TINY, "--eval_every", "2",
            "--checkpoint_every", "2", "--learning_rate", "1e-2"]
    first = sc.run(argv + ["--steps", "2"])
    result = sc.run(argv + ["--steps", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("resumed from ") for line in lines)
    evals = [line for line in lines if line.startswith("eval step ")]
    assert [line.split(":")[0] for line in evals] == ["eval step 0", "eval step 2", "eval step 4"]
    scores = {int(line.split()[2].rstrip(":")): float(line.split()[5]) for line in evals}
    best = json.loads((out / "best.json").read_text())
    assert best == result["best"] and best["cider_d"] == max(scores.values()) and scores[best["step"]] == best["cider_d"]
    assert first["step"] == 2 and result["step"] == 4 and not result["preempted"]
    exported = load_bundle(result["export"])
    assert exported.bundle_id == result["bundle_id"]
    # The exported weights are the best evaluation's: evaluating them again gives its score.
    trainer = _trainer(trained, tmp_path / "again", "--init", result["export"])
    assert trainer.evaluate() == pytest.approx(best["cider_d"], abs=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--samples_per_image", "1"], "--samples_per_image must be in [2, 64]"),
    (["--eval_split", "train"], "--train_split and --eval_split must differ"),
    (["--train_split", "test"], "has no 'test' split"),
])
def test_bad_flags_fail_in_one_line(trained, tmp_path, capsys, flags, message):
    data, bundle = trained
    code = sc.main(["--init", bundle, "--data", data, "--output", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_an_images_dataset_is_refused(trained, tmp_path, capsys):
    data, bundle = trained
    other = tmp_path / "other"
    prepare.run(["--source", "synthetic", "--synthetic_counts", "train=4,val=2", "--image_size", "32",
                 "--min_word_count", "3", "--output", str(other)])
    code = sc.main(["--init", bundle, "--data", str(other), "--output", str(tmp_path / "o")])
    assert code == 2 and "needs a features dataset" in capsys.readouterr().err
