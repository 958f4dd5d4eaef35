"""`python -m batch_caption.run`: caption image collections with a Beam pipeline.

    python -m batch_caption.run --input photos/ --output out/ [--model NAME|BUNDLE] [Beam options]

Writes OUTPUT/run=<run_id>/captions-*.jsonl, errors-*.jsonl, catalog-*.parquet and,
last, manifest.json; then OUTPUT/LATEST names the run. With no input flags it captions
the bundled model's sample images into ./captions/ (batch_caption/bundled.py).
Exit codes: 0 the run completed (per-image errors are data, in errors-*.jsonl);
2 bad flags / missing model / input matching nothing / another run holds the output's
lock / a gs:// path without Google Cloud credentials / a Dataflow runner without the
dataflow extra (nothing was started); 1 the pipeline itself failed (a listing that failed, say);
3 the run completed but more than --max_failed_fraction of its inputs failed (LATEST
stays where it was).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time

from batch_caption import bundled, cli, quiet
from batch_caption.cli import UsageError
from batch_caption.core.elements import NAMESPACE
from batch_caption.images import formats
from batch_caption.model.config import DecodeConfig, given_search_flags
from batch_caption.model.registry import DECODERS
from batch_caption.pipeline import JobConfig, build_pipeline
from batch_caption.pipeline.config import MIN_READ_THREADS, REMOTE_READ_THREADS, default_read_threads
from batch_caption.pipeline.image_files import parse_extensions
from batch_caption.pipeline.preflight import check_model, check_output, check_remote_paths, resolve_inputs
from batch_caption.storage import gcs, lock, run_dirs

EXIT_TOO_MANY_FAILED = 3
_log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m batch_caption.run",
        description="Caption images in batch (CNN encoder + LSTM decoder with beam search) with Apache Beam. "
        "Every input gets a caption record or an error record.",
        epilog="Any Apache Beam pipeline option may be added, e.g. --runner=DataflowRunner --project=... "
        "--region=... --temp_location=gs://..., or --direct_num_workers=2 --direct_running_mode=multi_processing. "
        "Default runner: DirectRunner.",
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--input", action="append", default=[], metavar="PATH",
                    help="image file, glob, or directory (read recursively); local, gs:// or any Beam filesystem. "
                    "A glob or directory gives its image files (see --extensions); a file named alone is an input "
                    "whatever its name. Repeatable.")
    io.add_argument("--input_list", action="append", default=[], metavar="FILE",
                    help="text file of image paths, one a line ('#' comments allowed); every path is an input, "
                    "whatever its extension (one that is not an image gets an error record). Repeatable.")
    which = io.add_mutually_exclusive_group()
    which.add_argument("--extensions", default=None, metavar="EXT,...",
                       help="the file name extensions (case-insensitive) that make a listed file an input; a file "
                       "without an extension is one when its first bytes are an image in one of their formats; "
                       "other files are skipped unopened and counted (default: those of every image format: "
                       f"{', '.join(formats.DEFAULT_EXTENSIONS)})")
    which.add_argument("--all_files", action="store_true",
                       help="every listed file is an input, whatever its name (a file that is not an image gets an "
                       "error record)")
    io.add_argument("--output", default=None, help="output directory; the run goes to OUTPUT/run=<run_id>/ (default ./captions)")
    io.add_argument("--run_id", default=None, help="run name (default: UTC timestamp). Re-using one replaces that run's files.")
    m = p.add_argument_group("model and decoding")
    m.add_argument("--model", default=None, metavar="NAME|BUNDLE",
                   help=f"a bundled model by name ({', '.join(bundled.BUNDLED)}; default {bundled.DEFAULT_MODEL_NAME}) "
                   "or a model bundle directory, local or gs:// (./NAME for a directory named like a bundled model)")
    cli.add_flags(m, JobConfig, ["low_score_threshold", "attention_maps"])
    search = p.add_argument_group("search", "A bundle's decode.json gives the search settings its model was tuned "
                                  "with; each of these flags overrides one.")
    cli.add_flags(search, DecodeConfig, unset="the model's, else {}")
    n = p.add_argument_group("incremental runs and duplicates")
    cli.add_flags(n, JobConfig, ["incremental", "incremental_any_model", "retry_failed", "max_failed_fraction"])
    n.add_argument("--break_lock", default=None, metavar="AGE",
                   help="take over the output's lock when it is older than AGE (90s, 45m, 6h, 2d): for a lock left "
                   "by a run that was killed. Default: a held lock stops the run (exit 2, the holder named)")
    cli.add_flags(n, JobConfig, ["dedupe"])
    r = p.add_argument_group("resources")
    cli.add_flags(r, JobConfig, ["batch_size", "max_image_pixels", "max_file_bytes", "draft", "read_threads",
                                 "share_model", "runtime"],
                  unset={"read_threads": f"one per CPU of this machine, at least {MIN_READ_THREADS}, or "
                         f"{REMOTE_READ_THREADS} when an --input or --input_list is on a remote filesystem such as "
                         "gs://; 0: inline"})
    quiet.add_verbose_flag(p)
    return p


def parse(argv: list[str] | None):
    """argv -> (JobConfig, beam PipelineOptions). Raises UsageError on any bad flag."""
    args, options = cli.parse_with_pipeline_options(build_parser(), argv)
    try:
        model = bundled.resolve(args.model or bundled.DEFAULT_MODEL_NAME)
    except KeyError as e:
        raise UsageError(f"--model {args.model}: {e.args[0]}") from e
    if not args.input and not args.input_list:
        samples = bundled.find(model) or bundled.default()
        args.input = samples.sample_files() or [samples.samples_dir]  # none: the check names the directory
    output = args.output or "captions"
    try:
        break_lock = lock.parse_age(args.break_lock) if args.break_lock is not None else None
    except ValueError as e:
        raise UsageError(f"--break_lock: {e}") from e
    try:
        extensions = None if args.all_files else (
            formats.DEFAULT_EXTENSIONS if args.extensions is None else parse_extensions(args.extensions))
    except ValueError as e:
        raise UsageError(f"--extensions {args.extensions!r}: {e}") from e
    config = cli.from_args(
        JobConfig, args,
        inputs=tuple(args.input),
        input_lists=tuple(args.input_list),
        output=output,
        model=model,
        extensions=extensions,
        run_id=args.run_id or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        search=given_search_flags(args),
        read_threads=args.read_threads if args.read_threads is not None else default_read_threads(
            [*args.input, *args.input_list]),
        break_lock=break_lock,
    )
    return config, options


def run(argv: list[str] | None = None) -> dict:
    """Runs the job; returns the manifest. Raises UsageError before any work on bad input."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    from batch_caption.pipeline import progress

    config, options = parse(argv)
    check_remote_paths(config, options)
    cli.require_runner(options)
    gcs.require_credentials([*config.inputs, *config.input_lists, config.output, config.model])
    gcs.configure_for_emulator()
    model_id, model_config, model_decode = check_model(config.model)
    config = dataclasses.replace(config, model_decode=model_decode)  # validates the flags against it
    if config.attention_maps and not DECODERS[model_config.decoder].attention_maps:
        raise UsageError(f"--attention_maps needs a model with the {DECODERS.which(lambda d: d.attention_maps)} "
                         f"decoder; {config.model} has {model_config.decoder}")
    config = resolve_inputs(config)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "DirectRunner"
    direct = standard.runner in ("DirectRunner", "BundleBasedDirectRunner")
    mode = options.view_as(DirectOptions).direct_running_mode
    single_process = direct and mode in (None, "in_memory")
    worker_processes = direct and mode == "multi_processing"  # they send the driver their counts
    progress.reset()
    try:
        output_lock = lock.OutputLock(config.output, config.run_id).acquire(config.break_lock)
    except lock.LockHeld as e:
        raise UsageError(f"--output {config.output}: another run writes there: {e}") from e
    except Exception as e:  # each filesystem raises its own types (OSError, BeamIOError, GCS errors)
        raise UsageError(f"--output {config.output}: cannot write there: {e}") from e
    try:
        return _run_locked(config, options, model_id, model_config, single_process, worker_processes)
    finally:
        output_lock.release()


