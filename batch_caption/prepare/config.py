"""The job's options: PrepareConfig, its command line, and the input checks.

`parse` turns argv into a PrepareConfig and Beam's PipelineOptions; `check_inputs`
then checks that every input file exists before any work, so a bad command line
fails with one line (exit code 2) and leaves the output directory untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import textwrap
import time

from batch_caption import cli, quiet, records
from batch_caption.cli import UsageError, option
from batch_caption.core import bounded_reads
from batch_caption.data import scenes, sources
from batch_caption.images import decoding
from batch_caption.model.config import DECODERS, DEFAULT_DECODER, DEFAULT_ENCODER, DEFAULT_SMALL_CNN_GRID, ENCODERS, ModelConfig
from batch_caption.storage import files

SOURCES = ("coco", "karpathy", "flickr8k", "synthetic")
DEFAULT_SYNTHETIC_COUNTS = "train=4000,val=200,test=500,compositional=500"
SYNTHETIC_DIR = "source"  # OUTPUT/source/: the generated scenes (COCO layout)
# Split names become file names (<split>-00000-of-00004.tfrecord); no "-" so that the
# trainer's "<split>-*" glob never matches another split's shards.
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,63}$")


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
      (features mode; the grid only for encoders that take it: small_cnn).
    decoder: the decoder the features are for (features mode): for one that reads a grid
      (attention) a Keras application's or efficientnet_lite0's last feature map is kept
      as a grid of cells, for one that reads a pooled vector (show_and_tell) it is averaged.
      small_cnn always keeps its pooled grid.
    """

    source: str = option(choices=SOURCES, help="annotation format")
    output: str = option(help="dataset directory (local or gs://); earlier shards there are replaced")
    splits: tuple[tuple[str, str | None], ...]
    run_id: str
    image_root: str | None = option(None, help="directory (local or gs://) the annotations' image names are relative to")
    captions: str | None = option(None, help="karpathy: dataset_*.json; flickr8k: Flickr8k.token.txt")
    restval: str | None = "train"
    synthetic_counts: tuple[tuple[str, int], ...] = ()
    seed: int = option(0, help="synthetic: scene seed")
    image_size: int = option(96, help="side of the stored square images, pixels")
    max_length: int = option(20, help="captions are cut to this many tokens")
    min_word_count: int = option(4, help="words seen fewer times in the vocab split become <unk>")
    vocab_split: str = option("train", help="split whose captions make the vocabulary")
    num_shards: int = option(0, help="TFRecord shards per split", default_help="default 0: the runner decides")
    precompute_features: bool = option(False, help="store pooled CNN features instead of pixels, computed with the "
                                       "captioning job's model handler")
    encoder: str | None = option(None, help=f"backbone: {', '.join(ENCODERS)}", default_help=f"default {DEFAULT_ENCODER}")
    encoder_weights: str | None = option(None, help="'imagenet' (Keras downloads them) or a backbone .weights.h5 file "
                                         "(local or gs://); required")
    small_cnn_grid: int | None = option(
        None, help="small_cnn: side of the grid its features are pooled to, F = grid*grid*128; 3 matches the synthetic "
        "scenes' 3x3 layout; recorded in dataset.json for train", default_help=f"default {DEFAULT_SMALL_CNN_GRID}")
    decoder: str = option(DEFAULT_DECODER, choices=DECODERS, help="the decoder the features are for: attention keeps "
                          "the encoder's last feature map as a grid of cells (h*w*C floats), show_and_tell pools it (C "
                          "floats); small_cnn keeps its grid either way; recorded in dataset.json for train")
    batch_size: int = option(32, help="images per encoder call")
    max_image_pixels: int = option(100_000_000, help="decoded pixel limit per image", default_help="default 100M")
    max_file_bytes: int = option(bounded_reads.DEFAULT_MAX_FILE_BYTES, help="larger files are errors",
                                 default_help="default 256 MiB")

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UsageError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not self.output:
            raise UsageError("--output is required")
        try:
            records.check_run_id(self.run_id)
        except ValueError as e:
            raise UsageError(str(e)) from None
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
            try:
                ENCODERS[self.encoder].check_weights(self.encoder_weights)
            except ValueError as e:
                raise UsageError(str(e)) from None
            if self.small_cnn_grid is not None and not ENCODERS[self.encoder].takes_grid:
                takers = ENCODERS.which(lambda e: e.takes_grid)
                raise UsageError(f"--small_cnn_grid only applies to --encoder {takers}, not {self.encoder}")
            if self.small_cnn_grid is not None and not 1 <= self.small_cnn_grid <= 8:
                raise UsageError(f"--small_cnn_grid must be in [1, 8], got {self.small_cnn_grid}")
            if self.decoder not in DECODERS:
                raise UsageError(f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        elif self.encoder or self.encoder_weights or self.small_cnn_grid is not None or self.decoder != DEFAULT_DECODER:
            raise UsageError("--encoder, --encoder_weights, --small_cnn_grid and --decoder only apply with "
                             "--precompute_features")

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
    def image_config(self) -> decoding.ImageConfig:
        return decoding.ImageConfig(image_size=self.image_size, max_image_pixels=self.max_image_pixels)

    @property
    def model_config(self) -> ModelConfig:
        """The backbone's config (features mode). vocab_size is a placeholder: the backbone
        does not use it, and the vocabulary is not known until the job has run."""
        return ModelConfig.without_vocabulary(
            encoder=self.encoder, image_size=self.image_size, encoder_weights=self.encoder_weights, train_encoder=False,
            small_cnn_grid=self.small_cnn_grid or DEFAULT_SMALL_CNN_GRID, decoder=self.decoder)

    @property
    def synthetic_dir(self) -> str:
        return files.join(self.output, SYNTHETIC_DIR)

    def flickr8k_lists(self) -> dict[str, str]:
        """Every Flickr8k split's image list: the given file, else the official one."""
        base = os.path.dirname(self.captions or "")
        given = {n: f for n, f in self.splits if f}
        return {s: given.get(s) or files.join(base, name) for s, name in sources.FLICKR8K_SPLIT_FILES.items()}


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
    cli.add_flags(s, PrepareConfig, ["source"])
    s.add_argument("--split", action="append", default=[], metavar="NAME[=FILE]",
                   help="coco: NAME=CAPTIONS_JSON, one per split (required). flickr8k: NAME[=IMAGE_LIST] (train, val, "
                   "test; lists default to the official Flickr_8k.*Images.txt next to --captions). karpathy: NAME "
                   "(train, val, test). Given names restrict the output to those splits. Repeatable.")
    cli.add_flags(s, PrepareConfig, ["image_root", "captions"])
    s.add_argument("--restval", default="train", help="karpathy: split for 'restval' images, or 'none' (default train)")
    s.add_argument("--synthetic_counts", default=DEFAULT_SYNTHETIC_COUNTS, metavar="SPLIT=N,...",
                   help=f"synthetic: scenes per split, rendered into OUTPUT/{SYNTHETIC_DIR}/ at --image_size "
                   f"(default {DEFAULT_SYNTHETIC_COUNTS})")
    cli.add_flags(s, PrepareConfig, ["seed"])
    o = p.add_argument_group("output")
    cli.add_flags(o, PrepareConfig, ["output", "image_size", "max_length", "min_word_count", "vocab_split", "num_shards"])
    o.add_argument("--run_id", default=None, help="name in the error records (default: UTC timestamp)")
    f = p.add_argument_group("precomputed features (decoder-only training)")
    cli.add_flags(f, PrepareConfig, ["precompute_features", "encoder", "encoder_weights", "small_cnn_grid", "decoder",
                                     "batch_size"])
    r = p.add_argument_group("resources")
    cli.add_flags(r, PrepareConfig, ["max_image_pixels", "max_file_bytes"])
    quiet.add_verbose_flag(p)
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
    args, options = cli.parse_with_pipeline_options(build_parser(), argv)
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
    return cli.from_args(
        PrepareConfig, args,
        splits=splits,
        run_id=args.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        restval=None if args.restval == "none" else args.restval,
        synthetic_counts=counts,
        encoder=args.encoder or (DEFAULT_ENCODER if args.precompute_features else None),
    ), options


def _local(path: str | None) -> str | None:
    """Local paths absolute (workers may run elsewhere; references name real files)."""
    return path if path is None or files.is_remote(path) else os.path.abspath(path)


def check_inputs(config: PrepareConfig) -> PrepareConfig:
    """Checks that every input exists before any work; makes local paths absolute."""

    def must_exist(path: str, what: str):
        try:
            ok = files.exists(path)
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
    if config.image_root and not files.is_remote(config.image_root) and not os.path.isdir(config.image_root):
        raise UsageError(f"--image_root {config.image_root} is not a directory")
    if config.captions:
        must_exist(config.captions, "--captions")
    if config.source == "coco":
        for name, path in config.splits:
            must_exist(path, f"--split {name}:")
    if config.source == "flickr8k":
        for name, path in config.flickr8k_lists().items():
            must_exist(path, f"the {name} image list")
    if config.source == "synthetic" and files.is_remote(config.output):
        raise UsageError("--source synthetic renders its scenes into OUTPUT/source/: --output must be a local directory")
    if config.encoder_weights and config.encoder_weights != "imagenet":
        must_exist(config.encoder_weights, "--encoder_weights")
    return config

