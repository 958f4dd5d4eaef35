"""`python -m batch_caption.prepare`: caption datasets -> a prepared training dataset.

    python -m batch_caption.prepare --source coco --split train=captions_train2014.json \\
        --split val=captions_val2014.json --image_root coco/ --output data/ [Beam options]

A Beam job; the output directory follows `batch_caption.data.tfrecord`:

    annotation files (coco | karpathy | flickr8k | synthetic scenes, see data/sources.py)
      -> ReadCaptionSource     CaptionedImage(image_id, path, split, raw captions) | error
      -> CheckCaptions         drops captions with no token; an image left without one -> error
      -> DedupePaths + ReadImages (the captioning job's own read + decode + resize)
      -> [ComputeFeatures]     RunInference(FeatureModelHandler), with --precompute_features
      -> JoinCaptionsToImages  CoGroupByKey on path: (image, captions) | the image's error
      -> BuildVocabulary       token counts of the vocab split (Beam combiners) -> Vocabulary
      -> EncodeRecords         captions -> ids (vocabulary as a side input, cut to max_length)
      -> WriteSplit per split  <split>-SSSSS-of-NNNNN.tfrecord + references_<split>.json
      -> errors-*.jsonl, vocab.json, then dataset.json LAST (from side inputs of every write)

Nothing is dropped silently: every listed image ends as one record or one error record
(stage read | decode | infer | caption), every rejected caption or annotation as an error
record (stage caption). Error records carry the job's fields plus `split` (null for
annotations no split claims). dataset.json counts both:

    splits[<split>]  files, images, captions (written), truncated_captions (cut to
                     max_length), listed_images (in the annotations), errors {stage: n}
    source           the inputs and options, run_id, vocab_split, min_word_count,
                     encoder_weights (features mode), references {split: file},
                     errors {total, by_stage, by_type, without_split, files}

Exit codes: 0 the dataset was written (per-item errors are data); 2 bad flags or missing
input files (nothing was started, the output is untouched); 1 the pipeline failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from batch_caption import gcs, images, records
from batch_caption.data import scenes, sources, tfrecord
from batch_caption.data.sources import CaptionedImage, SourceProblem
from batch_caption.model import vocab as vocab_lib
from batch_caption.model.config import DEFAULT_SMALL_CNN_GRID, ENCODERS, ModelConfig
from batch_caption.pipeline import ERRORS, NAMESPACE, ReadImages
from batch_caption import cli
from batch_caption.cli import UsageError

SOURCES = ("coco", "karpathy", "flickr8k", "synthetic")
DEFAULT_SYNTHETIC_COUNTS = "train=4000,val=200,test=500,compositional=500"
SYNTHETIC_DIR = "source"  # OUTPUT/source/: the generated scenes (COCO layout)
# Split names become file names (<split>-00000-of-00004.tfrecord); no "-" so that the
# trainer's "<split>-*" glob never matches another split's shards.
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,63}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _counter(name: str):
    return Metrics.counter(NAMESPACE, name)


# --- options ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """The job's own options (Beam's live in PipelineOptions). Raises UsageError.

    splits: (name, file or None) per output split, in output order. The file is the
      COCO captions JSON (coco, required) or the image list (flickr8k, optional: the
      official Flickr_8k.*Images.txt next to `captions` by default); karpathy and
      synthetic take none.
    captions: the Karpathy split JSON, or Flickr8k.token.txt.
    image_root: directory the annotation files' image names are relative to.
    restval: split that Karpathy's "restval" images join, or None to leave them out.
    synthetic_counts: (split, number of scenes) for --source synthetic.
    min_word_count: tokens seen fewer times in the vocab split's captions become <unk>.
    num_shards: shards per split; 0 lets the runner decide.
    encoder / encoder_weights / small_cnn_grid: the backbone that computes features
      (features mode; the grid only for small_cnn).
    """

    source: str
    output: str
    splits: tuple[tuple[str, str | None], ...]
    run_id: str
    image_root: str | None = None
    captions: str | None = None
    restval: str | None = "train"
    synthetic_counts: tuple[tuple[str, int], ...] = ()
    seed: int = 0
    image_size: int = 96
    max_length: int = 20
    min_word_count: int = 4
    vocab_split: str = "train"
    num_shards: int = 0
    precompute_features: bool = False
    encoder: str | None = None
    encoder_weights: str | None = None
    small_cnn_grid: int | None = None
    batch_size: int = 32
    max_image_pixels: int = 100_000_000
    max_file_bytes: int = 256 * 1024 * 1024

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UsageError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not self.output:
            raise UsageError("--output is required")
        if not _RUN_ID_RE.match(self.run_id):
            raise UsageError(f"--run_id {self.run_id!r} must be letters, digits, '.', '_' or '-' (max 128)")
        self._check_splits()
        if self.vocab_split not in self.split_names:
            raise UsageError(
                f"--vocab_split {self.vocab_split!r} is not among the splits ({', '.join(self.split_names)}): "
                "the vocabulary is built from its captions"
            )
        if dict(self.synthetic_counts).get(self.vocab_split, 1) < 1:
            raise UsageError(f"--synthetic_counts must give the vocab split {self.vocab_split!r} at least one scene")
        if not 32 <= self.image_size <= 1024:
            raise UsageError(f"--image_size must be in [32, 1024], got {self.image_size}")
        for name, low in (("max_length", 1), ("min_word_count", 1), ("num_shards", 0), ("batch_size", 1),
                          ("max_image_pixels", 1), ("max_file_bytes", 1), ("seed", 0)):
            if getattr(self, name) < low:
                raise UsageError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.precompute_features:
            if self.encoder not in ENCODERS:
                raise UsageError(f"--encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
            if not self.encoder_weights:
                # A random backbone differs per worker process: the features would be
                # inconsistent, and no model could reproduce them at captioning time.
                raise UsageError("--precompute_features needs --encoder_weights (imagenet or a .weights.h5 file)")
            if self.encoder == "small_cnn" and self.encoder_weights == "imagenet":
                raise UsageError("small_cnn has no imagenet weights: give --encoder_weights a .weights.h5 file")
            if self.small_cnn_grid is not None and self.encoder != "small_cnn":
                raise UsageError(f"--small_cnn_grid only applies to --encoder small_cnn, not {self.encoder}")
            if self.small_cnn_grid is not None and not 1 <= self.small_cnn_grid <= 8:
                raise UsageError(f"--small_cnn_grid must be in [1, 8], got {self.small_cnn_grid}")
        elif self.encoder or self.encoder_weights or self.small_cnn_grid is not None:
            raise UsageError("--encoder, --encoder_weights and --small_cnn_grid only apply with --precompute_features")

    def _check_splits(self):
        names = [n for n, _ in self.splits]
        if not names:
            raise UsageError("no split: give --split" if self.source != "synthetic" else "--synthetic_counts is empty")
        for name in names:
            if not _SPLIT_RE.match(name):
                raise UsageError(f"split name {name!r} must be letters, digits or '_' (it names the shard files)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UsageError(f"split {dupes[0]!r} is given more than once")
        files = {n: f for n, f in self.splits}
        known = {"karpathy": sources.KARPATHY_SPLITS, "flickr8k": sources.FLICKR8K_SPLITS,
                 "synthetic": scenes.SPLITS}.get(self.source)
        if known:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise UsageError(f"unknown {self.source} split {unknown[0]!r}; choose from {', '.join(known)}")
        need_root = self.source != "synthetic"
        if need_root and not self.image_root:
            raise UsageError(f"--source {self.source} needs --image_root (the directory its image names are relative to)")
        if not need_root and self.image_root:
            raise UsageError("--image_root does not apply to --source synthetic")
        if self.source == "coco":
            missing = [n for n in names if not files[n]]
            if missing:
                raise UsageError(f"--source coco needs --split {missing[0]}=CAPTIONS_JSON")
            if self.captions:
                raise UsageError("--captions does not apply to --source coco (give --split NAME=CAPTIONS_JSON)")
        elif self.source in ("karpathy", "flickr8k"):
            if not self.captions:
                what = "the Karpathy split JSON" if self.source == "karpathy" else "Flickr8k.token.txt"
                raise UsageError(f"--source {self.source} needs --captions ({what})")
            if self.source == "karpathy" and any(files.values()):
                raise UsageError("--source karpathy takes split names only (--split NAME): the JSON assigns the splits")
        if self.source != "karpathy" and self.restval != "train":
            raise UsageError("--restval only applies to --source karpathy")
        if self.restval is not None and self.restval not in sources.KARPATHY_SPLITS:
            raise UsageError(f"--restval must be one of {', '.join(sources.KARPATHY_SPLITS)} or none, got {self.restval!r}")
        if self.source == "synthetic" and any(n < 0 for _, n in self.synthetic_counts):
            raise UsageError("--synthetic_counts must be >= 0")

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.splits)

    @property
    def mode(self) -> str:
        return "features" if self.precompute_features else "images"

    @property
    def image_config(self) -> images.ImageConfig:
        return images.ImageConfig(image_size=self.image_size, max_image_pixels=self.max_image_pixels)

    @property
    def model_config(self) -> ModelConfig:
        """The backbone's config (features mode). vocab_size is a placeholder: the backbone
        does not use it, and the vocabulary is not known until the job has run."""
        return ModelConfig(vocab_size=len(vocab_lib.SPECIAL_TOKENS) + 1, encoder=self.encoder,
                           image_size=self.image_size, encoder_weights=self.encoder_weights, train_encoder=False,
                           small_cnn_grid=self.small_cnn_grid or DEFAULT_SMALL_CNN_GRID)

    @property
    def synthetic_dir(self) -> str:
        return join(self.output, SYNTHETIC_DIR)

    def flickr8k_lists(self) -> dict[str, str]:
        """Every Flickr8k split's image list: the given file, else the official one."""
        base = os.path.dirname(self.captions or "")
        given = {n: f for n, f in self.splits if f}
        return {s: given.get(s) or sources.join_path(base, name) for s, name in sources.FLICKR8K_SPLIT_FILES.items()}