def _run_locked(config: JobConfig, options, model_id: str, model_config, single_process: bool,
                worker_processes: bool) -> dict:
    """The run, once this process holds the output's lock. worker_processes: the stages
    run in worker processes of this run (the multi-processing DirectRunner), whose counts
    reach the progress line through a progress_channel.Channel."""
    import apache_beam as beam

    from batch_caption.pipeline.shards import remove_stale_temp_dirs

    # Before the probe write: a failed run's leftovers may be what keeps the disk full.
    try:
        removed = remove_stale_temp_dirs(config.output)
    except (OSError, ValueError) as e:  # BeamIOError is an OSError
        raise UsageError(f"--output {config.output}: cannot remove failed runs' temporary files: {e}") from e
    if removed:
        _log.warning("removed %d temporary files that failed runs left under %s", removed, config.output)
    check_output(config)  # nothing of an earlier attempt is deleted for a run that cannot start
    try:
        earlier = run_dirs.complete_runs(config.output, other_than=config.run_id)
        baseline = run_dirs.baseline(earlier) if config.incremental else None
        run_dirs.release_latest(config.output, config.run_id, earlier)
        run_dirs.clear_run_dir(config.run_dir)
    except (OSError, ValueError) as e:  # BeamIOError is an OSError
        raise UsageError(f"--output {config.output}: cannot read or clear the earlier runs there: {e}") from e
    started = time.time()
    from batch_caption.pipeline import progress
    from batch_caption.pipeline.progress_channel import Channel

    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, config, model_id, model_config.image_size, single_process, baseline,
                   report_progress=single_process or worker_processes)
    try:
        with Channel(progress.reporter()) if worker_processes else contextlib.nullcontext():
            result = pipeline.run()
        progress.follow(result, job_metrics, progress.reporter())  # a remote job: from its counters
    finally:
        progress.reporter().close()
    manifest = run_dirs.read_run(config.run_dir).manifest
    if not manifest.get("rejected"):
        run_dirs.point_latest(config.output, config.run_id)  # the run is complete: LATEST names it
    manifest["elapsed_seconds"] = round(time.time() - started, 3)
    manifest["metrics"] = job_metrics(result)
    return manifest


