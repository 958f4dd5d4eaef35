"""Reading steps: annotation files -> captions checked -> joined with their images.

    ReadCaptionSource     annotation files -> CaptionedImage(image_id, path, split, captions)
    CheckCaptions         drops captions with no token; an image left without one -> error
    (ReadImages, the captioning job's own read + decode + resize, runs between these)
    ComputeFeatures       features mode: RunInference(FeatureModelHandler) on the images
    JoinCaptionsToImages  each image (or its error) with the captions listed for its path

Every step returns its items and, under the tag ERRORS, error records that carry the
job's fields plus `split` (None for annotations that no split claims).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from batch_caption import records
from batch_caption.core.elements import ERRORS, NAMESPACE
from batch_caption.core.read import ReadImages
from batch_caption.data import scenes, sources
from batch_caption.data.sources import CaptionedImage, SourceProblem
from batch_caption.model import vocab as vocab_lib
from batch_caption.prepare.config import PrepareConfig
from batch_caption.storage import files, gcs

__all__ = ["ERRORS", "ReadImages", "CaptionedExample", "CheckCaptions", "ComputeFeatures", "JoinCaptionsToImages",
           "ReadCaptionSource", "counter", "describe_source", "make_synthetic", "source_tasks"]


def counter(name: str):
    """A Beam counter of the prepare job, in the captioning job's namespace."""
    return Metrics.counter(NAMESPACE, name)


# --- the source ------------------------------------------------------------------------


def make_synthetic(config: PrepareConfig) -> dict[str, Any]:
    """Renders the synthetic scenes (COCO layout) into OUTPUT/source/, at --image_size."""
    counts = dict(config.synthetic_counts)
    summary = scenes.write_dataset(config.synthetic_dir, counts, config.seed,
                                   scenes.SceneConfig(image_size=config.image_size))
    return {"dir": config.synthetic_dir, "seed": config.seed, "counts": counts,
            "held_out_pairs": summary["held_out_pairs"]}


def describe_source(config: PrepareConfig) -> dict[str, Any]:
    """What dataset.json["source"] says about where the data came from."""
    source: dict[str, Any] = {"name": config.source}
    if config.source == "coco":
        source.update(image_root=config.image_root, files=dict(config.splits))
    elif config.source == "karpathy":
        source.update(image_root=config.image_root, captions=config.captions, restval=config.restval)
    elif config.source == "flickr8k":
        source.update(image_root=config.image_root, captions=config.captions, image_lists=config.flickr8k_lists())
    return source


def source_tasks(config: PrepareConfig) -> list:
    """The annotation files to read, as zero-argument reader calls (one per worker task)."""
    wanted = config.split_names
    if config.source in ("coco", "synthetic"):
        if config.source == "synthetic":
            root = config.synthetic_dir
            annotations = [(n, files.join(root, f"captions_{n}.json")) for n in wanted]
        else:
            root, annotations = config.image_root, list(config.splits)
        return [functools.partial(sources.read_coco, path, name, root) for name, path in annotations]
    if config.source == "karpathy":
        return [functools.partial(sources.read_karpathy, config.captions, config.image_root, wanted, config.restval)]
    return [functools.partial(sources.read_flickr8k, config.captions, config.flickr8k_lists(), config.image_root, wanted)]


# --- what the steps pass on ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionedExample:
    """An image joined with its usable captions.

    payload: uint8 [S, S, 3] pixels (mode "images") or float32 [F] features ("features").
    """

    item: CaptionedImage
    payload: np.ndarray


def _error(path: str, split: str | None, stage: str, error, message: str | None, run_id: str) -> dict[str, Any]:
    return {**records.error_record(path, stage, error, message, run_id=run_id), "split": split}


# --- ReadCaptionSource -----------------------------------------------------------------


class _ReadSourceFn(beam.DoFn):
    """task index -> CaptionedImage items of that annotation file | error records."""

    def __init__(self, tasks, run_id: str):
        self._tasks = tasks
        self._run_id = run_id

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, index: int):
        for item in self._tasks[index]():
            if isinstance(item, SourceProblem):
                counter("source_problems").inc()
                yield beam.pvalue.TaggedOutput(
                    ERRORS, _error(item.path, item.split, "caption", item.error, item.message, self._run_id)
                )
            else:
                counter("listed_images").inc()
                yield item


class ReadCaptionSource(beam.PTransform):
    """PBegin -> CaptionedImage items; tag 'errors' (stage caption: SourceProblems).

    Args:
      tasks: zero-argument callables, each reading one annotation file (`source_tasks`).
    """

    def __init__(self, tasks, run_id: str):
        super().__init__()
        self._tasks = list(tasks)
        self._run_id = run_id

    def expand(self, pbegin):
        # One worker reads each file; the images are spread across workers further on, by
        # the GroupByKey in DedupePaths, before any image is read.
        out = (
            pbegin
            | "CreateTasks" >> beam.Create(range(len(self._tasks)))
            | "ReadAnnotations" >> beam.ParDo(_ReadSourceFn(self._tasks, self._run_id)).with_outputs(ERRORS, main="items")
        )
        return {"items": out.items, ERRORS: out[ERRORS]}


