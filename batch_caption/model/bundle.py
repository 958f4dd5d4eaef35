"""Model bundle: the files of a trained model in one directory (local or any FileSystems URL).

    config.json         ModelConfig (architecture, format_version)
    vocab.json          Vocabulary
    model.weights.h5    Keras 3 weights of the whole network (encoder and decoder)
    decode.json         optional: the search settings the model was tuned with (a
                        DecodeConfig), the job's defaults for it; its flags override them
    bundle.json         {"format", "bundle_id", "files": {name: sha256}}, written last

The bundle id is a hash of the config, the vocabulary, decode.json when there is one, and
the weight values (every array
of the weights file with its path, dtype and shape; not the file's bytes, because Keras
also writes auto-generated layer names into it that depend on process history), so two
bundles with the same id caption identically. Reading checks config.json and vocab.json
against their sha256 in bundle.json and recomputes the id from them and the weight values:
a corrupted, truncated or replaced file (new weights beside a stale bundle.json) is refused
by name before the model is built, and the id a run records is always that of the weights
it ran. The weights are hashed once per read, as arrays (the id needs them); their file
sha256 is compared only when the id differs, to tell replaced weights from a bundle.json
that does not fit its files. Only weights are stored: the architecture is rebuilt from
code and config, so nothing is unpickled or deserialised as code.

This module writes, reads and verifies those files without TensorFlow, so the job can
check a bundle before loading it; `model.load` builds the model and Captioner from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from batch_caption.model.config import DecodeConfig, ModelConfig
from batch_caption.model.vocab import Vocabulary
from batch_caption.storage import files

if TYPE_CHECKING:  # annotations only: this module imports no TensorFlow
    from batch_caption.model.network import CaptionModel

CONFIG, VOCAB, WEIGHTS, MANIFEST = "config.json", "vocab.json", "model.weights.h5", "bundle.json"
DECODE = "decode.json"
CONTENT_FILES = (CONFIG, VOCAB, WEIGHTS)  # and DECODE, when the bundle has one
BUNDLE_FORMAT = "batch_caption.bundle/1"


class BundleError(Exception):
    """A bundle is missing, incomplete or corrupted; the message names the file."""


@dataclasses.dataclass(frozen=True)
class BundleFiles:
    """A bundle's files, read and verified: what `model.load` builds the model from."""

    path: str
    manifest: dict
    config: ModelConfig
    vocabulary: Vocabulary
    weights: bytes  # the model.weights.h5 file
    decode: DecodeConfig | None = None  # decode.json: the model's search defaults

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_digest(arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 over named arrays in name order: each array's name, dtype, shape and bytes.

    The one definition of a weights digest, whether the arrays come from a weights file
    (`weights_file_digest`) or from a live model's variables (training's result).
    """
    h = hashlib.sha256()
    for name, array in sorted(arrays, key=lambda pair: pair[0]):
        value = np.ascontiguousarray(array)
        h.update(f"{name}|{value.dtype.str}|{value.shape}\n".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def weights_file_digest(weights_file) -> str:
    """`arrays_digest` of every array of a Keras .weights.h5 file (a local path or a binary
    file object), by its h5 path."""
    import h5py

    with h5py.File(weights_file, "r") as f:
        names: list[str] = []
        f.visit(names.append)
        datasets = [(name, f[name]) for name in names if isinstance(f[name], h5py.Dataset)]
        return arrays_digest((name, dataset[()]) for name, dataset in datasets)


def compute_bundle_id(config_json: bytes, vocab_json: bytes, weights_digest_hex: str,
                      decode_json: bytes | None = None) -> str:
    """16 hex digits identifying what the bundle computes (a bundle without decode.json
    keeps the id it had before decode.json existed)."""
    joined = f"{_sha256(config_json)}\n{_sha256(vocab_json)}\n{weights_digest_hex}\n"
    if decode_json is not None:
        joined += f"{_sha256(decode_json)}\n"
    return _sha256(joined.encode())[:16]


WEIGHT_DTYPES = ("float32", "float16")


def _store_as(weights_file: str, dtype: str) -> None:
    """Rewrites every float32 array of a .weights.h5 file as `dtype` (Keras casts them back
    to the variables' float32 on load: half the bytes, the network still computes in float32).
    The file is written anew: HDF5 does not give back the space of deleted arrays."""
    import h5py

    def copy(source, target):
        target.attrs.update(source.attrs)
        for name, item in source.items():
            if isinstance(item, h5py.Group):
                copy(item, target.create_group(name))
            else:
                data = item[()]
                if item.dtype == np.float32:
                    data = data.astype(dtype)
                target.create_dataset(name, data=data).attrs.update(item.attrs)

    converted = weights_file + ".converted"
    with h5py.File(weights_file, "r") as source, h5py.File(converted, "w") as target:
        copy(source, target)
    os.replace(converted, weights_file)


def _portable_config(config: ModelConfig) -> dict:
    """config.json's content: a local encoder_weights path (where the backbone's first
    weights came from; informational, the bundle carries trained ones) is cut to its file
    name, so no machine's path goes into a bundle."""
    data = config.to_dict()
    weights = data.get("encoder_weights")
    if weights not in (None, "imagenet") and "://" not in weights:
        data["encoder_weights"] = os.path.basename(weights)
    return data


