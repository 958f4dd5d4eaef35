"""`python -m batch_caption.prepare`: caption datasets -> a prepared training dataset.

    python -m batch_caption.prepare --source coco --split train=captions_train2014.json \\
        --split val=captions_val2014.json --image_root coco/ --output data/ [Beam options]

A Beam job whose output directory follows `batch_caption.data.tfrecord`. The flow,
one module a part (`build_pipeline` below wires it up):

    config  PrepareConfig from the command line; every input checked before any work
    read    annotation files (coco | karpathy | flickr8k | synthetic scenes)
              -> ReadCaptionSource -> CheckCaptions -> DedupePaths + ReadImages (the
              captioning job's own read + decode + resize) -> [ComputeFeatures]
              -> JoinCaptionsToImages
    write   BuildVocabulary (of the checked captions); -> EncodeRecords -> WriteSplit per split
              -> errors-*.jsonl, vocab.json, then dataset.json LAST

Nothing is dropped silently: every listed image ends as one record or one error record
(stage read | decode | infer | caption), every rejected caption or annotation as an error
record (stage caption); dataset.json counts both.

Exit codes: 0 the dataset was written (per-item errors are data); 2 bad flags or missing
input files (nothing was started, the output is untouched); 1 the pipeline failed.
"""

from __future__ import annotations

import time
from typing import Any

import apache_beam as beam

from batch_caption import cli, records
from batch_caption.data import tfrecord
from batch_caption.prepare.config import PrepareConfig, check_inputs, parse
from batch_caption.prepare.read import (
    ERRORS,
    CheckCaptions,
    ComputeFeatures,
    JoinCaptionsToImages,
    ReadCaptionSource,
    ReadImages,
    describe_source,
    make_synthetic,
    source_tasks,
)
from batch_caption.prepare.write import (
    BuildVocabulary,
    EncodedExample,
    EncodeRecords,
    WriteDatasetInfo,
    WriteSplit,
    clear_output,
    write_named,
)
from batch_caption.storage import files, gcs

__all__ = ["PrepareConfig", "build_pipeline", "check_inputs", "main", "parse", "run", "summary"]


def _split_index(encoded: EncodedExample, n: int, index: dict[str, int]) -> int:
    return index[encoded.split]


def build_pipeline(pipeline, config: PrepareConfig, source: dict[str, Any]):
    """Adds the whole job to `pipeline`; returns the PCollection of dataset.json's text."""
    from batch_caption.core.inference import FeatureModelHandler

    run_id, splits = config.run_id, config.split_names
    read_source = pipeline | "ReadCaptionSource" >> ReadCaptionSource(source_tasks(config), run_id)
    checked = read_source["items"] | "CheckCaptions" >> CheckCaptions(run_id)
    paths = (
        checked["items"]
        | "ToPaths" >> beam.Map(lambda i: i.path)
        # A path in several splits is read once (the join gives each split a copy). Being a
        # GroupByKey, this also spreads the reads across workers.
        | "DedupePaths" >> beam.Distinct()
    )
    read = paths | "ReadImages" >> ReadImages(config.image_config, config.max_file_bytes, run_id)
    if config.precompute_features:
        handler = FeatureModelHandler(config.model_config, config.batch_size)
        computed = read["images"] | "ComputeFeatures" >> ComputeFeatures(handler, run_id)
        payloads = computed["features"]
        image_errors = (read[ERRORS], computed[ERRORS]) | "FlattenImageErrors" >> beam.Flatten()
    else:
        payloads = read["images"] | "KeyPixelsByPath" >> beam.Map(lambda e: (e.path, e.pixels))
        image_errors = read[ERRORS]
    joined = {"items": checked["items"], "payloads": payloads, ERRORS: image_errors} | (
        "JoinCaptionsToImages" >> JoinCaptionsToImages())
    examples = joined["examples"]
    vocabulary = checked["items"] | "BuildVocabulary" >> BuildVocabulary(config.vocab_split, config.min_word_count)
    vocab_file = vocabulary | "WriteVocabulary" >> beam.Map(
        lambda v: write_named(files.join(config.output, tfrecord.VOCAB_NAME), v.to_json()))
    encoded = examples | "EncodeRecords" >> EncodeRecords(vocabulary, config.max_length, config.mode)

    index = {s: i for i, s in enumerate(splits)}
    per_split = encoded | "PartitionBySplit" >> beam.Partition(_split_index, len(splits), index)
    written = [per_split[i] | f"WriteSplit[{split}]" >> WriteSplit(config.output, split, config.num_shards)
               for i, split in enumerate(splits)]
    shards = [w["files"] for w in written] | "FlattenShardNames" >> beam.Flatten()
    references = [w["references"] for w in written] | "FlattenReferenceNames" >> beam.Flatten()

    errors = (read_source[ERRORS], checked[ERRORS], joined[ERRORS]) | "FlattenErrors" >> beam.Flatten()
    error_files = (
        errors
        | "EncodeErrors" >> beam.Map(records.to_json_line)
        | "WriteErrors" >> beam.io.WriteToText(files.join(config.output, "errors"), file_name_suffix=".jsonl",
                                               shard_name_template="-SSSSS-of-NNNNN")
    )
    parts = {"shards": shards, "references": references, "vocabulary": vocabulary, "vocab_file": vocab_file,
             "listed": read_source["items"], "encoded": encoded, "errors": errors, "error_files": error_files}
    return parts | "WriteDatasetInfo" >> WriteDatasetInfo(config, source)


def run(argv: list[str] | None = None) -> tfrecord.DatasetInfo:
    """Runs the job; returns the written DatasetInfo. Raises UsageError before any work."""
    return _prepare(argv)[1]


def _prepare(argv: list[str] | None) -> tuple[PrepareConfig, tfrecord.DatasetInfo]:
    from apache_beam.options.pipeline_options import StandardOptions

    config, options = parse(argv)
    cli.require_runner(options)
    gcs.require_credentials([config.output, config.image_root, config.captions, config.encoder_weights,
                             *(f for _, f in config.splits)])
    gcs.configure_for_emulator()
    config = check_inputs(config)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "DirectRunner"
    clear_output(config.output)
    source = describe_source(config)
    if config.source == "synthetic":
        source["synthetic"] = make_synthetic(config)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config, source)
    pipeline.run().wait_until_finish()
    return config, tfrecord.DatasetInfo.from_json(files.read_text(files.join(config.output, tfrecord.INFO_NAME)))


def summary(info: tfrecord.DatasetInfo, output: str, seconds: float) -> str:
    """The one line printed at the end."""
    parts = ", ".join(f"{s} {m['images']:,} images / {m['captions']:,} captions" for s, m in info.splits.items())
    errors = info.source.get("errors", {})
    stages = ", ".join(f"{k} {n:,}" for k, n in errors.get("by_stage", {}).items())
    if info.mode == "features":
        what = f"features of {info.encoder}, {info.feature_size} floats"
    else:
        what = f"images {info.image_size} px"
    return (
        f"prepared {output} ({what}): {parts}; vocabulary {info.vocab_size:,} tokens; "
        f"{errors.get('total', 0):,} errors{f' ({stages}) in errors-*.jsonl' if stages else ''}; {seconds:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    code, prepared = cli.run_job("batch_caption.prepare", lambda: _prepare(argv))
    if code == 0:
        config, info = prepared
        print(summary(info, config.output, time.time() - started))
    return code