# --- CheckCaptions ---------------------------------------------------------------------


class _CheckCaptionsFn(beam.DoFn):
    """CaptionedImage -> the same with only captions that have a token | error records."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, item: CaptionedImage):
        valid = []
        for caption in item.captions:
            if vocab_lib.tokenize(caption):
                valid.append(caption)
            else:
                counter("rejected_captions").inc()
                yield beam.pvalue.TaggedOutput(ERRORS, _error(
                    item.path, item.split, "caption", "EmptyCaption", f"caption {caption!r} has no word", self._run_id))
        if valid:
            yield dataclasses.replace(item, captions=tuple(valid))
            return
        counter("images_without_caption").inc()
        if item.captions:
            error, message = "NoValidCaption", f"none of the image's {len(item.captions)} captions has a word"
        else:
            error, message = "NoCaption", "the annotations give this image no caption"
        yield beam.pvalue.TaggedOutput(ERRORS, _error(item.path, item.split, "caption", error, message, self._run_id))


class CheckCaptions(beam.PTransform):
    """PCollection[CaptionedImage] -> images with >= 1 usable caption; tag 'errors'."""

    def __init__(self, run_id: str):
        super().__init__()
        self._run_id = run_id

    def expand(self, items):
        out = items | "DropEmptyCaptions" >> beam.ParDo(_CheckCaptionsFn(self._run_id)).with_outputs(ERRORS, main="items")
        return {"items": out.items, ERRORS: out[ERRORS]}


# --- ComputeFeatures -------------------------------------------------------------------


class _ToFeaturesFn(beam.DoFn):
    """PredictionResult(ImageExample, float32 [F]) -> (path, features) | infer error."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, result):
        features = np.asarray(result.inference, np.float32)
        if not np.all(np.isfinite(features)):
            yield beam.pvalue.TaggedOutput(ERRORS, records.error_record(
                result.example.path, "infer", "NonFiniteFeatures", "the encoder returned NaN or inf", run_id=self._run_id))
            return
        yield result.example.path, features


class ComputeFeatures(beam.PTransform):
    """PCollection[ImageExample] -> (path, float32 [F]) with RunInference; tag 'errors'.

    `handler` is a core.inference.FeatureModelHandler: the batching, process sharing
    and backbone code of the captioning job.
    """

    def __init__(self, handler, run_id: str):
        super().__init__()
        self._handler = handler
        self._run_id = run_id

    def expand(self, examples):
        from apache_beam.ml.inference.base import RunInference

        from batch_caption.core.dead_letters import FailedBatchToErrorsFn

        predictions, dead = examples | "RunInference" >> RunInference(self._handler).with_exception_handling()
        out = predictions | "ToFeatures" >> beam.ParDo(_ToFeaturesFn(self._run_id)).with_outputs(ERRORS, main="features")
        failed = dead.failed_inferences | "FailedBatchesToErrors" >> beam.ParDo(FailedBatchToErrorsFn(self._run_id))
        errors = (out[ERRORS], failed) | "FlattenInferErrors" >> beam.Flatten()
        return {"features": out.features, ERRORS: errors}


# --- JoinCaptionsToImages --------------------------------------------------------------


class _AttachCaptionsFn(beam.DoFn):
    """(path, payload) -> a CaptionedExample per item of that path.

    A path listed in several splits was read once; each split gets its own copy of
    the outcome, so every split's counts add up.
    """

    def process(self, element, items_by_path):
        path, payload = element
        for item in items_by_path[path]:
            yield CaptionedExample(item, payload)


class _AttachSplitsFn(beam.DoFn):
    """An image's error record -> a copy per item of its path, each with its item's split."""

    def process(self, record, items_by_path):
        for item in items_by_path[record["path"]]:
            yield {**record, "split": item.split}


class JoinCaptionsToImages(beam.PTransform):
    """{"items": CaptionedImage, "payloads": (path, array), "errors": error records of
    images} -> {"examples": CaptionedExample per item, "errors": image errors, each with
    its item's split}.

    The items are a side input looked up by path (AsMultiMap, fetched per key), and the
    payloads meet nothing else on their way: no shuffle and no Flatten, either of which
    would end the fused stage that decoded them. Between stages the multi-processing
    DirectRunner streams a worker its whole share of a PCollection before it starts the
    bundle, into a receive queue of a few messages: pixels of a large dataset fill it and
    the runner waits for a bundle that never starts. The TFRecord writer with a fixed
    `--num_shards` groups its records, pixels included; the default (0) does not.
    """

    def expand(self, inputs):
        items = beam.pvalue.AsMultiMap(inputs["items"] | "KeyItemsByPath" >> beam.Map(lambda i: (i.path, i)))
        examples = inputs["payloads"] | "PairCaptionsWithImages" >> beam.ParDo(_AttachCaptionsFn(), items)
        errors = inputs[ERRORS] | "AttachSplitsToImageErrors" >> beam.ParDo(_AttachSplitsFn(), items)
        return {"examples": examples, ERRORS: errors}
