"""The Captioner's graph compiled to LiteRT, and run without importing TensorFlow.

    load_lite_captioner(bundle_dir, decode)   a LiteCaptioner, from the compile cache
    compile_captioner(captioner)               the .tflite bytes of a TF Captioner's graph
    LiteCaptioner                              uint8 [B, S, S, 3] -> n-best Captions, a batch
                                               split over interpreters run side by side

The TF `Captioner` runs encoder and beam search in one `tf.function`; LiteRT's converter
turns that whole graph (the while loop included, builtin ops only) into one flatbuffer,
which `ai_edge_litert`'s interpreter runs with XNNPACK. A job process then never imports
TensorFlow or traces a graph: the model is ready in milliseconds instead of seconds.
Tokens are the same as TensorFlow's; log-probabilities differ in float rounding only.

The search settings are part of the graph, so a compiled file is for one bundle id and
one DecodeConfig. Files are cached under `$BATCH_CAPTION_CACHE` (default
`~/.cache/batch_caption`)/litert/, keyed by both, by the digest of the model package's
sources and by the converter's and runtime's versions. On a miss the bundle is loaded with
TensorFlow once, compiled, checked against TensorFlow's own output on a test batch, and
written (atomically); a graph the converter rejects, or whose check fails, raises
`CompileError` and the caller keeps TensorFlow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import NamedTuple

import numpy as np

from batch_caption.core.cpus import available_cpus
from batch_caption.model.bundle import read_bundle_metadata
from batch_caption.model.captions import Caption, to_captions
from batch_caption.model.config import DecodeConfig
from batch_caption.model.vocab import Vocabulary

CACHE_ENV = "BATCH_CAPTION_CACHE"
_FORMAT = 1  # bump when the compiled graph's inputs or outputs change


class CompileError(RuntimeError):
    """The graph did not convert to LiteRT builtin ops, or its output differs from TF's."""


class LiteResult(NamedTuple):
    """beam_search.BeamSearchResult's fields, as numpy: tokens int32 [B, n, T], lengths
    int32 [B, n], logprobs and scores float32 [B, n]."""

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    scores: np.ndarray


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "batch_caption")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


@functools.cache  # once per process
def graph_code_digest() -> str:
    """sha256 of this package's sources (model/*.py): the code that builds the graph, so
    that a compiled file never outlives a change to the network or the search."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
        with open(os.path.join(here, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def compiled_path(bundle_id: str, decode: DecodeConfig) -> str:
    """Where the compiled graph of (bundle_id, decode) is cached: keyed by both, by the
    code that builds the graph and by the converter's and runtime's versions."""
    key = json.dumps({"bundle": bundle_id, "decode": decode.to_dict(), "format": _FORMAT, "code": graph_code_digest(),
                      "tensorflow": _version("tensorflow"), "litert": _version("ai-edge-litert")}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "litert", f"{bundle_id}-{digest}.tflite")


def compile_captioner(captioner) -> bytes:
    """A TF `Captioner`'s graph (no attention maps) -> .tflite bytes. Raises CompileError."""
    import tensorflow as tf

    if captioner.attention_maps:
        raise CompileError("the compiled graph has no attention maps")
    function = captioner._search.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], captioner.model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no TF kernels: no TF at run time
    try:
        return converter.convert()
    except Exception as e:  # the converter raises its own ConverterError, and others
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(f"LiteRT cannot convert the graph: {first}") from e


def check_against(lite: LiteCaptioner, captioner, batch: int = 2) -> None:
    """Raises CompileError unless `lite` finds TF's tokens on a seeded test batch, with
    scores within 1e-3."""
    s = captioner.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
    want, got = captioner.search(images), lite.search(images)
    if not np.array_equal(want.tokens, got.tokens) or not np.array_equal(want.lengths, got.lengths):
        raise CompileError("the compiled graph's captions differ from TensorFlow's")
    finite = np.isfinite(want.scores)
    if not np.array_equal(finite, np.isfinite(got.scores)) or not np.allclose(
            want.scores[finite], got.scores[finite], atol=1e-3):
        raise CompileError("the compiled graph's scores differ from TensorFlow's")


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:  # no wheel for this platform
        raise CompileError(f"LiteRT is not installed ({e})") from e
    return Interpreter


def load_lite_captioner(bundle_dir: str, decode: DecodeConfig, log=None) -> LiteCaptioner:
    """The LiteCaptioner of the bundle at `bundle_dir` with `decode`, compiled on a cache
    miss (which loads TensorFlow once). Raises CompileError (the caller keeps TF) and
    BundleError. `log(message)` hears about a compile."""
    _interpreter_class()  # before any compile
    meta = read_bundle_metadata(bundle_dir)
    path = compiled_path(meta.bundle_id, decode)
    if os.path.exists(path):
        return LiteCaptioner(path, meta.vocabulary, meta.bundle_id, meta.config.image_size)
    from batch_caption.model.load import load_captioner

    captioner = load_captioner(bundle_dir, decode)
    data = compile_captioner(captioner)
    lite = LiteCaptioner(data, meta.vocabulary, meta.bundle_id, meta.config.image_size)
    check_against(lite, captioner)
    try:
        _write_atomic(path, data)
        where = f"cached at {path}"
    except OSError as e:  # a read-only home: this process runs it from memory
        where = f"not cached ({e})"
    if log:
        log(f"compiled model {meta.bundle_id} for LiteRT ({len(data) / 2**20:.1f} MiB), {where}")
    return lite