def job_metrics(result) -> dict[str, int]:
    """The job's Beam counters, and the model's one-time cost: model_loads and
    model_load_ms (how many loads, and their time summed over processes; a load includes
    the graph's trace), model_wait_ms (how long batches waited for a load: the load runs
    beside the first decodes, so this, not model_load_ms, is what it added to the run;
    summed over DoFn instances, whose waits overlap when several run at once),
    first_caption_ms (from a process's import of the package to its first captions; the
    earliest of the processes: for a command on the DirectRunner, its start-up). A run that
    captions nothing reports no load; its load still runs, and the process waits for it
    at exit. Beam's own load-latency metric times only the start of the load."""
    from apache_beam.metrics.metric import MetricsFilter

    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    out: dict[str, int] = {}
    for c in metrics["counters"]:
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + (c.committed or c.attempted or 0)
    for d in metrics["distributions"]:
        name, value = d.key.metric.name, d.committed or d.attempted
        if name == "first_caption_ms":  # the earliest process's
            if value and value.count:
                out[name] = min(out.get(name, value.min), value.min)
        elif name in ("model_load_ms", "model_wait_ms"):
            out[name] = out.get(name, 0) + (value.sum if value else 0)
            if name == "model_load_ms":
                out["model_loads"] = out.get("model_loads", 0) + (value.count if value else 0)
    return out


def summary(manifest: dict) -> str:
    c = manifest["counts"]
    rate = c["inputs"] / manifest["elapsed_seconds"] if manifest.get("elapsed_seconds") else 0.0
    failed = ", ".join(f"{s} {n}" for s, n in c["failed_by_stage"].items() if n)
    notes = []
    if c.get("skipped", 0):  # incremental: the files already captioned, carried as they were
        notes.append(f"{c['skipped']:,} unchanged")
    if c.get("skipped_not_image", 0):
        notes.append(f"{c['skipped_not_image']:,} non-image files skipped")
    return (
        f"run={manifest['run_id']}: {c['inputs']:,} inputs, {c['captioned']:,} captioned, {c['failed']:,} failed"
        f"{f' ({failed})' if failed else ''} in {manifest.get('elapsed_seconds', 0):.1f} s ({rate:.1f} img/s), "
        f"model {manifest['model']}{''.join(f'; {n}' for n in notes)}"
    )


def main(argv: list[str] | None = None) -> int:
    quiet.setup_when_command_line(argv)
    code, manifest = cli.run_job("batch_caption.run", lambda: run(argv))
    if code != 0:
        return code
    print(summary(manifest))
    if manifest.get("rejected"):
        print(f"batch_caption.run: LATEST not moved: {manifest['rejected']}", file=sys.stderr)
        return EXIT_TOO_MANY_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
