"""Writing steps: examples -> vocabulary -> records -> the dataset directory.

    BuildVocabulary    token counts of the vocab split (Beam combiners) -> Vocabulary
    EncodeRecords      captions -> ids (vocabulary as a side input, cut to max_length)
    WriteSplit         <split>-SSSSS-of-NNNNN.tfrecord + references_<split>.json
    WriteDatasetInfo   dataset.json, LAST, from side inputs of every write:

    splits[<split>]  files, images, captions (written), truncated_captions (cut to
                     max_length), listed_images (in the annotations), errors {stage: n}
    source           the inputs and options, run_id, vocab_split, min_word_count,
                     encoder_weights (features mode), references {split: file},
                     errors {total, by_stage, by_type, without_split, files}

The directory layout is `batch_caption.data.tfrecord`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

import apache_beam as beam

from batch_caption.data import tfrecord
from batch_caption.model import vocab as vocab_lib
from batch_caption.model.config import ENCODERS
from batch_caption.prepare.config import PrepareConfig
from batch_caption.prepare.read import CaptionedExample, counter
from batch_caption.storage import files, gcs


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedExample:
    """One serialized tf.train.Example and what the summary and references need of it."""

    split: str
    image_id: int
    path: str
    captions: tuple[str, ...]  # raw, as in the annotations
    truncated: int  # captions longer than max_length tokens
    feature_size: int | None
    record: bytes


# --- BuildVocabulary -------------------------------------------------------------------


def vocabulary_from_counts(counts: Iterable[tuple[str, int]], min_count: int) -> vocab_lib.Vocabulary:
    """(token, count) pairs -> the Vocabulary that Vocabulary.build gives the same captions:
    special tokens first, then tokens seen >= min_count times by descending count, ties
    alphabetically."""
    counts = {t: n for t, n in counts if t not in vocab_lib.SPECIAL_TOKENS}
    kept = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    return vocab_lib.Vocabulary(vocab_lib.SPECIAL_TOKENS + tuple(kept))


class BuildVocabulary(beam.PTransform):
    """PCollection[CaptionedImage] -> a one-element PCollection[Vocabulary] of `split`.

    Built from the checked captions, before any image is read: the encoding that needs
    it then runs in the stage that decodes the images, so pixels never wait between
    stages (see read.JoinCaptionsToImages). Captions of an image that fails to read
    count too: they are the dataset's captions as listed.
    """

    def __init__(self, split: str, min_count: int):
        super().__init__()
        self._split = split
        self._min_count = min_count

    def expand(self, items):
        split, min_count = self._split, self._min_count
        return (
            items
            | "KeepVocabSplit" >> beam.Filter(lambda i: i.split == split)
            | "Tokenize" >> beam.FlatMap(lambda i: [t for c in i.captions for t in vocab_lib.tokenize(c)])
            | "CountTokens" >> beam.combiners.Count.PerElement()
            | "CollectCounts" >> beam.combiners.ToList()
            | "SortVocabulary" >> beam.Map(vocabulary_from_counts, min_count)
        )


# --- EncodeRecords ---------------------------------------------------------------------


class _EncodeFn(beam.DoFn):
    """CaptionedExample -> EncodedExample (tf.train.Example of tfrecord.encode_example)."""

    def __init__(self, max_length: int, mode: str):
        self._max_length = max_length
        self._mode = mode

    def setup(self):
        self._written = counter("records_written")

    def process(self, example: CaptionedExample, vocabulary: vocab_lib.Vocabulary):
        item = example.item
        ids = [vocabulary.encode(c, self._max_length) for c in item.captions]
        truncated = sum(len(vocab_lib.tokenize(c)) > self._max_length for c in item.captions)
        payload = {"pixels" if self._mode == "images" else "features": example.payload}
        record = tfrecord.encode_example(item.image_id, item.path, ids, **payload)
        self._written.inc()
        yield EncodedExample(
            split=item.split,
            image_id=item.image_id,
            path=item.path,
            captions=item.captions,
            truncated=int(truncated),
            feature_size=int(example.payload.size) if self._mode == "features" else None,
            record=record,
        )


class EncodeRecords(beam.PTransform):
    """PCollection[CaptionedExample] -> PCollection[EncodedExample], captions as token
    ids of `vocabulary` (a one-element PCollection, used as a side input)."""

    def __init__(self, vocabulary, max_length: int, mode: str):
        super().__init__()
        self._vocabulary = vocabulary
        self._max_length = max_length
        self._mode = mode

    def expand(self, examples):
        return examples | "EncodeExamples" >> beam.ParDo(
            _EncodeFn(self._max_length, self._mode), beam.pvalue.AsSingleton(self._vocabulary)
        )


# --- WriteSplit ------------------------------------------------------------------------


def write_named(path: str, text: str) -> str:
    """Writes `text` to `path`; returns the file's name, for dataset.json."""
    files.write_text(path, text)
    return files.basename(path)


