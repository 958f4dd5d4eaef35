"""RunInference model handlers: decoded images in, captions (or CNN features) out.

Beam's built-in TensorFlow handlers cannot load Keras 3 models, so the project has its
own. Both handlers share batching, process sharing and byte accounting; they differ in
what they load (a caption bundle, or just a CNN backbone for dataset preparation) and
what one batch computes. The model is loaded in `load_model` on the worker, once per
process (Beam's `Shared` handle), never pickled with the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from batch_caption import gcs
from batch_caption.model.config import DecodeConfig, ModelConfig


@dataclasses.dataclass(frozen=True, eq=False)
class ImageExample:
    """One decoded input image on its way to the model.

    pixels: uint8 [S, S, 3], squashed to the model's input size.
    width, height: original size as displayed (after EXIF orientation).
    sources: every input file holding these exact bytes (pipeline.SourceFile: path,
      size, modified); empty means just `path`. Each gets its own record.
    """

    path: str
    pixels: np.ndarray
    width: int
    height: int
    format: str
    sha256: str
    size_bytes: int
    sources: tuple = ()

    def source_paths(self) -> list[tuple[str, float | None]]:
        """(path, modification time or None) of every file with these bytes."""
        return [(s.path, s.modified) for s in self.sources] or [(self.path, None)]


class _DropBeamResourceWarning(logging.Filter):
    """Beam 2.77 disables its memory probe when torch is absent (model_manager imports
    torch in the same try block as `resource`) and then warns on every model load."""

    def filter(self, record):
        return "Resource module is not available" not in record.getMessage()


_RESOURCE_FILTER = _DropBeamResourceWarning()


def _quiet_beam_memory_warning():
    root = logging.getLogger()
    if _RESOURCE_FILTER not in root.filters:
        root.addFilter(_RESOURCE_FILTER)


# Beam warns before load_model runs, so the filter goes in at import: every process that
# unpickles a handler (workers, the --share_model server) imports this module first.
_quiet_beam_memory_warning()


class _ImageBatchHandler(ModelHandler[ImageExample, PredictionResult, Any]):
    """Batching and sharing shared by the handlers below."""

    def __init__(self, batch_size: int, share_across_processes: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__()
        self._batch_size = batch_size
        self._share = share_across_processes

    def batch_elements_kwargs(self):
        # Full batches whenever the input allows: the graph has one signature, and
        # small batches waste the CNN's parallelism.
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._share

    def get_num_bytes(self, batch: Sequence[ImageExample]) -> int:
        # The default pickles the whole batch just to measure it.
        return sum(e.pixels.nbytes for e in batch)

    @staticmethod
    def _stack(batch: Sequence[ImageExample]) -> np.ndarray:
        return np.stack([e.pixels for e in batch])


_gc_lock = threading.Lock()
_gc_frozen = False  # set by the first load that ends well, under _gc_lock


@contextlib.contextmanager
def gc_frozen_after_first_load():
    """The process's first model load, without cyclic garbage collections, then gc.freeze().

    That load imports TensorFlow and builds and traces the model: ~0.5 M objects that live
    as long as the process. Each full collection walks all of them (~0.3 s here), and the
    first run of a process made 6-7 of them; frozen, they are left out of every later
    collection. No gc.collect() first (it would cost one of those ~0.3 s passes): what is
    garbage in cycles at that moment, and what then lives in cycles (the current run's
    pipeline objects, including those made while the load ran beside them: the GC is
    off for the whole process meanwhile), stays allocated, once per process. Later
    loads, and loads that start while the first is running, change nothing; a failed
    first load freezes nothing.
    """
    global _gc_frozen
    with _gc_lock:
        first = not _gc_frozen
        _gc_frozen = True  # claimed: concurrent loads leave the GC alone
    if not first:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        with _gc_lock:
            _gc_frozen = False  # a later load may try again
        raise
    else:
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


# Stands for the package's bundled model: the driver's absolute path to it means nothing
# on a Dataflow worker, where the package is installed elsewhere.
BUNDLED_MODEL = "bundled:default_model"


def resolve_model_path(path: str) -> str:
    """BUNDLED_MODEL -> this installation's default_model directory; other paths as given."""
    if path == BUNDLED_MODEL:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
    return path


class ModelLoadError(RuntimeError):
    """The model failed to load: the run fails; no image is blamed for it."""


class _LoadAttempt:
    """One run of a BackgroundLoad's load function."""

    def __init__(self):
        self.done = threading.Event()
        self.model: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.raised = False  # its failure has reached a caller

    def failed_and_raised(self) -> bool:
        return self.done.is_set() and self.model is None and self.raised


