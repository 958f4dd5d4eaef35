"""The Python API: caption images from Python, or inside a Beam pipeline of your own.

    from batch_caption import api
    captioner = api.load()                            # the bundled model, or api.load("path/to/bundle")
    records = captioner.caption_paths(["photo.jpg"])  # also caption_bytes([...]), caption_arrays([...])

    out = paths | api.CaptionPaths()                  # Beam: PCollection[str] -> {"captions", "errors"}
    handler = api.model_handler()                     # Beam's RunInference(handler) over ImageExamples
                                                      # (api.decode_example makes them)

Each call returns one record per input, in input order: a caption record, or an error
record (stage read, decode or infer): the dicts of the job's JSONL (records.py), with
run_id None unless one is given. Settings are the job's flags of the same names
(Settings). Importing this module keeps TensorFlow's load-time and C++ log lines off
stderr unless TF_CPP_MIN_LOG_LEVEL is set (quiet.quiet_library); Python logging stays as
the application configured it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from batch_caption import bundled, quiet, records
from batch_caption.core import bounded_reads
from batch_caption.core.cpus import available_cpus
from batch_caption.core.elements import ERRORS, ImageExample
from batch_caption.core.inference import CaptionModelHandler
from batch_caption.core.read import ReadImages
from batch_caption.images import decoding
from batch_caption.model.config import SEARCH_FLAGS, DecodeConfig
from batch_caption.pipeline.caption import CaptionImages
from batch_caption.pipeline.config import default_batch_size
from batch_caption.storage import gcs

quiet.quiet_library()  # none of the imports above loads TensorFlow: its first import is held

__all__ = ["ERRORS", "CaptionModelHandler", "CaptionPaths", "Captioner", "ImageExample", "Settings",
           "decode_example", "image_size", "load", "model_handler"]


def _search_settings() -> type:
    """A frozen dataclass with one field per search flag of the job (DecodeConfig's fields,
    under their flags' names), each None unless given: None takes the model's default (its
    bundle's decode.json), else DecodeConfig's. A new DecodeConfig field comes with it."""
    types = {f.name: f.type for f in dataclasses.fields(DecodeConfig)}
    fields = [(flag, f"{types[name]} | None", dataclasses.field(default=None)) for flag, name in SEARCH_FLAGS.items()]
    made = dataclasses.make_dataclass("_SearchSettings", fields, frozen=True)
    made.__module__ = __name__
    return made


_SearchSettings = _search_settings()


@dataclasses.dataclass(frozen=True)
class Settings(_SearchSettings):
    """How images are decoded and captioned; each field is the job's flag of that name.
    The search settings come first, one per DecodeConfig field (num_alternatives None:
    the model's, cut to the beam size)."""

    low_score_threshold: float | None = None  # None: the bundled model's calibrated threshold
    attention_maps: bool = False
    batch_size: int | None = None  # None: ~2 M pixels a batch at the model's input size
    max_image_pixels: int = 100_000_000
    max_file_bytes: int = 256 * 1024 * 1024
    draft: bool = True

    def __post_init__(self):
        for name in ("batch_size", "max_image_pixels", "max_file_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.decode_for(None)  # validates the search settings given

    def decode_for(self, model_decode: DecodeConfig | None) -> DecodeConfig:
        """The search settings: these over the model's defaults (None: DecodeConfig's)."""
        return (model_decode or DecodeConfig()).with_flags(self)

    def image_config(self, size: int) -> decoding.ImageConfig:
        return decoding.ImageConfig(image_size=size, max_image_pixels=self.max_image_pixels, draft=self.draft)

    def batch(self, size: int) -> int:
        return self.batch_size or default_batch_size(size)


def _bundle_path(model: str | None) -> str:
    """A bundled model's name or a bundle path (None: the default model) -> the bundle's path."""
    try:
        return bundled.resolve(model or bundled.DEFAULT_MODEL_NAME)
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def _threshold(s: Settings, model_id: str) -> float:
    """The low_score threshold: the one given, else the bundle's calibrated one."""
    return s.low_score_threshold if s.low_score_threshold is not None else bundled.low_score_threshold(model_id)


def _verified(model: str | None) -> tuple[str, int, DecodeConfig | None]:
    """(bundle id, input side in pixels, search defaults) of the bundle at `model`, read
    and checked without TensorFlow."""
    from batch_caption.model import bundle

    gcs.configure_for_emulator()
    path = _bundle_path(model)
    manifest, config, decode = bundle.verify_bundle_with_defaults(path)
    return manifest["bundle_id"], config.image_size, decode


def image_size(model: str | None = None) -> int:
    """The input side, in pixels, of the bundle at `model` (None: the bundled model);
    reads and checks the bundle without TensorFlow."""
    return _verified(model)[1]


def decode_example(data: bytes, size: int, path: str | None = None, settings: Settings = Settings()) -> ImageExample:
    """An image file's bytes -> the ImageExample that the model handler takes, squashed
    to `size` (image_size()). Raises decoding.ImageDecodeError for bytes that are no image."""
    decoded = decoding.decode_image(data, settings.image_config(size))
    return ImageExample(path, decoded.pixels, decoded.width, decoded.height, decoded.format,
                        hashlib.sha256(data).hexdigest(), len(data))


def model_handler(model: str | None = None, *, share_model: bool = False, **settings) -> CaptionModelHandler:
    """The job's RunInference handler for the bundle at `model` (None: the bundled model):
    ImageExamples in, PredictionResult(example, n-best model.captioner.Caption list,
    bundle id) out. The model loads once per worker process."""
    _, size, defaults = _verified(model)
    s = Settings(**settings)
    return _handler(model, size, s, s.decode_for(defaults), share_model)


def _handler(model: str | None, size: int, s: Settings, decode: DecodeConfig, share_model: bool) -> CaptionModelHandler:
    return CaptionModelHandler(bundled.portable(_bundle_path(model)), decode, s.batch(size), share_model,
                               s.attention_maps)


def load(model: str | None = None, *, run_id: str | None = None, **settings) -> Captioner:
    """Loads the bundle at `model` (a directory, local or gs://; None: the bundled model)
    into this process; `settings`: Settings' fields."""
    from batch_caption.model.captioner import Captioner as ModelCaptioner
    from batch_caption.model.load import load_bundle

    s = Settings(**settings)
    gcs.configure_for_emulator()
    b = load_bundle(_bundle_path(model))
    captioner = ModelCaptioner(b.model, b.vocabulary, s.decode_for(b.decode), b.bundle_id, s.attention_maps)
    return Captioner(captioner, s, run_id)


class Captioner:
    """A loaded model that captions in this process (see load()). `model` is the
    model.captioner.Captioner underneath: uint8 [B, S, S, 3] -> n-best captions."""

    def __init__(self, model, settings: Settings = Settings(), run_id: str | None = None):
        self.model = model
        self.settings = settings
        self.run_id = run_id
        self.image_config = settings.image_config(model.image_size)
        self.batch_size = settings.batch(model.image_size)
        self._low_score = _threshold(settings, self.model_id)  # once: it reads the bundled models' manifests

    @property
    def model_id(self) -> str:
        return self.model.get_model_id()

    def caption_paths(self, paths: Iterable[str]) -> list[dict[str, Any]]:
        """Image files (local or any Beam filesystem) -> one record each; files are read
        and decoded by a thread per CPU, one batch at a time."""
        out = []
        with concurrent.futures.ThreadPoolExecutor(max(2, available_cpus())) as pool:
            for chunk in _chunks(paths, self.batch_size):
                out += self._caption(list(pool.map(self._read_and_decode, chunk)))
        return out

    def caption_bytes(self, blobs: Iterable[bytes], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Image files' bytes -> one record each; `names` become the records' paths."""
        blobs = list(blobs)
        return self._caption([self._decode(data, _name(names, i, len(blobs))) for i, data in enumerate(blobs)])

    def caption_arrays(self, arrays: Iterable[np.ndarray], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """uint8 RGB [H, W, 3] (or grey [H, W]) arrays of any size -> one record each,
        squashed to the model's input as files are. A wrong dtype or shape raises."""
        size, arrays = self.model.image_size, [np.asarray(a) for a in arrays]
        return self._caption([
            ImageExample(_name(names, i, len(arrays)), decoding.resize_pixels(a, size), a.shape[1], a.shape[0],
                         None, None, None)
            for i, a in enumerate(arrays)])

    def _read_and_decode(self, path: str) -> ImageExample | dict[str, Any]:
        limit = self.settings.max_file_bytes
        try:
            data = bounded_reads.read_file(path, limit)
        except Exception as e:  # noqa: BLE001 - missing, permissions, network: the file's error record
            return records.error_record(path, "read", bounded_reads.root_cause(e), run_id=self.run_id)
        if len(data) > limit:
            return records.error_record(path, "read", *bounded_reads.too_large(limit), run_id=self.run_id)
        return self._decode(data, path)

    def _decode(self, data: bytes, path: str | None) -> ImageExample | dict[str, Any]:
        try:
            return decode_example(data, self.model.image_size, path, self.settings)
        except decoding.ImageDecodeError as e:
            return records.error_record(path, "decode", e, run_id=self.run_id, size=len(data),
                                        sha256=hashlib.sha256(data).hexdigest())

    def _caption(self, items: list) -> list[dict[str, Any]]:
        """ImageExamples (captioned a batch at a time) and error records -> records, in order."""
        examples = [i for i, item in enumerate(items) if isinstance(item, ImageExample)]
        decode = self.model.decode.to_dict()
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start:start + self.batch_size]
            captions = self.model.caption(np.stack([items[i].pixels for i in batch]))
            for i, caps in zip(batch, captions):
                example = items[i]
                try:
                    items[i] = records.caption_record(
                        example, caps, model_id=self.model_id, run_id=self.run_id, decode=decode,
                        low_score_threshold=self._low_score)
                except ValueError as e:  # no caption, or a non-finite score: the model's failure
                    items[i] = records.error_record(example.path, "infer", e, run_id=self.run_id,
                                                    size=example.size_bytes, sha256=example.sha256)
        return items


class CaptionPaths(beam.PTransform):
    """PCollection[str] of image paths (any Beam filesystem) -> {"captions": caption
    records, "errors": error records}: the job's ReadImages and CaptionImages stages
    (read and decode ahead, RunInference, dead letters), without its matching,
    deduplication and writing. `model`, `run_id`, `settings` as in load(); share_model:
    one model per machine for all worker processes."""

    def __init__(self, model: str | None = None, *, run_id: str | None = None, share_model: bool = False,
                 **settings):
        super().__init__()
        self._settings = Settings(**settings)
        self._run_id = run_id
        model_id, self._image_size, defaults = _verified(model)  # the bundle checked before the pipeline runs
        self._low_score = _threshold(self._settings, model_id)
        self._decode = self._settings.decode_for(defaults)
        self._handler = _handler(model, self._image_size, self._settings, self._decode, share_model)

    def expand(self, paths):
        s = self._settings
        read = paths | "ReadImages" >> ReadImages(
            s.image_config(self._image_size), s.max_file_bytes, self._run_id, dedupe=False,
            lookahead=s.batch(self._image_size), spread_hashing=False)
        captioned = read["images"] | "CaptionImages" >> CaptionImages(
            self._handler, self._decode, self._run_id, self._low_score)
        errors = (read[ERRORS], captioned[ERRORS]) | "FlattenErrors" >> beam.Flatten()
        return {"captions": captioned["captions"], ERRORS: errors}


def _chunks(items: Iterable, n: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _name(names: Sequence[str] | None, i: int, n: int) -> str | None:
    """The i-th of the n inputs' names (None when none were given)."""
    if names is None:
        return None
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} images")
    return names[i]
