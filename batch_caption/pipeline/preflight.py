"""Checks before a run starts: inputs, output, model, paths a remote runner can see.

Each raises `UsageError` with one line naming the flag, so that a run that cannot work
stops before the pipeline is built (exit 2, nothing started).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

from batch_caption import bundled
from batch_caption.cli import UsageError
from batch_caption.pipeline.config import JobConfig
from batch_caption.storage import files

_GLOB_CHARS = set("*?[")


def resolve_inputs(config: JobConfig) -> JobConfig:
    """Checks every input before work starts; directories become recursive globs."""
    from apache_beam.io.filesystems import FileSystems

    resolved = []
    for pattern in config.inputs:
        candidates = [pattern]
        if pattern.endswith("/"):
            candidates = [pattern + "**"]
        elif not (set(pattern) & _GLOB_CHARS):
            if not files.is_remote(pattern) and os.path.isdir(pattern):
                candidates = [os.path.join(pattern, "**")]
            elif files.is_remote(pattern):
                candidates = [pattern, pattern.rstrip("/") + "/**"]  # an object, or a prefix
        for candidate in candidates:
            try:
                found = FileSystems.match([candidate], limits=[1])[0].metadata_list
            except Exception as e:
                raise UsageError(f"cannot list --input {pattern}: {e}") from e
            if found:
                resolved.append(candidate)
                break
        else:
            raise UsageError(f"--input {pattern} matches no file")
        if _within_output(pattern, config.output):
            raise UsageError(f"--input {pattern} lies inside --output {config.output}: the job would read its own output")
    for list_file in config.input_lists:
        if not files.exists(list_file):
            raise UsageError(f"--input_list {list_file} does not exist")
        mode = None if files.is_remote(list_file) else os.stat(list_file).st_mode
        if mode is not None and not stat.S_ISREG(mode):
            raise UsageError(f"--input_list {files.not_regular(list_file, mode)}")
    return dataclasses.replace(config, inputs=tuple(resolved))


def _within_output(pattern: str, output: str) -> bool:
    """Whether everything `pattern` can match lies in the output tree (an output inside
    an input is fine: listing leaves it out, listing.Outside)."""
    fixed = pattern
    for i, c in enumerate(pattern):
        if c in _GLOB_CHARS:
            fixed = pattern[:i].rsplit("/", 1)[0]  # the directory above the first wildcard
            break
    if files.is_remote(pattern) or files.is_remote(output):
        return (fixed.rstrip("/") + "/").startswith(output.rstrip("/") + "/")
    real, top = os.path.realpath(fixed), os.path.realpath(output)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def check_remote_paths(config: JobConfig, options) -> None:
    """On Dataflow, workers read the inputs and write the output on machines of their own:
    a local --output, --input, --input_list or --model would be the worker's disk, not
    this one's. A bundled model travels with the package."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner or ""
    if runner.lower().removesuffix("runner") != "dataflow":
        return
    named = [("--output", config.output), *(("--input", p) for p in config.inputs),
             *(("--input_list", p) for p in config.input_lists)]
    if bundled.find(config.model) is None:
        named.append(("--model", config.model))
    for flag, path in named:
        if not files.is_remote(path) or path.startswith("file://"):
            raise UsageError(f"{flag} {path}: {runner} workers cannot see this machine's files; use a gs:// path")


def check_model(path: str) -> tuple[str, Any, Any]:
    """(bundle id, ModelConfig, its search defaults or None) of the bundle at `path`: every
    file read and checked against its hash here, so a broken bundle stops the run before
    any work."""
    from batch_caption.model import bundle

    known = bundled.find(path)
    if known and not known.installed():
        raise UsageError(f"--model {known.name}: this installation has no bundled model {known.name}")
    if not known and not files.is_remote(path) and not os.path.exists(path):
        raise UsageError(f"--model {path}: no such bundle directory, nor a bundled model "
                         f"({', '.join(bundled.BUNDLED)})")
    try:
        manifest, config, decode = bundle.verify_bundle_with_defaults(path)
    except (bundle.BundleError, OSError) as e:
        raise UsageError(f"--model {path}: {e}") from e
    return manifest["bundle_id"], config, decode


def check_output(config: JobConfig) -> None:
    """Writes and deletes a probe file in the run's directory, so that an --output that
    cannot be written stops the run before any work, not at its first shard (written the
    same way, through FileSystems)."""
    from apache_beam.io.filesystems import FileSystems

    probe = files.join(config.run_dir, ".write_check")
    try:
        with FileSystems.create(probe) as f:
            f.write(b"batch_caption\n")
        FileSystems.delete([probe])
    except Exception as e:  # each filesystem raises its own types (OSError, BeamIOError, GCS errors)
        raise UsageError(f"--output {config.output}: cannot write there: {e}") from e
