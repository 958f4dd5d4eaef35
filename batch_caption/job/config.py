"""JobConfig: the captioning job's own options (Beam's live in PipelineOptions), and the
defaults that depend on the machine or the model."""

from __future__ import annotations

import dataclasses

from batch_caption import files, image_formats, records
from batch_caption.cli import UsageError
from batch_caption.job import cpus
from batch_caption.job.image_files import ImageFiles
from batch_caption.model.config import MAX_BEAM_SIZE, RUNTIMES, DecodeConfig

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
    """The job's own options.

    inputs: patterns after resolution (directories become recursive globs).
    extensions: which listed files are inputs (job/image_files.py); None: every file.
    """

    inputs: tuple[str, ...]
    input_lists: tuple[str, ...]
    output: str
    model: str
    run_id: str
    extensions: tuple[str, ...] | None = image_formats.DEFAULT_EXTENSIONS
    # Search settings: None takes the model's default (`model_decode`), else DecodeConfig's.
    beam_size: int | None = None
    max_caption_length: int | None = None
    num_alternatives: int | None = None  # None: the model's, cut to the beam size
    length_normalization: float | None = None
    forbid_unknown: bool | None = None
    batch_size: int | None = None  # None: default_batch_size(the model's image size)
    max_image_pixels: int = 100_000_000
    max_file_bytes: int = 256 * 1024 * 1024
    draft: bool = True
    read_threads: int = MIN_READ_THREADS  # run.parse gives default_read_threads(the inputs)
    share_model: bool = False
    runtime: str = "litert"  # what runs the model: RUNTIMES
    low_score_threshold: float | None = None  # None: the model's own (bundled.low_score_threshold)
    attention_maps: bool = False  # attention decoder: each record gets its best caption's maps
    dedupe: bool = True
    incremental: bool = False
    incremental_any_model: bool = False
    retry_failed: bool = False  # incremental: read files that failed before although unchanged
    max_failed_fraction: float = 1.0  # a larger failed share: exit 3, LATEST stays
    break_lock: float | None = None  # seconds: take over an output lock older than this
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
            self._check_decode()
        except ValueError as e:
            raise UsageError(str(e).replace("max_length", "max_caption_length")) from e

    def _check_decode(self) -> None:
        """Raises ValueError for search flags no model accepts; once the model's defaults are
        known (`model_decode`), for flags that do not fit them either (a larger n-best than
        the model's beam)."""
        (self.model_decode or DecodeConfig(beam_size=MAX_BEAM_SIZE)).with_flags(self)

    @property
    def decode(self) -> DecodeConfig:
        """The search settings of this run: its flags over the model's defaults."""
        return (self.model_decode or DecodeConfig()).with_flags(self)

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