class BackgroundLoad:
    """A model loading in a thread of its own; `caption` and `get_model_id` wait for it.

    RunInference loads its model in its DoFn's setup, and the in-memory runner sets up
    every DoFn of a fused stage before the first element: reading and decoding would wait
    for the whole load (~1 s for the bundled model, mostly Python: building and tracing,
    so one of this machine's 2 cores idles). Returned from `load_model` at once, this
    lets the decode threads fill the first batches while the model is built and traced.

    A failed load raises ModelLoadError from the methods that wait;
    `pipeline.FailedBatchToErrorsFn` lets that error fail the bundle instead of turning
    the batch into error records. Beam's `Shared` keeps handing this object to the
    process's later DoFn instances, such as a retried bundle's, so once a failure has
    been raised the next wait loads again (up to MAX_ATTEMPTS loads): a transient error
    (a storage hiccup reading the weights) does not stick for the life of the worker.
    Only methods cross a --share_model proxy.
    """

    MAX_ATTEMPTS = 3

    def __init__(self, load: Callable[[], Any]):
        self._load_fn = load
        self._lock = threading.Lock()
        self._attempts = 0
        self._reported = False
        self._attempt = self._start()

    def _start(self) -> _LoadAttempt:
        attempt = _LoadAttempt()
        self._attempts += 1
        # Not a daemon: a process that ends mid-load waits for it, as it did when the
        # load ran in setup (TensorFlow stopped mid-trace can crash at exit).
        threading.Thread(target=self._run, args=(attempt,), name="batch_caption-model-load").start()
        return attempt

    def _run(self, attempt: _LoadAttempt) -> None:
        start = time.perf_counter()
        try:
            attempt.model = self._load_fn()
        except BaseException as e:  # raised again, by whoever waits
            attempt.error = e
        finally:
            attempt.seconds = time.perf_counter() - start
            attempt.done.set()

    def _wait(self) -> _LoadAttempt:
        with self._lock:
            attempt = self._attempt
            if attempt.failed_and_raised() and self._attempts < self.MAX_ATTEMPTS:
                attempt = self._attempt = self._start()
        attempt.done.wait()
        if attempt.model is None:
            attempt.raised = True
            e = attempt.error
            reason = f"{type(e).__name__}: {e}" if e is not None else "the loading thread ended without a model"
            raise ModelLoadError(f"the model failed to load: {reason}") from e
        return attempt

    def result(self) -> Any:
        """The loaded model (in this process only: it does not pickle)."""
        return self._wait().model

    def wait_load(self) -> float | None:
        """Waits for the load; its seconds to the first caller, None to later ones."""
        attempt = self._wait()
        with self._lock:
            first, self._reported = not self._reported, True
        return attempt.seconds if first else None

    def caption(self, pixels):
        return self.result().caption(pixels)

    def get_model_id(self) -> str:
        return self.result().get_model_id()


class CaptionModelHandler(_ImageBatchHandler):
    """Loads a model bundle and captions batches: PredictionResult(example, n-best).

    Args:
      model_path: bundle directory (local or any FileSystems path), or BUNDLED_MODEL.
      decode: beam search settings.

    The load runs in the background (`BackgroundLoad`); the first batch of each DoFn
    instance waits for it and reports `model_load_ms` (the load's own time, once per
    load) and `model_wait_ms` (how long that batch waited) in the job's metrics.
    """

    def __init__(self, model_path: str, decode: DecodeConfig, batch_size: int = 32, share_across_processes: bool = False):
        super().__init__(batch_size, share_across_processes)
        self._model_path = model_path
        self._decode = decode
        self._load_seen = False  # per DoFn instance: each worker unpickles its own handler

    def load_model(self) -> BackgroundLoad:
        return BackgroundLoad(self.load_now)

    def load_now(self):
        """Loads and traces the captioner in the calling thread."""
        from batch_caption.model.bundle import load_captioner

        gcs.configure_for_emulator()
        with gc_frozen_after_first_load():
            captioner = load_captioner(resolve_model_path(self._model_path), self._decode)
            # Trace now, inside the one-time load, rather than in the first batch.
            captioner.warm_up()
        return captioner

    def run_inference(self, batch: Sequence[ImageExample], model, inference_args: dict | None = None) -> Iterable[PredictionResult]:
        if not self._load_seen:
            self._report_load(model)
        # Only methods: with --share_model, `model` is a proxy to another process.
        captions = model.caption(self._stack(batch))
        model_id = model.get_model_id()
        return [PredictionResult(e, c, model_id) for e, c in zip(batch, captions)]

    def _report_load(self, model) -> None:
        wait_load = getattr(model, "wait_load", None)  # absent on a stand-in model
        if wait_load is not None:
            start = time.perf_counter()
            seconds = wait_load()  # raises ModelLoadError for a failed load
            Metrics.distribution(self.get_metrics_namespace(), "model_wait_ms").update(
                round((time.perf_counter() - start) * 1000))
            if seconds is not None:
                Metrics.distribution(self.get_metrics_namespace(), "model_load_ms").update(round(seconds * 1000))
        self._load_seen = True

    def get_metrics_namespace(self) -> str:
        return "batch_caption"


class FeatureModelHandler(_ImageBatchHandler):
    """Builds a CNN backbone from a ModelConfig and returns pooled features.

    PredictionResult(example, float32 [F]); used by dataset preparation to run the
    encoder once over a dataset, with the same decode and batching as the job.
    """

    def __init__(self, config: ModelConfig, batch_size: int = 32, share_across_processes: bool = False):
        super().__init__(batch_size, share_across_processes)
        self._config = config

    def load_model(self):
        gcs.configure_for_emulator()
        with gc_frozen_after_first_load():
            import tensorflow as tf

            from batch_caption.model.encoder import build_backbone

            backbone = build_backbone(self._config)
        size = self._config.image_size
        return _FeatureFunction(
            tf.function(lambda x: backbone(x, training=False), input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)]),
            backbone,
        )

    def run_inference(self, batch: Sequence[ImageExample], model, inference_args: dict | None = None) -> Iterable[PredictionResult]:
        features = model.fn(self._stack(batch)).numpy()
        return [PredictionResult(e, f, self._config.encoder) for e, f in zip(batch, features)]

    def get_metrics_namespace(self) -> str:
        return "batch_caption"


@dataclasses.dataclass(eq=False)
class _FeatureFunction:
    """Holds the traced function and its backbone (a weak-referenceable object)."""

    fn: Any
    backbone: Any