def save_bundle(model: CaptionModel, vocabulary: Vocabulary, path: str, weights_dtype: str = "float32",
                decode: DecodeConfig | None = None) -> str:
    """Writes the bundle under `path` (created if needed); returns the bundle id.

    weights_dtype: how model.weights.h5 stores the float weights, one of `WEIGHT_DTYPES`.
    decode: search defaults to ship with the model (decode.json); None: the job's own.
    """
    if len(vocabulary) != model.config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocabulary)} tokens, model expects {model.config.vocab_size}")
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weights_dtype!r}")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, WEIGHTS)
        model.save_weights(local)
        if weights_dtype != "float32":
            _store_as(local, weights_dtype)
        digest = weights_file_digest(local)
        contents = {
            CONFIG: json.dumps(_portable_config(model.config), indent=2, sort_keys=True).encode(),
            VOCAB: vocabulary.to_json().encode(),
            WEIGHTS: files.read_bytes(local),
        }
    if decode is not None:
        contents[DECODE] = _decode_json(decode)
    return _write_contents(path, contents, digest)


def _decode_json(decode: DecodeConfig) -> bytes:
    return json.dumps(decode.to_dict(), indent=2, sort_keys=True).encode()


def _write_contents(path: str, contents: dict[str, bytes], weights_digest_hex: str) -> str:
    """Writes the content files, then bundle.json (last: a bundle is complete once it exists)."""
    hashes = {}
    for name, data in contents.items():
        files.write_bytes(files.join(path, name), data)
        hashes[name] = _sha256(data)
    bundle_id = compute_bundle_id(contents[CONFIG], contents[VOCAB], weights_digest_hex, contents.get(DECODE))
    manifest = {"format": BUNDLE_FORMAT, "bundle_id": bundle_id, "files": hashes}
    files.write_bytes(files.join(path, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return bundle_id


def set_decode_defaults(path: str, decode: DecodeConfig | None) -> str:
    """Gives the bundle at `path` these search defaults (None: removes them), in place;
    returns its new id. The bundle is verified first; its weights are not rewritten."""
    _, contents = _read_verified(path)
    had_decode = contents.pop(DECODE, None) is not None
    if decode is not None:
        contents[DECODE] = _decode_json(decode)
    bundle_id = _write_contents(path, contents, weights_file_digest(io.BytesIO(contents[WEIGHTS])))
    if decode is None and had_decode:  # after the new bundle.json, which no longer lists it
        files.delete([files.join(path, DECODE)])
    return bundle_id


def _read_checked(path: str, name: str, expected_sha: str | None) -> bytes:
    full = files.join(path, name)
    try:
        data = files.read_bytes(full)
    except Exception as e:  # OSError locally; FileSystems raises BeamIOError / GCS errors
        raise BundleError(f"model bundle file {full} cannot be read: {e}") from e
    if expected_sha is not None and _sha256(data) != expected_sha:
        raise BundleError(f"model bundle file {full} is corrupted or replaced (sha256 does not match {MANIFEST})")
    return data


def _check_bundle_id(path: str, manifest: dict, contents: dict[str, bytes]) -> None:
    """Recomputes the id from the files; raises BundleError naming the file at fault: the
    weights when they differ from what bundle.json lists (config and vocabulary are
    checked already), else bundle.json, whose id does not fit the files it lists."""
    full = files.join(path, WEIGHTS)
    try:
        digest = weights_file_digest(io.BytesIO(contents[WEIGHTS]))
    except Exception as e:  # h5py raises OSError, KeyError, ValueError... for a broken file
        reason = " ".join(str(e).split()) or type(e).__name__
        raise BundleError(f"model bundle file {full} is corrupted (not a readable weights file: {reason})") from e
    found = compute_bundle_id(contents[CONFIG], contents[VOCAB], digest, contents.get(DECODE))
    said = manifest["bundle_id"]
    if found == said:
        return
    if _sha256(contents[WEIGHTS]) != manifest["files"][WEIGHTS]:  # only on this path: one hash per good read
        raise BundleError(f"model bundle file {full} is corrupted or replaced (sha256 does not match {MANIFEST}; "
                          f"the files give bundle id {found}, {MANIFEST} says {said})")
    raise BundleError(f"model bundle file {files.join(path, MANIFEST)} does not fit the files it lists "
                      f"(they give bundle id {found}, it says {said}): save the bundle again")


def read_manifest(path: str) -> dict:
    """The bundle's bundle.json, validated."""
    raw = _read_checked(path, MANIFEST, None)
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != BUNDLE_FORMAT or set(manifest["files"]) - {DECODE} != set(CONTENT_FILES):
            raise ValueError(f"expected format {BUNDLE_FORMAT} listing {', '.join(CONTENT_FILES)} "
                             f"(and {DECODE}, optionally)")
        if not isinstance(manifest.get("bundle_id"), str):
            raise ValueError("no bundle_id")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"model bundle file {files.join(path, MANIFEST)} is invalid: {e}") from e
    return manifest


def verify_bundle(path: str) -> tuple[dict, ModelConfig]:
    """Checks every file of the bundle at `path` and its id without building the model (no
    TensorFlow work): returns (bundle.json contents, ModelConfig). Raises BundleError."""
    return verify_bundle_with_defaults(path)[:2]


def verify_bundle_with_defaults(path: str) -> tuple[dict, ModelConfig, DecodeConfig | None]:
    """`verify_bundle`, and the bundle's search defaults (decode.json; None without one)."""
    manifest, contents = _read_verified(path)
    return manifest, _parse_config(path, contents[CONFIG]), _decode_of(path, contents)


def read_bundle(path: str) -> BundleFiles:
    """Reads and verifies every file of the bundle at `path` and its id, parsing config and
    vocabulary.

    Raises BundleError naming the file that is missing, corrupted, replaced or invalid.
    """
    manifest, contents = _read_verified(path)
    return _parsed(path, manifest, contents, contents[WEIGHTS])


def _parsed(path: str, manifest: dict, contents: dict[str, bytes], weights: bytes) -> BundleFiles:
    config = _parse_config(path, contents[CONFIG])
    try:
        vocabulary = Vocabulary.from_json(contents[VOCAB].decode())
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"model bundle file {files.join(path, VOCAB)} is invalid: {e}") from e
    if len(vocabulary) != config.vocab_size:
        raise BundleError(f"model bundle {path}: vocab.json has {len(vocabulary)} tokens, config.json says {config.vocab_size}")
    return BundleFiles(path, manifest, config, vocabulary, weights, _decode_of(path, contents))


