"""training.average_checkpoints: the mean of a run's last checkpoints, as a bundle."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from batch_caption import cli
from batch_caption.model.bundle import save_bundle
from batch_caption.model.load import load_bundle
from batch_caption.training import average_checkpoints


def _run_dir(tmp_path, model, vocab, steps):
    """A train --output folder: export/ and one checkpoint per step, the weights scaled by the step."""
    save_bundle(model, vocab, str(tmp_path / "export"))
    original = [w.numpy() for w in model.weights]
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(tmp_path / "checkpoints"), max_to_keep=9)
    for step in steps:
        for w, x in zip(model.weights, original):
            w.assign(x * step)
        manager.save(checkpoint_number=step)
    for w, x in zip(model.weights, original):
        w.assign(x)
    return original


def test_the_last_k_checkpoints_are_averaged(tiny_model, tiny_vocab, tmp_path):
    original = _run_dir(tmp_path / "run", tiny_model, tiny_vocab, steps=[10, 20, 30, 40])
    assert [p.rsplit("-", 1)[1] for p in average_checkpoints.last_checkpoints(str(tmp_path / "run"), 3)] == [
        "20", "30", "40"]
    out = str(tmp_path / "mean")
    bundle_id = average_checkpoints.run(["--train_dir", str(tmp_path / "run"), "--last", "2", "--output", out,
                                         "--export_weights_dtype", "float32"])
    mean = load_bundle(out)
    assert mean.bundle_id == bundle_id and mean.vocabulary == tiny_vocab
    for w, x in zip(mean.model.weights, original):
        np.testing.assert_allclose(w.numpy(), x * 35.0, rtol=1e-6)  # (30 + 40) / 2


def test_bad_requests_fail_before_any_work(tiny_model, tiny_vocab, tmp_path):
    _run_dir(tmp_path / "run", tiny_model, tiny_vocab, steps=[1, 2])
    with pytest.raises(cli.UsageError, match=r"--last must be in 1\.\.2"):
        average_checkpoints.run(["--train_dir", str(tmp_path / "run"), "--last", "3", "--output", str(tmp_path / "o")])
    with pytest.raises(cli.UsageError, match="--last must be >= 1"):
        average_checkpoints.run(["--train_dir", str(tmp_path / "run"), "--last", "0", "--output", str(tmp_path / "o")])
    with pytest.raises(cli.UsageError, match="no checkpoints"):
        average_checkpoints.run(["--train_dir", str(tmp_path / "empty"), "--last", "1", "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
