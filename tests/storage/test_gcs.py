"""A gs:// path without Google Cloud credentials: every entry point stops before any
work, in one line that says so and how to provide them (exit 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import google.auth
import pytest
from google.auth.exceptions import DefaultCredentialsError
from helpers import evaluate_main

from batch_caption import prepare, run, train
from batch_caption.report import page
from batch_caption.storage import gcs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_credentials(monkeypatch):
    """google-auth finds nothing; counts its lookups."""
    calls = []

    def default(*args, **kwargs):
        calls.append(1)
        raise DefaultCredentialsError("Your default credentials were not found. To set up ADC, see https://...")

    monkeypatch.setattr(google.auth, "default", default)
    monkeypatch.setattr(gcs, "_found_credentials", False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    return calls


def test_local_paths_and_the_emulator_need_no_lookup(no_credentials, monkeypatch):
    gcs.require_credentials(["photos/", None, "/tmp/out"])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    gcs.require_credentials(["gs://bucket/photos"])
    assert no_credentials == []


def test_missing_credentials_name_the_path_and_the_ways_to_provide_them(no_credentials):
    with pytest.raises(gcs.MissingCredentials) as e:
        gcs.require_credentials(["photos/", "gs://bucket/out"])
    assert str(e.value) == ("gs://bucket/out: no Google Cloud credentials; run `gcloud auth application-default "
                            "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")


def test_a_broken_key_file_is_named(monkeypatch):
    monkeypatch.setattr(gcs, "_found_credentials", False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    with pytest.raises(gcs.MissingCredentials, match=r"/nonexistent/key.json.*GOOGLE_APPLICATION_CREDENTIALS"):
        gcs.require_credentials(["gs://bucket/out"])


def test_credentials_found_once_are_not_looked_up_again(monkeypatch):
    calls = []
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: calls.append(1) or (object(), "project"))
    monkeypatch.setattr(gcs, "_found_credentials", False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    gcs.require_credentials(["gs://bucket/a"])
    gcs.require_credentials(["gs://bucket/b"])
    assert calls == [1]


def test_a_lookup_that_hangs_counts_as_none_found(monkeypatch):
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: time.sleep(5))
    monkeypatch.setattr(gcs, "_found_credentials", False)
    monkeypatch.setattr(gcs, "CREDENTIALS_LOOKUP_S", 0.1)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(gcs.MissingCredentials, match=r"credentials \(the lookup took over 0.1 s\); run `gcloud"):
        gcs.require_credentials(["gs://bucket/a"])


@pytest.mark.parametrize("main, argv", [
    (run.main, ["--input", "gs://bucket/photos/", "--output", "out"]),
    (run.main, ["--output", "gs://bucket/captions"]),
    (prepare.main, ["--source", "synthetic", "--output", "gs://bucket/data"]),
    (train.main, ["--data", "gs://bucket/data", "--output", "out"]),
    (evaluate_main, ["--captions", "gs://bucket/run=1/", "--references", "refs.json", "--tokenizer", "none"]),
    (page.main, ["gs://bucket/captions/run=1"]),
], ids=["run-input", "run-output", "prepare", "train", "evaluate", "report"])
def test_every_entry_point_stops_in_one_line_before_any_work(main, argv, no_credentials, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "gs://bucket/" in err and "no Google Cloud credentials" in err, err
    assert no_credentials == [1] and os.listdir(tmp_path) == []


def test_the_command_line_without_credentials_fails_within_10_s(tmp_path):
    """No key file, no gcloud configuration, and a metadata server that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "CLOUDSDK_CONFIG")}
    env.update(PYTHONPATH=REPO, HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               GCE_METADATA_HOST=closed, GCE_METADATA_IP=closed)
    done = subprocess.run([sys.executable, "-m", "batch_caption.run", "--input", "gs://bucket/photos/",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("batch_caption.run: error: gs://bucket/photos/: no Google Cloud credentials; ")
    assert len(done.stderr.splitlines()) == 1 and "GOOGLE_APPLICATION_CREDENTIALS" in done.stderr
    assert not (tmp_path / "out").exists()
