"""The captioning job, stage by stage (one module each, in data-flow order):

    patterns / list files
      -> MatchImages      (match.py)    SourceFile per distinct image path (image_files.py)
      -> SelectChanged    (select.py)   --incremental: join with the earlier catalog; skip
                                        unchanged files unread, count deleted ones
      -> ReadImages       (core/read.py) ImageExample (decoded, resized) | error | skip
      -> CaptionImages    (caption.py)  RunInference -> caption record | error record
      -> WriteRun         (write.py)    every sink (sinks.py): captions-*.jsonl, errors-*.jsonl,
                                        catalog-*.parquet (this run's rows + carried ones),
                                        any other; manifest.json last

Every matched path leaves as exactly one caption record, error record or skip: each DoFn
either yields its output or yields an error record, and inference failures come back
from RunInference's dead-letter output per element. Every skip carries its earlier
catalog row forward, so the catalog has one row per live path.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import apache_beam as beam

from batch_caption import bundled, catalog
from batch_caption.core import inference
from batch_caption.core.elements import ERRORS, NAMESPACE, ImageExample, SourceFile
from batch_caption.core.read import ReadImages
from batch_caption.images import decoding
from batch_caption.pipeline.caption import CaptionImages
from batch_caption.pipeline.config import JobConfig, default_batch_size
from batch_caption.pipeline.match import MatchImages
from batch_caption.pipeline.select import SelectChanged, Settings
from batch_caption.pipeline.sinks import Shards, Sink
from batch_caption.pipeline.tallies import count, each
from batch_caption.pipeline.write import RunInfo, WriteRun

__all__ = [
    "ERRORS", "NAMESPACE", "CaptionImages", "ImageExample", "JobConfig", "MatchImages", "ReadImages", "RunInfo",
    "SelectChanged", "Shards", "Sink", "SourceFile", "WriteRun", "build_pipeline", "timed_phases",
]


def timed_phases() -> list[tuple[type, str, str]]:
    """(class, method, label) of the job's phases in data-flow order: the methods a
    profiler wraps to draw a run's timeline (bench/profile_job.py), each called once per
    element, batch or bundle of its phase."""
    from batch_caption.core import read
    from batch_caption.pipeline import match, shards, write

    return [
        (match._MatchPatternFn, "process", "match"),
        (read.HashFileFn, "_work", "hash (dedupe, pool threads)"),
        (inference.CaptionModelHandler, "load_now", "model load + trace (its thread)"),
        (read.ReadDecodeFn, "_work", "read + decode (pool threads)"),
        (inference.CaptionModelHandler, "run_inference", "model, per batch"),
        (shards.WriteShardFn, "finish_bundle", "shards closed"),
        (write._WriteManifestFn, "process", "manifest"),
    ]


def build_pipeline(pipeline, config: JobConfig, model_id: str, image_size: int, single_process: bool,
                   baseline=None, sinks: Sequence[Sink] = (), report_progress: bool | None = None):
    """Adds the whole job to `pipeline`; returns the manifest PCollection.

    single_process: the runner runs everything in this process (the in-memory
      DirectRunner): no work needs spreading.
    baseline: with --incremental, what to compare with (runs.Baseline).
    sinks: outputs besides the run's own shards and catalog (sinks.py).
    report_progress: the stages count for the progress line (progress.reporter());
      default: single_process. Also where worker processes send the driver their counts
      (the multi-processing DirectRunner, progress.py).
    """
    if report_progress is None:
        report_progress = single_process
    if config.batch_size is None:
        config = dataclasses.replace(config, batch_size=default_batch_size(image_size))
    if config.low_score_threshold is None:
        config = dataclasses.replace(config, low_score_threshold=bundled.low_score_threshold(model_id))
    decode = config.decode
    info = RunInfo(
        run_id=config.run_id,
        run_dir=config.run_dir,
        model=model_id,
        model_path=config.model,
        options=config.options(),
        start_time=time.time(),
        decode=decode.to_dict(),
        previous_runs=baseline.run_ids if baseline else (),
        previous_catalog=baseline.catalog_files if baseline else (),
        max_failed_fraction=config.max_failed_fraction,
    )
    image_config = decoding.ImageConfig(image_size=image_size, max_image_pixels=config.max_image_pixels, draft=config.draft)
    handler = inference.CaptionModelHandler(
        bundled.portable(config.model), decode, config.batch_size, config.share_model, config.attention_maps,
        config.runtime)

    incremental = config.incremental and baseline is not None
    matched = pipeline | "MatchImages" >> MatchImages(
        config.inputs, config.input_lists, config.run_id, report_progress, dedupe_paths=not incremental,
        output=config.output, images=config.image_files, spread_pieces=not single_process)
    to_read, skipped, carry = matched["files"], [], []
    if incremental:
        settings = Settings(model_id, catalog.decode_key(decode.to_dict()), config.incremental_any_model)
        selected = to_read | "SelectChanged" >> SelectChanged(
            baseline.catalog_files, settings, config.retry_failed, baseline.legacy_caption_files, baseline.end_times,
            baseline.catalog_rows, report_progress, unlistable=matched["unlistable"], not_image=matched["not_image"])
        to_read, skipped, carry = selected["files"], [selected["skipped"]], [selected["carry"]]
        tallies = selected["tallies"]
    else:
        tallies = count(matched["files"], "TallyMatched", each("matched"))
    # Decoding runs a batch ahead of the model (positional: tests stand in for ReadImages).
    read = to_read | "ReadImages" >> ReadImages(
        image_config, config.max_file_bytes, config.run_id, config.dedupe, config.batch_size, config.read_threads,
        spread_hashing=not single_process,
    )
    captioned = read["images"] | "CaptionImages" >> CaptionImages(
        handler, decode, config.run_id, config.low_score_threshold)
    errors = (matched[ERRORS], read[ERRORS], captioned[ERRORS]) | "FlattenErrors" >> beam.Flatten()
    outputs = {
        "captions": captioned["captions"],
        ERRORS: errors,
        "skipped": tuple(skipped) + (read["skipped"],) | "FlattenSkipped" >> beam.Flatten(),
        "carry": tuple(carry) | "FlattenCarry" >> beam.Flatten(pipeline=pipeline),
        "read": read["read"],
        "links_skipped": matched["links_skipped"],
        "not_image": matched["not_image"],
        "tallies": tallies,
    }
    return outputs | "WriteRun" >> WriteRun(info, report_progress, sinks)