def references_json(split: str, entries: Iterable[tuple[int, str, tuple[str, ...]]]) -> str:
    """(image_id, path, raw captions) -> COCO captions JSON, file_name = the image path
    (what the captioning job records), ordered by image id."""
    images_, annotations = [], []
    for image_id, path, captions in sorted(entries):
        images_.append({"id": image_id, "file_name": path})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    info = {"description": f"batch_caption.prepare references of split {split}", "split": split}
    return json.dumps({"info": info, "licenses": [], "images": images_, "annotations": annotations}, ensure_ascii=False)


class WriteSplit(beam.PTransform):
    """One split's EncodedExamples -> <split>-SSSSS-of-NNNNN.tfrecord and references_<split>.json.

    Returns {"files": (split, shard file name), "references": (split, file name)}.
    """

    def __init__(self, output: str, split: str, num_shards: int):
        super().__init__()
        self._output = output
        self._split = split
        self._num_shards = num_shards

    def expand(self, encoded):
        split, output = self._split, self._output
        shards = (
            encoded
            | "ToRecordBytes" >> beam.Map(lambda e: e.record)
            | "WriteRecords" >> beam.io.WriteToTFRecord(
                files.join(output, split), file_name_suffix=".tfrecord", num_shards=self._num_shards,
                shard_name_template="-SSSSS-of-NNNNN")
            | "NameShards" >> beam.Map(lambda f: (split, files.basename(f)))
        )
        references = (
            encoded
            | "ToReferenceEntries" >> beam.Map(lambda e: (e.image_id, e.path, e.captions))
            | "CollectReferences" >> beam.combiners.ToList()
            | "WriteReferences" >> beam.Map(
                lambda entries: (split, write_named(
                    files.join(output, f"references_{split}.json"), references_json(split, entries))))
        )
        return {"files": shards, "references": references}


# --- WriteDatasetInfo ------------------------------------------------------------------


def _summary_counts(encoded: EncodedExample):
    yield (encoded.split, "images"), 1
    yield (encoded.split, "captions"), len(encoded.captions)
    yield (encoded.split, "truncated_captions"), encoded.truncated


class _WriteInfoFn(beam.DoFn):
    def __init__(self, config: PrepareConfig, source: dict[str, Any]):
        self._config = config
        self._source = source

    def setup(self):
        gcs.configure_for_emulator()

    def process(self, _, shard_names, references, vocabulary, vocab_file, counts, error_counts, error_files, feature_sizes):
        config = self._config
        shards: dict[str, list[str]] = {s: [] for s in config.split_names}
        for split, name in shard_names:
            shards[split].append(name)
        count = dict(counts)
        splits: dict[str, dict[str, Any]] = {}
        for split in config.split_names:
            by_stage: dict[str, int] = {}
            for (s, stage, _), n in error_counts:
                if s == split:
                    by_stage[stage] = by_stage.get(stage, 0) + n
            splits[split] = {
                "files": sorted(shards[split]),
                "images": count.get((split, "images"), 0),
                "captions": count.get((split, "captions"), 0),
                "truncated_captions": count.get((split, "truncated_captions"), 0),
                "listed_images": count.get((split, "listed"), 0),
                "errors": dict(sorted(by_stage.items())),
            }
        by_stage, by_type = {}, {}
        for (split, stage, error), n in error_counts:
            by_stage[stage] = by_stage.get(stage, 0) + n
            by_type[error] = by_type.get(error, 0) + n
        feature_size = None
        if config.precompute_features:
            sizes = sorted(set(feature_sizes))
            if len(sizes) > 1:
                raise RuntimeError(f"the encoder returned features of several sizes: {sizes}")
            feature_size = sizes[0] if sizes else _backbone_feature_size(config)
        source = {
            **self._source,
            "run_id": config.run_id,
            "vocab_split": config.vocab_split,
            "min_word_count": config.min_word_count,
            "vocab_file": vocab_file,
            "references": {s: n for s, n in sorted(references)},
            "errors": {
                "total": sum(by_stage.values()),
                "by_stage": dict(sorted(by_stage.items())),
                "by_type": dict(sorted(by_type.items())),
                "without_split": sum(n for (s, _, _), n in error_counts if s is None),
                "files": sorted(files.basename(f) for f in error_files),
            },
        }
        if config.precompute_features:
            source["encoder_weights"] = config.encoder_weights
            source["decoder"] = config.decoder
            if ENCODERS[config.encoder].takes_grid:
                source["small_cnn_grid"] = config.model_config.small_cnn_grid
        info = tfrecord.DatasetInfo(
            mode=config.mode, image_size=config.image_size, max_length=config.max_length, vocab_size=len(vocabulary),
            splits=splits, encoder=config.encoder, feature_size=feature_size, source=source,
        )
        files.write_text(files.join(config.output, tfrecord.INFO_NAME), info.to_json())
        yield info.to_json()