def read_bundle_metadata(path: str) -> BundleFiles:
    """`read_bundle` without the weights (`weights` is b""): the manifest, and the small
    files checked against it. For a reader that runs a compiled copy of the weights."""
    manifest = read_manifest(path)
    return _parsed(path, manifest, _small_files(path, manifest), b"")


def _small_files(path: str, manifest: dict) -> dict[str, bytes]:
    small = (CONFIG, VOCAB, DECODE) if DECODE in manifest["files"] else (CONFIG, VOCAB)
    return {name: _read_checked(path, name, manifest["files"][name]) for name in small}


def _read_verified(path: str) -> tuple[dict, dict[str, bytes]]:
    manifest = read_manifest(path)
    contents = _small_files(path, manifest)
    contents[WEIGHTS] = _read_checked(path, WEIGHTS, None)  # checked through the id: one hash
    _check_bundle_id(path, manifest, contents)
    return manifest, contents


def _decode_of(path: str, contents: dict[str, bytes]) -> DecodeConfig | None:
    if DECODE not in contents:
        return None
    try:
        return DecodeConfig.from_dict(json.loads(contents[DECODE]))
    except (ValueError, TypeError) as e:
        raise BundleError(f"model bundle file {files.join(path, DECODE)} is invalid: {e}") from e


def _parse_config(path: str, raw: bytes) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise BundleError(f"model bundle file {files.join(path, CONFIG)} is invalid: {e}") from e

