"""JobConfig: the captioning job's own options (Beam's live in PipelineOptions), and the
defaults that depend on the machine or the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from batch_caption import bundled, records
from batch_caption.cli import UsageError, option
from batch_caption.core import bounded_reads, cpus
from batch_caption.images import decoding, formats
from batch_caption.model.config import MAX_BEAM_SIZE, RUNTIMES, SEARCH_FLAGS, DecodeConfig, in_flag_names
from batch_caption.pipeline.image_files import ImageFiles
from batch_caption.storage import files

# Local reads are cheap, so local inputs get one thread per CPU: more threads than cores
# gain nothing, fewer leave cores idle where decoding is the bottleneck (large photos).
# An object store answers each open after a network round trip, which many threads in
# flight hide (bench/job_flags.py --latency_ms).
MIN_READ_THREADS = 2
REMOTE_READ_THREADS = 16

# Larger batches use the CPU better (bench/job_flags.py), but activation memory grows with
# batch x pixels, and a job runs one model per worker process: the default holds the pixels
# per batch constant.
BATCH_PIXELS = 128 * 128 * 128


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """The job's own options; the fields made by `option` are run.py's flags of their name.

    inputs: patterns after resolution (directories become recursive globs).
    extensions: which listed files are inputs (image_files.py); None: every file.
    search: the search settings given (DecodeConfig field -> value); the others are the
      model's (`model_decode`), else DecodeConfig's.
    """

    inputs: tuple[str, ...]
    input_lists: tuple[str, ...]
    output: str
    model: str
    run_id: str
    extensions: tuple[str, ...] | None = formats.DEFAULT_EXTENSIONS
    search: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int | None = option(
        None, help="images per model call",
        default_help="default: as many as hold ~2 M pixels at the model's input size, 8 to 128: 128 at 128 px, "
        "41 at 224 px, 23 at 299 px")
    max_image_pixels: int = option(decoding.DEFAULT_MAX_IMAGE_PIXELS,
                                   help="decoded pixel limit per image, against decompression bombs",
                                   default_help="default 100M")
    max_file_bytes: int = option(bounded_reads.DEFAULT_MAX_FILE_BYTES, help="larger files are errors",
                                 default_help="default 256 MiB")
    draft: bool = option(True, help="decode JPEGs at a reduced DCT scale (>= 2x the model's input size) before "
                         "resizing; --no-draft decodes every pixel: slower, nearly identical pixels",
                         default_help="default on")
    read_threads: int = option(
        MIN_READ_THREADS, help="threads per worker thread that read and decode images ahead of the model, at most one "
        "decode per CPU at once (and twice as many threads hash files for --dedupe); more hide storage latency")
    share_model: bool = option(False, help="one model copy per machine shared by all worker processes (large models)")
    runtime: str = option(
        "litert", choices=RUNTIMES, help="litert: the model's graph compiled once per model and search settings "
        "(cached under $BATCH_CAPTION_CACHE, default ~/.cache/batch_caption) and run by LiteRT, with no TensorFlow in "
        "the process; tensorflow: TensorFlow runs it (always for --attention_maps, and when a graph does not "
        "compile). Captions are the same; scores differ in float rounding")
    low_score_threshold: float | None = option(
        None, help="captions scoring below this get the low_score flag",
        default_help="default: the bundled model's calibrated threshold, "
        + ", ".join(f"{b.name} {b.low_score}" for b in bundled.BUNDLED.values())
        + "; another bundle gets the default model's")
    attention_maps: bool = option(False, help="models with the attention decoder: each caption record gets "
                                  "'attention', where the decoder looked (grid cells, in percent) as it said each "
                                  "word; the report overlays it")
    dedupe: bool = option(True, help="decode and caption identical bytes under several paths once; every path still "
                          "gets its record", default_help="default on: files are hashed, only paths and hashes are "
                          "shuffled, and one file per hash is read again")
    incremental: bool = option(
        False, help="caption only files that are new or changed since the earlier complete runs under --output (same "
        "path with another size or modification time, or other content); the rest are counted as skipped. Earlier "
        "runs of another model do not count unless --incremental_any_model.")
    incremental_any_model: bool = option(False, help="with --incremental: keep captions made by any model",
                                         default_help="default: a model change re-captions")
    retry_failed: bool = option(
        False, help="with --incremental: read files that failed before even when unchanged",
        default_help="default: a failed file is tried again only once its size or modification time changes, or the "
        "model or decode settings do")
    max_failed_fraction: float = option(
        1.0, help="a run in which a larger share of its inputs failed exits 3 and does not move LATEST, nor is it the "
        "baseline of the next --incremental run", default_help="default 1.0: off")
    break_lock: float | None = None  # seconds: take over an output lock older than this (run.py: --break_lock AGE)
    model_decode: DecodeConfig | None = None  # the model's search defaults (its decode.json), once read

    def __post_init__(self):
        if not self.inputs and not self.input_lists:
            raise UsageError("no input: give --input or --input_list")
        if not self.output:
            raise UsageError("--output must not be empty")
        try:
            self.image_files
        except ValueError as e:
            raise UsageError(f"--extensions: {e}") from e
        try:
            records.check_run_id(self.run_id)
        except ValueError as e:
            raise UsageError(str(e)) from e
        for name in ("batch_size", "max_image_pixels", "max_file_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise UsageError(f"--max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.runtime not in RUNTIMES:
            raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.read_threads < 0:
            raise UsageError(f"--read_threads must be >= 0, got {self.read_threads}")
        try:
            # Search flags that no model accepts; once the model's defaults are known, flags that
            # do not fit them either (a larger n-best than the model's beam).
            (self.model_decode or DecodeConfig(beam_size=MAX_BEAM_SIZE)).overridden(**self.search)
        except ValueError as e:
            raise UsageError(in_flag_names(str(e))) from e

    @property
    def decode(self) -> DecodeConfig:
        """The search settings of this run: its flags over the model's defaults."""
        return (self.model_decode or DecodeConfig()).overridden(**self.search)

    def options(self) -> dict[str, Any]:
        """What the manifest records of the options: every one but output, model and
        run_id, each search flag by its name (None: not given)."""
        options = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("output", "model", "run_id", "search")}
        return {**options, **{flag: self.search.get(name) for flag, name in SEARCH_FLAGS.items()}}

    @property
    def image_files(self) -> ImageFiles:
        return ImageFiles(self.extensions)

    @property
    def run_dir(self) -> str:
        return files.join(self.output, f"run={self.run_id}")


def default_read_threads(paths: list[str]) -> int:
    """REMOTE_READ_THREADS if any path has a scheme other than file://; else one per CPU
    this process may use, at least MIN_READ_THREADS. Decided where the pipeline is built:
    for local paths that is the machine that reads them (the DirectRunner); remote inputs
    are what a cloud runner's workers read, whose CPUs the launcher cannot know."""
    from apache_beam.io.filesystems import FileSystems

    if any(FileSystems.get_scheme(p) not in (None, "file") for p in paths):
        return REMOTE_READ_THREADS
    return max(MIN_READ_THREADS, cpus.available_cpus())


def default_batch_size(image_size: int) -> int:
    """Images per model call when --batch_size is not given: ~BATCH_PIXELS, in [8, 128]."""
    return max(8, min(128, BATCH_PIXELS // (image_size * image_size)))
