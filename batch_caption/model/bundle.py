"""Model bundle: a directory (local or any Beam FileSystems path, gs:// included).

    config.json         ModelConfig (architecture, format_version)
    vocab.json          Vocabulary
    model.weights.h5    Keras 3 weights of the whole ShowAndTell model
    bundle.json         {"bundle_id", "files": {name: sha256}}, written last

The bundle id is a hash of the config, the vocabulary and the weight values (every array
of the weights file with its path, dtype and shape; not the file's bytes, because Keras
also writes auto-generated layer names into it that depend on process history), so two
bundles with the same id caption identically. Loading checks every file against bundle.json, so a corrupted or
truncated file is reported by name instead of surfacing as an obscure h5 error. Only
weights are stored: the architecture is rebuilt from code and config, so nothing is
unpickled or deserialised as code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import TYPE_CHECKING

from apache_beam.io.filesystems import FileSystems

from batch_caption.model.config import ModelConfig
from batch_caption.model.vocab import Vocabulary

if TYPE_CHECKING:  # TensorFlow loads in ~4 s: checking a bundle (the job's first step) needs none
    from batch_caption.model.show_and_tell import ShowAndTell

CONFIG, VOCAB, WEIGHTS, MANIFEST = "config.json", "vocab.json", "model.weights.h5", "bundle.json"
CONTENT_FILES = (CONFIG, VOCAB, WEIGHTS)
BUNDLE_FORMAT = "batch_caption.bundle/1"


class BundleError(Exception):
    """A bundle is missing, incomplete or corrupted; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Bundle:
    model: ShowAndTell
    vocabulary: Vocabulary
    config: ModelConfig
    bundle_id: str
    path: str


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path, compression_type="uncompressed") as f:
        f.write(data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_digest(weights_file: str) -> str:
    """sha256 over every array of a local Keras .weights.h5 file: path, dtype, shape, bytes."""
    import h5py
    import numpy as np

    h = hashlib.sha256()
    with h5py.File(weights_file, "r") as f:
        names: list[str] = []
        f.visit(names.append)
        for name in sorted(names):
            obj = f[name]
            if isinstance(obj, h5py.Dataset):
                value = np.ascontiguousarray(obj[()])
                h.update(f"{name}|{value.dtype.str}|{value.shape}\n".encode())
                h.update(value.tobytes())
    return h.hexdigest()


def compute_bundle_id(config_json: bytes, vocab_json: bytes, weights_digest_hex: str) -> str:
    """16 hex digits identifying what the bundle computes."""
    joined = f"{_sha256(config_json)}\n{_sha256(vocab_json)}\n{weights_digest_hex}\n"
    return _sha256(joined.encode())[:16]


def save_bundle(model: ShowAndTell, vocabulary: Vocabulary, path: str) -> str:
    """Writes the bundle under `path` (created if needed); returns the bundle id."""
    if len(vocabulary) != model.config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocabulary)} tokens, model expects {model.config.vocab_size}")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        model.save_weights(local)
        digest = weights_digest(local)
        with open(local, "rb") as f:
            contents = {
                CONFIG: json.dumps(model.config.to_dict(), indent=2, sort_keys=True).encode(),
                VOCAB: vocabulary.to_json().encode(),
                WEIGHTS: f.read(),
            }
    if not FileSystems.exists(path):
        FileSystems.mkdirs(path)
    hashes = {}
    for name, data in contents.items():
        write_bytes(FileSystems.join(path, name), data)
        hashes[name] = _sha256(data)
    bundle_id = compute_bundle_id(contents[CONFIG], contents[VOCAB], digest)
    manifest = {"format": BUNDLE_FORMAT, "bundle_id": bundle_id, "files": hashes}
    write_bytes(FileSystems.join(path, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return bundle_id


def _read_checked(path: str, name: str, expected_sha: str | None) -> bytes:
    full = FileSystems.join(path, name)
    try:
        data = read_bytes(full)
    except Exception as e:  # FileSystems raises IOError / BeamIOError / GCS errors
        raise BundleError(f"model bundle file {full} cannot be read: {e}") from e
    if expected_sha is not None and _sha256(data) != expected_sha:
        raise BundleError(f"model bundle file {full} is corrupted (sha256 does not match {MANIFEST})")
    return data


def read_manifest(path: str) -> dict:
    """The bundle's bundle.json, validated."""
    raw = _read_checked(path, MANIFEST, None)
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != BUNDLE_FORMAT or set(manifest["files"]) != set(CONTENT_FILES):
            raise ValueError(f"expected format {BUNDLE_FORMAT} listing {', '.join(CONTENT_FILES)}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"model bundle file {FileSystems.join(path, MANIFEST)} is invalid: {e}") from e
    return manifest


def verify_bundle(path: str) -> tuple[dict, ModelConfig]:
    """Checks every file of the bundle at `path` without building the model (no
    TensorFlow work): returns (bundle.json contents, ModelConfig). Raises BundleError."""
    manifest, files = _read_verified(path)
    return manifest, _parse_config(path, files[CONFIG])


def _read_verified(path: str) -> tuple[dict, dict[str, bytes]]:
    manifest = read_manifest(path)
    return manifest, {name: _read_checked(path, name, manifest["files"][name]) for name in CONTENT_FILES}


def _parse_config(path: str, raw: bytes) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise BundleError(f"model bundle file {FileSystems.join(path, CONFIG)} is invalid: {e}") from e


def load_bundle(path: str) -> Bundle:
    """Reads, verifies and builds the model of the bundle at `path` (no network)."""
    manifest, files = _read_verified(path)
    config = _parse_config(path, files[CONFIG])
    try:
        vocabulary = Vocabulary.from_json(files[VOCAB].decode())
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"model bundle file {FileSystems.join(path, VOCAB)} is invalid: {e}") from e
    if len(vocabulary) != config.vocab_size:
        raise BundleError(f"model bundle {path}: vocab.json has {len(vocabulary)} tokens, config.json says {config.vocab_size}")
    from batch_caption.model.show_and_tell import ShowAndTell

    # The bundle carries trained weights for the whole model: never fetch the backbone's.
    model = ShowAndTell(config, initial_encoder_weights=False)
    model.build_all()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        with open(local, "wb") as f:
            f.write(files[WEIGHTS])
        try:
            model.load_weights(local)
        except Exception as e:  # h5py / Keras raise many types for a mismatched file
            raise BundleError(f"model bundle file {FileSystems.join(path, WEIGHTS)} does not fit config.json: {e}") from e
    return Bundle(model, vocabulary, config, manifest["bundle_id"], path)


def load_captioner(path: str, decode=None):
    """Convenience: a `Captioner` over the bundle at `path`."""
    from batch_caption.model.captioner import Captioner

    b = load_bundle(path)
    return Captioner(b.model, b.vocabulary, decode, b.bundle_id)
