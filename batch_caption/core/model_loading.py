"""Loading a model on a worker: in the background, once per process, with the GC frozen after.

    BackgroundLoad               a load in a thread of its own; callers wait for it
    work_ahead                   this process has images coming: pending loads start
    ModelLoadError               a failed load: the run fails, no image is blamed
    gc_frozen_after_first_load   the process's first load runs without the cyclic GC
    quiet_beam_memory_warning    drops a Beam warning repeated on every model load
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any


class _DropBeamResourceWarning(logging.Filter):
    """Beam (2.77) disables its memory probe when torch is absent (model_manager imports torch in
    the same try block as `resource`) and then warns on every model load."""

    def filter(self, record):
        return "Resource module is not available" not in record.getMessage()


_RESOURCE_FILTER = _DropBeamResourceWarning()


def quiet_beam_memory_warning() -> None:
    """Installs the filter on the root logger (once)."""
    root = logging.getLogger()
    if _RESOURCE_FILTER not in root.filters:
        root.addFilter(_RESOURCE_FILTER)


_gc_lock = threading.Lock()
_gc_frozen = False  # set by the first load that ends well, under _gc_lock


@contextlib.contextmanager
def gc_frozen_after_first_load():
    """The process's first model load, without cyclic garbage collections, then gc.freeze().

    That load imports TensorFlow and builds and traces the model: hundreds of thousands of
    objects that live as long as the process, which every full collection would walk
    again; frozen, they are left out of every later collection. No gc.collect() first (it
    would be one more such walk): what is garbage in cycles at that moment, and what then
    lives in cycles (the current run's pipeline objects, including those made while the
    load ran beside them: the GC is off for the whole process meanwhile), stays
    allocated, once per process. Later loads, and loads that start while the first is
    running, change nothing; a failed first load freezes nothing.
    """
    global _gc_frozen
    with _gc_lock:
        first = not _gc_frozen
        _gc_frozen = True  # claimed: concurrent loads leave the GC alone
    if not first:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    except BaseException:
        with _gc_lock:
            _gc_frozen = False  # a later load may try again
        raise
    else:
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


class ModelLoadError(RuntimeError):
    """The model failed to load: the run fails; no image is blamed for it."""


# A process's loads wait for the first sign of work (`work_ahead`): a run with nothing to
# caption (an incremental night without changes) then never loads the model at all.
_work = threading.Event()
_pending: list["BackgroundLoad"] = []
_pending_lock = threading.Lock()


def work_ahead() -> None:
    """Says this process is about to caption images (the job's readers call it on their
    first file): the loads waiting for work start now, later ones at once."""
    if _work.is_set():
        return
    with _pending_lock:
        _work.set()
        pending, _pending[:] = list(_pending), []
    for load in pending:
        load.begin()


class _LoadAttempt:
    """One run of a BackgroundLoad's load function."""

    def __init__(self):
        self.done = threading.Event()
        self.model: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.raised = False  # its failure has reached a caller

    def failed_and_raised(self) -> bool:
        return self.done.is_set() and self.model is None and self.raised


class BackgroundLoad:
    """A model loading in a thread of its own; `caption` and `get_model_id` wait for it.

    RunInference loads its model in its DoFn's setup, and the in-memory runner sets up
    every DoFn of a fused stage before the first element: reading and decoding would wait
    for the whole load (mostly Python: building and tracing, leaving other cores idle).
    Returned from `load_model` at once, this lets the decode threads fill the first
    batches while the model is built and traced. The load starts with the process's first
    file to read (`work_ahead`), or with the first wait, whichever comes first: a run
    that reads nothing never loads.

    A failed load raises ModelLoadError from the methods that wait;
    `dead_letters.FailedBatchToErrorsFn` lets that error fail the bundle instead of turning
    the batch into error records. Beam's `Shared` keeps handing this object to the
    process's later DoFn instances, such as a retried bundle's, so once a failure has
    been raised the next wait loads again (up to MAX_ATTEMPTS loads): a transient error
    (a storage hiccup reading the weights) does not stick for the life of the worker.
    Only methods cross a --share_model proxy.
    """

    MAX_ATTEMPTS = 3

    def __init__(self, load: Callable[[], Any]):
        self._load_fn = load
        self._lock = threading.Lock()
        self._attempts = 0
        self._reported = False
        self._attempt: _LoadAttempt | None = None
        with _pending_lock:
            waiting = not _work.is_set()
            if waiting:
                _pending.append(self)
        if not waiting:
            self.begin()

    def begin(self) -> None:
        """Starts the load unless it has started."""
        with self._lock:
            if self._attempt is None:
                self._attempt = self._start()

    def _start(self) -> _LoadAttempt:
        attempt = _LoadAttempt()
        self._attempts += 1
        # Not a daemon: a process that ends mid-load waits for it, as it would for a load
        # in setup (TensorFlow stopped mid-trace can crash at exit).
        threading.Thread(target=self._run, args=(attempt,), name="batch_caption-model-load").start()
        return attempt

    def _run(self, attempt: _LoadAttempt) -> None:
        start = time.perf_counter()
        try:
            attempt.model = self._load_fn()
        except BaseException as e:  # raised again, by whoever waits
            attempt.error = e
        finally:
            attempt.seconds = time.perf_counter() - start
            attempt.done.set()

    def _wait(self) -> _LoadAttempt:
        with self._lock:
            if self._attempt is None:  # a caller needs the model before any file was read
                self._attempt = self._start()
            attempt = self._attempt
            if attempt.failed_and_raised() and self._attempts < self.MAX_ATTEMPTS:
                attempt = self._attempt = self._start()
        attempt.done.wait()
        if attempt.model is None:
            attempt.raised = True
            e = attempt.error
            reason = f"{type(e).__name__}: {e}" if e is not None else "the loading thread ended without a model"
            raise ModelLoadError(f"the model failed to load: {reason}") from e
        return attempt

    def result(self) -> Any:
        """The loaded model (in this process only: it does not pickle)."""
        return self._wait().model

    def wait_load(self) -> float | None:
        """Waits for the load; its seconds to the first caller, None to later ones."""
        attempt = self._wait()
        with self._lock:
            first, self._reported = not self._reported, True
        return attempt.seconds if first else None

    def caption(self, pixels):
        return self.result().caption(pixels)

    def get_model_id(self) -> str:
        return self.result().get_model_id()