def _backbone_feature_size(config: PrepareConfig) -> int:
    """F of the backbone, for a dataset with no image at all (nothing to measure)."""
    from batch_caption.model.encoder import build_backbone

    return int(build_backbone(config.model_config, load_weights=False).output_shape[-1])


class WriteDatasetInfo(beam.PTransform):
    """Everything written so far -> dataset.json, written last, with the counts of
    images, captions and errors per split.

    Its inputs are side inputs of the single writing step, so it runs only after
    every shard, reference file, vocab.json and error file is finalised.
    """

    def __init__(self, config: PrepareConfig, source: dict[str, Any]):
        super().__init__()
        self._config = config
        self._source = source

    def expand(self, parts):
        """parts: shards, references ((split, file name)), vocabulary, vocab_file (singletons),
        listed (CaptionedImage), encoded (EncodedExample), errors (error records),
        error_files (names)."""
        error_counts = (
            parts["errors"]
            | "ErrorKinds" >> beam.Map(lambda r: (r.get("split"), r["stage"], r["error"]))
            | "CountErrorKinds" >> beam.combiners.Count.PerElement()
        )
        listed = parts["listed"] | "ListedPerSplit" >> beam.Map(lambda i: ((i.split, "listed"), 1))
        counts = (
            (parts["encoded"] | "RecordCounts" >> beam.FlatMap(_summary_counts), listed)
            | "FlattenCounts" >> beam.Flatten()
            | "SumCounts" >> beam.CombinePerKey(sum)
        )
        feature_sizes = (
            parts["encoded"]
            | "FeatureSize" >> beam.Map(lambda e: e.feature_size)
            | "DistinctFeatureSizes" >> beam.Distinct()
        )
        AsList, AsSingleton = beam.pvalue.AsList, beam.pvalue.AsSingleton
        return (
            parts["shards"].pipeline
            | "InfoTrigger" >> beam.Create([None])
            | "WriteInfo" >> beam.ParDo(
                _WriteInfoFn(self._config, self._source),
                AsList(parts["shards"]), AsList(parts["references"]), AsSingleton(parts["vocabulary"]),
                AsSingleton(parts["vocab_file"]), AsList(counts), AsList(error_counts),
                AsList(parts["error_files"]), AsList(feature_sizes),
            )
        )


# --- before the job ------------------------------------------------------------------


def clear_output(output: str) -> None:
    """Removes what an earlier run wrote there: dataset.json first (marks it incomplete),
    then its shards, references, vocabulary, error files and crashed writes' temp files.
    Anything else in the directory (e.g. the synthetic source) is left alone."""
    info = files.join(output, tfrecord.INFO_NAME)
    if files.exists(info):
        files.delete([info])
    patterns = ["*-?????-of-?????.tfrecord", "references_*.json", tfrecord.VOCAB_NAME, "errors-*-of-*.jsonl",
                "beam-temp-*/**"]
    files.delete([path for p in patterns for path in files.matched(files.join(output, p))])
    if not files.is_remote(output) and os.path.isdir(output):
        for name in os.listdir(output):
            if name.startswith("beam-temp-"):
                shutil.rmtree(os.path.join(output, name), ignore_errors=True)
