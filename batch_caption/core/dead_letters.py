"""RunInference's dead letters -> error records, shared by every pipeline that runs a model.

Inference failures come back from RunInference's dead-letter output, one failed batch at
a time; each image of such a batch becomes an error record (stage infer), except when the
model itself failed to load: that fails the run rather than blaming every image.
"""

from __future__ import annotations

import apache_beam as beam

from batch_caption import records
from batch_caption.core.elements import counter
from batch_caption.core.model_loading import ModelLoadError


class FailedBatchToErrorsFn(beam.DoFn):
    """(failed batch, exception) from RunInference's dead letters -> one record per image."""

    def __init__(self, run_id: str):
        self._run_id = run_id

    def process(self, failure):
        batch, exc = failure
        name, message = describe_failure(exc)
        if is_model_load_failure(exc):
            # The model, not these images: fail the run (as a load in setup would) rather
            # than write every image of the run as an error.
            lines = _failure_parts(exc)[1]
            raise ModelLoadError(message + ("\n" + "".join(lines) if lines else ""))
        for example in batch:
            for source in example.source_files():
                counter("failed_infer").inc()
                yield infer_error(example, source, name, message, self._run_id)


def infer_error(example, source, error, message: str | None, run_id: str):
    """The error record (stage infer) of one file of `example`."""
    return records.error_record(source.path, "infer", error, message, run_id=run_id,
                                size=source.size if source.size is not None else example.size_bytes,
                                modified=source.modified, sha256=example.sha256)


def _failure_parts(exc) -> tuple[type | None, list[str]]:
    """(exception class, traceback lines) of RunInference's dead-letter exception info,
    (exception type, repr, traceback lines); (None, []) for anything else."""
    if isinstance(exc, tuple) and exc and isinstance(exc[0], type):
        return exc[0], list(exc[2]) if len(exc) > 2 and isinstance(exc[2], (list, tuple)) else []
    return None, []


def is_model_load_failure(exc) -> bool:
    """Whether a dead letter's exception (or exception info) is a ModelLoadError."""
    kind = type(exc) if isinstance(exc, BaseException) else _failure_parts(exc)[0]
    return kind is not None and issubclass(kind, ModelLoadError)


def describe_failure(exc) -> tuple[str, str]:
    """RunInference's dead letters carry (exception type, repr, traceback lines), not the
    exception itself (it may not pickle): recover the class name and the message."""
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc) or type(exc).__name__
    kind, lines = _failure_parts(exc)
    if kind is not None:
        name = kind.__name__
        last = lines[-1].strip() if lines else ""
        # traceback names classes outside builtins with their module: "pkg.mod.Name: msg".
        prefixes = (name + ": ", f"{kind.__module__}.{kind.__qualname__}: ")
        prefix = next((x for x in prefixes if last.startswith(x)), None)
        message = last[len(prefix):] if prefix else (str(exc[1]) if len(exc) > 1 else name)
        return name, message
    return type(exc).__name__, str(exc)