# Rows a replica gets at least: a batch is split only where each part keeps this many.
_MIN_ROWS = 8
# At most this many replicas: each holds its own packed weights and tensor arena.
_MAX_REPLICAS = 4


def default_replicas(cpus: int) -> int:
    """Interpreters a LiteCaptioner runs side by side on `cpus` CPUs: one a CPU, up to
    _MAX_REPLICAS (the CPUs are then shared out as threads)."""
    return max(1, min(cpus, _MAX_REPLICAS))


class _Replica:
    """One interpreter and the batch size its tensors are allocated for."""

    def __init__(self, interpreter):
        self.interpreter = interpreter
        self.input = interpreter.get_input_details()[0]["index"]
        # Outputs in the graph's flattened order (tokens, lengths, logprobs, scores): the
        # converter names them Identity, Identity_1, ...
        outputs = interpreter.get_output_details()
        order = sorted(outputs, key=lambda d: int(d["name"].rpartition("_")[2]) if "_" in d["name"] else 0)
        self.outputs = [d["index"] for d in order]
        self.batch = None
        self.lock = threading.Lock()  # one invoke at a time per interpreter

    def search(self, images: np.ndarray) -> LiteResult:
        it = self.interpreter
        with self.lock:
            if images.shape[0] != self.batch:
                it.resize_tensor_input(self.input, images.shape)
                it.allocate_tensors()
                self.batch = images.shape[0]
            it.set_tensor(self.input, np.ascontiguousarray(images))
            it.invoke()  # releases the GIL: replicas run in parallel
            return LiteResult(*(it.get_tensor(i).copy() for i in self.outputs))


class LiteCaptioner:
    """Captions batches with a compiled graph: the TF Captioner's `caption`, `search`,
    `image_size`, `get_model_id` and `warm_up`, without attention maps.

    A batch is split into contiguous parts that run at once on separate interpreters
    (replicas) of few threads each, rather than on one interpreter with every thread: the
    beam search's steps are small matrix products over [B * k] rows that spread badly
    over threads, and an interpreter of one thread never spins waiting for its others
    while the job's decode threads want the CPU. Each image's captions are the same
    whichever part it falls in: rows do not interact.

    Args:
      model: the .tflite file's path or bytes.
      vocabulary, model_id, image_size: the bundle's.
      num_threads: the CPUs to use, across replicas (default: the CPUs this process may
        use, core.cpus.available_cpus).
      replicas: interpreters side by side (default: default_replicas(num_threads)); each
        gets num_threads // replicas threads.
    """

    attention_maps = False

    def __init__(self, model: str | bytes, vocabulary: Vocabulary, model_id: str, image_size: int,
                 num_threads: int | None = None, replicas: int | None = None):
        Interpreter = _interpreter_class()
        source = {"model_path": model} if isinstance(model, str) else {"model_content": model}
        cpus = num_threads or available_cpus()
        count = replicas or default_replicas(cpus)
        threads = max(1, cpus // count)
        self._replicas = [_Replica(Interpreter(**source, num_threads=threads)) for _ in range(count)]
        self._pool = ThreadPoolExecutor(count - 1, thread_name_prefix="litert") if count > 1 else None
        self.vocabulary, self.model_id, self._size = vocabulary, model_id, image_size

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def replicas(self) -> int:
        return len(self._replicas)

    def get_model_id(self) -> str:
        return self.model_id

    def warm_up(self) -> None:
        """Runs one blank image on every replica inside the load, so that an interpreter's
        first invoke (XNNPACK packs the weights then) is not paid by the first batch."""
        blank = np.zeros([1, self._size, self._size, 3], np.uint8)
        self._run([(r, blank) for r in self._replicas])

    def _run(self, parts: list[tuple[_Replica, np.ndarray]]) -> list[LiteResult]:
        """Runs each (replica, images) part, the first in this thread, the rest in the pool."""
        futures = [self._pool.submit(r.search, x) for r, x in parts[1:]]
        first = parts[0][0].search(parts[0][1])
        return [first] + [f.result() for f in futures]

    def search(self, images: np.ndarray) -> LiteResult:
        """uint8 [B, S, S, 3] -> LiteResult (arrays [B, ...])."""
        images = np.asarray(images)
        s = self._size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 images [B, {s}, {s}, 3], got {images.dtype} {images.shape}")
        count = min(len(self._replicas), max(1, images.shape[0] // _MIN_ROWS))
        if count == 1:
            return self._replicas[0].search(images)
        results = self._run(list(zip(self._replicas, np.array_split(images, count))))
        return LiteResult(*(np.concatenate(field) for field in zip(*results)))

    def caption(self, images: np.ndarray) -> list[list[Caption]]:
        """uint8 [B, S, S, 3] -> for each image its n-best captions, best first."""
        return to_captions(self.search(images), self.vocabulary, grid=(1, 1))  # no maps: the grid is unused