def join(base: str, name: str) -> str:
    return FileSystems.join(base, name)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m batch_caption.prepare",
        description=textwrap.fill(
            "Prepare a captioning dataset for batch_caption.train: decode and resize every image with the "
            "captioning job's own code (or precompute its CNN features), build the vocabulary from the training "
            "split, and write TFRecord shards, COCO references per split, vocab.json and dataset.json (last). "
            "Every bad image or caption becomes a record in errors-*.jsonl.", 100),
        epilog="Examples:\n"
        "  --source coco --split train=annotations/captions_train2014.json --split val=annotations/captions_val2014.json "
        "--image_root coco/ --output data/coco\n"
        "  --source karpathy --captions dataset_coco.json --image_root coco/ --output data/karpathy\n"
        "  --source flickr8k --captions Flickr8k_text/Flickr8k.token.txt --image_root Flicker8k_Dataset/ --output data/f8k\n"
        "  --source synthetic --synthetic_counts train=4000,val=200,test=500,compositional=500 --output data/synth\n"
        "Any Apache Beam pipeline option may be added (--runner=DataflowRunner --project=... --temp_location=gs://..., "
        "--direct_num_workers=2 --direct_running_mode=multi_processing). Default runner: DirectRunner.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("source")
    s.add_argument("--source", required=True, choices=SOURCES, help="annotation format")
    s.add_argument("--split", action="append", default=[], metavar="NAME[=FILE]",
                   help="coco: NAME=CAPTIONS_JSON, one per split (required). flickr8k: NAME[=IMAGE_LIST] (train, val, "
                   "test; lists default to the official Flickr_8k.*Images.txt next to --captions). karpathy: NAME "
                   "(train, val, test). Given names restrict the output to those splits. Repeatable.")
    s.add_argument("--image_root", help="directory (local or gs://) the annotations' image names are relative to")
    s.add_argument("--captions", help="karpathy: dataset_*.json; flickr8k: Flickr8k.token.txt")
    s.add_argument("--restval", default="train", help="karpathy: split for 'restval' images, or 'none' (default train)")
    s.add_argument("--synthetic_counts", default=DEFAULT_SYNTHETIC_COUNTS, metavar="SPLIT=N,...",
                   help=f"synthetic: scenes per split, rendered into OUTPUT/{SYNTHETIC_DIR}/ at --image_size "
                   f"(default {DEFAULT_SYNTHETIC_COUNTS})")
    s.add_argument("--seed", type=int, default=0, help="synthetic: scene seed (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, help="dataset directory (local or gs://); earlier shards there are replaced")
    o.add_argument("--image_size", type=int, default=96, help="side of the stored square images, pixels (default 96)")
    o.add_argument("--max_length", type=int, default=20, help="captions are cut to this many tokens (default 20)")
    o.add_argument("--min_word_count", type=int, default=4,
                   help="words seen fewer times in the vocab split become <unk> (default 4)")
    o.add_argument("--vocab_split", default="train", help="split whose captions make the vocabulary (default train)")
    o.add_argument("--num_shards", type=int, default=0, help="TFRecord shards per split (default 0: the runner decides)")
    o.add_argument("--run_id", default=None, help="name in the error records (default: UTC timestamp)")
    f = p.add_argument_group("precomputed features (decoder-only training)")
    f.add_argument("--precompute_features", action="store_true",
                   help="store pooled CNN features instead of pixels, computed with the captioning job's model handler")
    f.add_argument("--encoder", default=None, help=f"backbone: {', '.join(ENCODERS)} (default small_cnn)")
    f.add_argument("--encoder_weights", default=None,
                   help="'imagenet' (Keras downloads them) or a backbone .weights.h5 file (local or gs://); required")
    f.add_argument("--small_cnn_grid", type=int, default=None,
                   help="small_cnn: side of the grid its features are pooled to, F = grid*grid*128 (default 4; "
                   "3 matches the synthetic scenes' 3x3 layout); recorded in dataset.json for train")
    f.add_argument("--batch_size", type=int, default=32, help="images per encoder call (default 32)")
    r = p.add_argument_group("resources")
    r.add_argument("--max_image_pixels", type=int, default=100_000_000, help="decoded pixel limit per image (default 100M)")
    r.add_argument("--max_file_bytes", type=int, default=256 * 1024 * 1024, help="larger files are errors (default 256 MiB)")
    return p


def _parse_split(text: str) -> tuple[str, str | None]:
    name, eq, path = text.partition("=")
    if eq and not path:
        raise UsageError(f"--split {text!r}: empty file name")
    return name.strip(), (path or None)


def _parse_counts(text: str) -> tuple[tuple[str, int], ...]:
    counts = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, number = part.partition("=")
        try:
            counts.append((name.strip(), int(number)))
        except ValueError:
            raise UsageError(f"--synthetic_counts: {part!r} is not SPLIT=N") from None
        if not eq:
            raise UsageError(f"--synthetic_counts: {part!r} is not SPLIT=N")
    return tuple(counts)


def parse(argv: list[str] | None):
    """argv -> (PrepareConfig, beam PipelineOptions). Raises UsageError on any bad flag."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args, beam_args = build_parser().parse_known_args(argv)
    options = PipelineOptions(beam_args)
    known = options.get_all_options(retain_unknown_options=False)
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join('--' + u for u in unknown)} (see --help)")
    given = tuple(_parse_split(s) for s in args.split)
    counts: tuple[tuple[str, int], ...] = ()
    if args.source == "synthetic":
        if given:
            raise UsageError("--source synthetic takes its splits from --synthetic_counts, not --split")
        counts = _parse_counts(args.synthetic_counts)
        splits = tuple((n, None) for n, _ in counts)
    elif args.source in ("karpathy", "flickr8k") and not given:
        splits = tuple((n, None) for n in sources.KARPATHY_SPLITS)
    else:
        splits = given
    precompute = args.precompute_features
    return PrepareConfig(
        source=args.source,
        output=args.output,
        splits=splits,
        run_id=args.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        image_root=args.image_root,
        captions=args.captions,
        restval=None if args.restval == "none" else args.restval,
        synthetic_counts=counts,
        seed=args.seed,
        image_size=args.image_size,
        max_length=args.max_length,
        min_word_count=args.min_word_count,
        vocab_split=args.vocab_split,
        num_shards=args.num_shards,
        precompute_features=precompute,
        encoder=args.encoder or ("small_cnn" if precompute else None),
        encoder_weights=args.encoder_weights,
        small_cnn_grid=args.small_cnn_grid,
        batch_size=args.batch_size,
        max_image_pixels=args.max_image_pixels,
        max_file_bytes=args.max_file_bytes,
    ), options


def _local(path: str | None) -> str | None:
    """Local paths absolute (workers may run elsewhere; references name real files)."""
    return path if path is None or "://" in path else os.path.abspath(path)


def check_inputs(config: PrepareConfig) -> PrepareConfig:
    """Checks that every input exists before any work; makes local paths absolute."""

    def must_exist(path: str, what: str):
        try:
            ok = FileSystems.exists(path)
        except Exception as e:
            raise UsageError(f"cannot check {what} {path}: {e}") from e
        if not ok:
            raise UsageError(f"{what} {path} does not exist")

    config = dataclasses.replace(
        config,
        output=_local(config.output),
        image_root=_local(config.image_root),
        captions=_local(config.captions),
        splits=tuple((n, _local(f)) for n, f in config.splits),
        encoder_weights=config.encoder_weights if config.encoder_weights == "imagenet" else _local(config.encoder_weights),
    )
    if config.image_root and "://" not in config.image_root and not os.path.isdir(config.image_root):
        raise UsageError(f"--image_root {config.image_root} is not a directory")
    if config.captions:
        must_exist(config.captions, "--captions")
    if config.source == "coco":
        for name, path in config.splits:
            must_exist(path, f"--split {name}:")
    if config.source == "flickr8k":
        for name, path in config.flickr8k_lists().items():
            must_exist(path, f"the {name} image list")
    if config.source == "synthetic" and "://" in config.output:
        raise UsageError("--source synthetic renders its scenes into OUTPUT/source/: --output must be a local directory")
    if config.encoder_weights and config.encoder_weights != "imagenet":
        must_exist(config.encoder_weights, "--encoder_weights")
    return config


def source_tasks(config: PrepareConfig) -> list:
    """The annotation files to read, as zero-argument reader calls (one per worker task)."""
    wanted = config.split_names
    if config.source in ("coco", "synthetic"):
        if config.source == "synthetic":
            root = config.synthetic_dir
            files = [(n, join(root, f"captions_{n}.json")) for n in wanted]
        else:
            root, files = config.image_root, list(config.splits)
        return [functools.partial(sources.read_coco, path, name, root) for name, path in files]
    if config.source == "karpathy":
        return [functools.partial(sources.read_karpathy, config.captions, config.image_root, wanted, config.restval)]
    return [functools.partial(sources.read_flickr8k, config.captions, config.flickr8k_lists(), config.image_root, wanted)]


# --- data passed between steps ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionedExample:
    """An image joined with its usable captions.

    payload: uint8 [S, S, 3] pixels (mode "images") or float32 [F] features ("features").
    """

    item: CaptionedImage
    payload: np.ndarray


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
                _counter("source_problems").inc()
                yield beam.pvalue.TaggedOutput(
                    ERRORS, _error(item.path, item.split, "caption", item.error, item.message, self._run_id)
                )
            else:
                _counter("listed_images").inc()
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
                _counter("rejected_captions").inc()
                yield beam.pvalue.TaggedOutput(ERRORS, _error(
                    item.path, item.split, "caption", "EmptyCaption", f"caption {caption!r} has no word", self._run_id))
        if valid:
            yield dataclasses.replace(item, captions=tuple(valid))
            return
        _counter("images_without_caption").inc()
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

    `handler` is an inference.FeatureModelHandler: the batching, process sharing and
    backbone code of the captioning job.
    """

    def __init__(self, handler, run_id: str):
        super().__init__()
        self._handler = handler
        self._run_id = run_id

    def expand(self, examples):
        from apache_beam.ml.inference.base import RunInference

        from batch_caption.pipeline import FailedBatchToErrorsFn

        predictions, dead = examples | "RunInference" >> RunInference(self._handler).with_exception_handling()
        out = predictions | "ToFeatures" >> beam.ParDo(_ToFeaturesFn(self._run_id)).with_outputs(ERRORS, main="features")
        failed = dead.failed_inferences | "FailedBatchesToErrors" >> beam.ParDo(FailedBatchToErrorsFn(self._run_id))
        errors = (out[ERRORS], failed) | "FlattenInferErrors" >> beam.Flatten()
        return {"features": out.features, ERRORS: errors}


# --- JoinCaptionsToImages --------------------------------------------------------------


class _JoinFn(beam.DoFn):
    """(path, {items, payloads, errors}) -> one CaptionedExample or error per item.

    A path listed in several splits was read once; each split gets its own copy of
    the outcome, so every split's counts add up.
    """

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, element):
        path, group = element
        payloads, errors = list(group["payloads"]), list(group["errors"])
        for item in group["items"]:
            if payloads:
                yield CaptionedExample(item, payloads[0])
            elif errors:
                yield beam.pvalue.TaggedOutput(ERRORS, {**errors[0], "split": item.split})
            else:  # cannot happen: ReadImages gives every path an image or an error
                yield beam.pvalue.TaggedOutput(ERRORS, _error(
                    path, item.split, "read", "ImageLost", "the image was neither read nor rejected", self._run_id))


class JoinCaptionsToImages(beam.PTransform):
    """{"items": CaptionedImage, "payloads": (path, array), "errors": error records of
    images} -> CaptionedExample per item; tag 'errors' (image errors, now with a split)."""

    def __init__(self, run_id: str):
        super().__init__()
        self._run_id = run_id

    def expand(self, inputs):
        keyed = {
            "items": inputs["items"] | "KeyItemsByPath" >> beam.Map(lambda i: (i.path, i)),
            "payloads": inputs["payloads"],
            "errors": inputs[ERRORS] | "KeyErrorsByPath" >> beam.Map(lambda r: (r["path"], r)),
        }
        out = (
            keyed
            | "GroupByPath" >> beam.CoGroupByKey()
            | "PairCaptionsWithImages" >> beam.ParDo(_JoinFn(self._run_id)).with_outputs(ERRORS, main="examples")
        )
        return {"examples": out.examples, ERRORS: out[ERRORS]}


# --- BuildVocabulary -------------------------------------------------------------------


def vocabulary_from_counts(counts: Iterable[tuple[str, int]], min_count: int) -> vocab_lib.Vocabulary:
    """(token, count) pairs -> the Vocabulary that Vocabulary.build gives the same captions:
    special tokens first, then tokens seen >= min_count times by descending count, ties
    alphabetically."""
    counts = {t: n for t, n in counts if t not in vocab_lib.SPECIAL_TOKENS}
    kept = sorted((t for t, n in counts.items() if n >= min_count), key=lambda t: (-counts[t], t))
    return vocab_lib.Vocabulary(vocab_lib.SPECIAL_TOKENS + tuple(kept))


class BuildVocabulary(beam.PTransform):
    """PCollection[CaptionedExample] -> a one-element PCollection[Vocabulary] of `split`.

    Only captions that reach the dataset count: those of images that were read.
    """

    def __init__(self, split: str, min_count: int):
        super().__init__()
        self._split = split
        self._min_count = min_count

    def expand(self, examples):
        split, min_count = self._split, self._min_count
        return (
            examples
            | "KeepVocabSplit" >> beam.Filter(lambda e: e.item.split == split)
            | "Tokenize" >> beam.FlatMap(lambda e: [t for c in e.item.captions for t in vocab_lib.tokenize(c)])
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
        self._written = _counter("records_written")

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


def _write_text(path: str, text: str) -> str:
    with FileSystems.create(path) as f:
        f.write(text.encode("utf-8"))
    return path


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
        files = (
            encoded
            | "ToRecordBytes" >> beam.Map(lambda e: e.record)
            | "WriteRecords" >> beam.io.WriteToTFRecord(
                join(output, split), file_name_suffix=".tfrecord", num_shards=self._num_shards,
                shard_name_template="-SSSSS-of-NNNNN")
            | "NameShards" >> beam.Map(lambda f: (split, _basename(f)))
        )
        references = (
            encoded
            | "ToReferenceEntries" >> beam.Map(lambda e: (e.image_id, e.path, e.captions))
            | "CollectReferences" >> beam.combiners.ToList()
            | "WriteReferences" >> beam.Map(
                lambda entries: (split, _basename(_write_text(
                    join(output, f"references_{split}.json"), references_json(split, entries)))))
        )
        return {"files": files, "references": references}


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

    def process(self, _, files, references, vocabulary, vocab_file, counts, error_counts, error_files, feature_sizes):
        config = self._config
        shards: dict[str, list[str]] = {s: [] for s in config.split_names}
        for split, name in files:
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
            "vocab_file": _basename(vocab_file),
            "references": {s: n for s, n in sorted(references)},
            "errors": {
                "total": sum(by_stage.values()),
                "by_stage": dict(sorted(by_stage.items())),
                "by_type": dict(sorted(by_type.items())),
                "without_split": sum(n for (s, _, _), n in error_counts if s is None),
                "files": sorted(_basename(f) for f in error_files),
            },
        }
        if config.precompute_features:
            source["encoder_weights"] = config.encoder_weights
            if config.encoder == "small_cnn":
                source["small_cnn_grid"] = config.model_config.small_cnn_grid
        info = tfrecord.DatasetInfo(
            mode=config.mode, image_size=config.image_size, max_length=config.max_length, vocab_size=len(vocabulary),
            splits=splits, encoder=config.encoder, feature_size=feature_size, source=source,
        )
        _write_text(join(config.output, tfrecord.INFO_NAME), info.to_json())
        yield info.to_json()


def _backbone_feature_size(config: PrepareConfig) -> int:
    """F of the backbone, for a dataset with no image at all (nothing to measure)."""
    from batch_caption.model.encoder import build_backbone

    return int(build_backbone(config.model_config, load_weights=False).output_shape[-1])


class WriteDatasetInfo(beam.PTransform):
    """Everything written so far -> dataset.json, written last.

    Its inputs are side inputs of the single writing step, so it runs only after
    every shard, reference file, vocab.json and error file is finalised.
    """

    def __init__(self, config: PrepareConfig, source: dict[str, Any]):
        super().__init__()
        self._config = config
        self._source = source

    def expand(self, parts):
        """parts: files, references ((split, name)), vocabulary, vocab_file (singletons),
        counts (((split, key), n)), error_counts (((split, stage, error), n)),
        error_files (names), feature_sizes (ints)."""
        AsList, AsSingleton = beam.pvalue.AsList, beam.pvalue.AsSingleton
        return (
            parts["files"].pipeline
            | "InfoTrigger" >> beam.Create([None])
            | "WriteInfo" >> beam.ParDo(
                _WriteInfoFn(self._config, self._source),
                AsList(parts["files"]), AsList(parts["references"]), AsSingleton(parts["vocabulary"]),
                AsSingleton(parts["vocab_file"]), AsList(parts["counts"]), AsList(parts["error_counts"]),
                AsList(parts["error_files"]), AsList(parts["feature_sizes"]),
            )
        )


# --- the job ---------------------------------------------------------------------------


def _split_index(encoded: EncodedExample, n: int, index: dict[str, int]) -> int:
    return index[encoded.split]


def build_pipeline(pipeline, config: PrepareConfig, source: dict[str, Any]):
    """Adds the whole job to `pipeline`; returns the PCollection of dataset.json's text."""
    from batch_caption.inference import FeatureModelHandler

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
        "JoinCaptionsToImages" >> JoinCaptionsToImages(run_id))
    examples = joined["examples"]
    vocabulary = examples | "BuildVocabulary" >> BuildVocabulary(config.vocab_split, config.min_word_count)
    vocab_file = vocabulary | "WriteVocabulary" >> beam.Map(
        lambda v: _write_text(join(config.output, tfrecord.VOCAB_NAME), v.to_json()))
    encoded = examples | "EncodeRecords" >> EncodeRecords(vocabulary, config.max_length, config.mode)

    index = {s: i for i, s in enumerate(splits)}
    per_split = encoded | "PartitionBySplit" >> beam.Partition(_split_index, len(splits), index)
    written = [per_split[i] | f"WriteSplit[{split}]" >> WriteSplit(config.output, split, config.num_shards)
               for i, split in enumerate(splits)]
    files = [w["files"] for w in written] | "FlattenShardNames" >> beam.Flatten()
    references = [w["references"] for w in written] | "FlattenReferenceNames" >> beam.Flatten()

    errors = (read_source[ERRORS], checked[ERRORS], joined[ERRORS]) | "FlattenErrors" >> beam.Flatten()
    error_files = (
        errors
        | "EncodeErrors" >> beam.Map(records.to_json_line)
        | "WriteErrors" >> beam.io.WriteToText(join(config.output, "errors"), file_name_suffix=".jsonl",
                                               shard_name_template="-SSSSS-of-NNNNN")
    )
    error_counts = (
        errors
        | "ErrorKinds" >> beam.Map(lambda r: (r.get("split"), r["stage"], r["error"]))
        | "CountErrorKinds" >> beam.combiners.Count.PerElement()
    )
    listed = (read_source["items"] | "ListedPerSplit" >> beam.Map(lambda i: ((i.split, "listed"), 1)))
    counts = (
        (encoded | "RecordCounts" >> beam.FlatMap(_summary_counts), listed)
        | "FlattenCounts" >> beam.Flatten()
        | "SumCounts" >> beam.CombinePerKey(sum)
    )
    feature_sizes = (
        encoded
        | "FeatureSize" >> beam.Map(lambda e: e.feature_size)
        | "DistinctFeatureSizes" >> beam.Distinct()
    )
    parts = {"files": files, "references": references, "vocabulary": vocabulary, "vocab_file": vocab_file,
             "counts": counts, "error_counts": error_counts, "error_files": error_files, "feature_sizes": feature_sizes}
    return parts | "WriteDatasetInfo" >> WriteDatasetInfo(config, source)


