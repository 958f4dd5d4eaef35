"""Shared fixtures: tiny models and bundles, a local GCS emulator."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The LiteRT compile cache (model.lite): one per session, never the user's; subprocesses inherit it.
_CACHE = tempfile.TemporaryDirectory(prefix="batch_caption-test-cache-")
os.environ["BATCH_CAPTION_CACHE"] = _CACHE.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A gcp-storage-emulator on 127.0.0.1 (in memory) with bucket 'test-bucket', that
    enforces generation preconditions as GCS does (tests/gcs_emulator.py).

    Sets STORAGE_EMULATOR_HOST for this process and its children; yields the bucket name.
    """
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, script, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
         "--default-bucket", "test-bucket", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{host}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("gcs emulator did not start")
            time.sleep(0.2)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    from batch_caption.storage import gcs

    gcs.configure_for_emulator()
    try:
        yield "test-bucket"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture
def progress_reporter(monkeypatch):
    """This process's progress reporter (progress.reporter()), fresh and silent."""
    import io

    from batch_caption.pipeline import progress

    reporter = progress.Reporter(stream=io.StringIO(), bar=False)
    monkeypatch.setattr(progress, "_reporter", reporter)
    return reporter


@pytest.fixture(scope="session")
def tiny_vocab():
    from batch_caption.model.vocab import Vocabulary

    return Vocabulary.build(
        ["a red circle", "a blue square", "a green triangle to the left of a red circle", "two shapes"]
    )


def _tiny_model(vocab, seed: int, **config):
    """A randomly initialised small_cnn model, 64 px, built (Show and Tell unless `config`
    names another decoder)."""
    import keras

    from batch_caption.model.config import ModelConfig
    from batch_caption.model.network import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(ModelConfig(vocab_size=len(vocab), image_size=64, embedding_size=32, lstm_units=48,
                                    dropout=0.0, **config))
    model.build_all()
    # Sharpen the random projections so different images get different captions
    # (a freshly initialised model says the same thing for everything).
    sharpen = ("image_projection", "output_projection", "init_h", "init_c", "attention_score")
    for layer in (getattr(model, name) for name in sharpen if hasattr(model, name)):
        layer.kernel.assign(layer.kernel * 6.0)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_vocab):
    """A randomly initialised small_cnn Show-and-Tell model, 64 px, built."""
    return _tiny_model(tiny_vocab, seed=1)


@pytest.fixture(scope="session")
def every_step_model(tiny_vocab):
    """tiny_model's shape with the image fed at every step (LSTM inputs 2 x 32)."""
    return _tiny_model(tiny_vocab, seed=4, image_input="every_step")


@pytest.fixture(scope="session", params=[False, True], ids=["plain_output", "deep_output"])
def attention_model(tiny_vocab, request):
    """tiny_model's shape with the attention decoder over small_cnn's 2x2 grid of cells;
    each test runs with the plain output layer and with the deep output."""
    return _tiny_model(tiny_vocab, seed=6, decoder="attention", attention_units=24, small_cnn_grid=2,
                       deep_output=request.param)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tiny_vocab, tmp_path_factory):
    """Path of a saved bundle of `tiny_model`."""
    from batch_caption.model.bundle import save_bundle

    path = str(tmp_path_factory.mktemp("bundle") / "tiny")
    save_bundle(tiny_model, tiny_vocab, path)
    return path

