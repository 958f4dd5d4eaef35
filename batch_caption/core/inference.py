"""RunInference model handlers: decoded images in, captions (or CNN features) out.

Beam's built-in TensorFlow handlers cannot load Keras 3 models, so the project has its
own. Both handlers share batching, process sharing and byte accounting; they differ in
what they load (a caption bundle, or just a CNN backbone for dataset preparation) and
what one batch computes. The model is loaded in `load_model` on the worker, once per
process (Beam's `Shared` handle), never pickled with the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

import batch_caption
from batch_caption import bundled
from batch_caption.core.elements import ImageExample
from batch_caption.core.model_loading import (
    BackgroundLoad,
    gc_frozen_after_first_load,
    quiet_beam_memory_warning,
)
from batch_caption.model.config import RUNTIMES, DecodeConfig, ModelConfig
from batch_caption.storage import gcs

# Beam warns before load_model runs, so the filter goes in at import: every process that
# unpickles a handler (workers, the --share_model server) imports this module first.
quiet_beam_memory_warning()
_log = logging.getLogger(__name__)


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


class CaptionModelHandler(_ImageBatchHandler):
    """Loads a model bundle and captions batches: PredictionResult(example, n-best).

    Args:
      model_path: bundle directory (local or any FileSystems path), or a bundled model's marker
        ("bundled:<name>", resolved on the worker: batch_caption.bundled).
      decode: beam search settings.
      attention_maps: return the best captions' attention maps (attention decoder only).
      runtime: "litert" runs the graph compiled by `model.lite` (TensorFlow for attention
        maps, or when the graph does not compile); "tensorflow" always runs TensorFlow.

    The load runs in the background (`BackgroundLoad`); the first batch of each DoFn
    instance waits for it and reports `model_load_ms` (the load's own time, once per
    load), `model_wait_ms` (how long that batch waited) and `first_caption_ms` (from the
    process's import of the package to that batch's captions) in the job's metrics.
    """

    def __init__(self, model_path: str, decode: DecodeConfig, batch_size: int = 32, share_across_processes: bool = False,
                 attention_maps: bool = False, runtime: str = "tensorflow"):
        super().__init__(batch_size, share_across_processes)
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self._model_path = model_path
        self._decode = decode
        self._attention_maps = attention_maps
        self._runtime = runtime
        self._load_seen = False  # per DoFn instance: each worker unpickles its own handler
        self._first_reported = False

    def load_model(self) -> BackgroundLoad:
        return BackgroundLoad(self.load_now)

    def load_now(self):
        """Loads the captioner in the calling thread: the compiled graph, or TensorFlow's, traced."""
        gcs.configure_for_emulator()
        path = bundled.resolve(self._model_path)
        if self._runtime == "litert" and not self._attention_maps:
            from batch_caption.model import lite

            try:
                with gc_frozen_after_first_load():
                    captioner = lite.load_lite_captioner(path, self._decode, log=_log.info)
                    captioner.warm_up()
                return captioner
            except lite.CompileError as e:
                _log.warning("model %s runs on TensorFlow: %s", path, e)
        from batch_caption.model.load import load_captioner

        with gc_frozen_after_first_load():
            captioner = load_captioner(path, self._decode, self._attention_maps)
            # Traced inside the one-time load, not in the first batch.
            captioner.warm_up()
        return captioner

    def run_inference(self, batch: Sequence[ImageExample], model,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        if not self._load_seen:
            self._report_load(model)
        # Only methods: with --share_model, `model` is a proxy to another process.
        captions = model.caption(self._stack(batch))
        if not self._first_reported:
            Metrics.distribution(self.get_metrics_namespace(), "first_caption_ms").update(
                round((time.time() - batch_caption.IMPORTED_AT) * 1000))
            self._first_reported = True
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

    def run_inference(self, batch: Sequence[ImageExample], model,
                      inference_args: dict | None = None) -> Iterable[PredictionResult]:
        features = model.fn(self._stack(batch)).numpy()
        return [PredictionResult(e, f, self._config.encoder) for e, f in zip(batch, features)]

    def get_metrics_namespace(self) -> str:
        return "batch_caption"


@dataclasses.dataclass(eq=False)
class _FeatureFunction:
    """Holds the traced function and its backbone (a weak-referenceable object)."""

    fn: Any
    backbone: Any