def clear_output(output: str) -> None:
    """Removes what an earlier run wrote there: dataset.json first (marks it incomplete),
    then its shards, references, vocabulary, error files and crashed writes' temp files.
    Anything else in the directory (e.g. the synthetic source) is left alone."""
    info = join(output, tfrecord.INFO_NAME)
    if FileSystems.exists(info):
        FileSystems.delete([info])
    patterns = ["*-?????-of-?????.tfrecord", "references_*.json", tfrecord.VOCAB_NAME, "errors-*-of-*.jsonl",
                "beam-temp-*/**"]
    old = [m.path for r in FileSystems.match([join(output, p) for p in patterns]) for m in r.metadata_list]
    if old:
        FileSystems.delete(old)
    if "://" not in output and os.path.isdir(output):
        import shutil

        for name in os.listdir(output):
            if name.startswith("beam-temp-"):
                shutil.rmtree(os.path.join(output, name), ignore_errors=True)


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


def run(argv: list[str] | None = None) -> tfrecord.DatasetInfo:
    """Runs the job; returns the written DatasetInfo. Raises UsageError before any work."""
    return _prepare(argv)[1]


def _prepare(argv: list[str] | None) -> tuple[PrepareConfig, tfrecord.DatasetInfo]:
    from apache_beam.options.pipeline_options import StandardOptions

    config, options = parse(argv)
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
    with FileSystems.open(join(config.output, tfrecord.INFO_NAME)) as f:
        return config, tfrecord.DatasetInfo.from_json(f.read().decode("utf-8"))


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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()
    try:
        config, info = _prepare(argv)
    except UsageError as e:
        print(f"batch_caption.prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batch_caption.prepare: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the pipeline failed as a whole: one line, the trace in the debug log
        logging.getLogger("batch_caption").debug("pipeline failed", exc_info=True)
        print(f"batch_caption.prepare: pipeline failed: {_one_line(e)}", file=sys.stderr)
        return 1
    print(summary(info, config.output, time.time() - started))
    return 0


def _one_line(e: BaseException) -> str:
    """The gist of an exception; a worker's failure arrives as a whole traceback text,
    whose last line names the real error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Traceback"):
        return lines[-1]
    return f"{type(e).__name__}: {lines[0]}"


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: worker processes unpickle the
    # job's dataclasses and DoFns by module name, and "__main__" is not theirs.
    from batch_caption import prepare as _module

    sys.exit(_module.main())
