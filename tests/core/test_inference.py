"""The caption model handler (what load_model hands to RunInference) and model_loading."""

import gc
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import batch_caption
from batch_caption.core import inference, model_loading
from batch_caption.core.elements import ImageExample
from batch_caption.core.inference import CaptionModelHandler
from batch_caption.model.config import DecodeConfig


def test_load_model_returns_a_traced_captioner(tiny_bundle):
    model = CaptionModelHandler(tiny_bundle, DecodeConfig(), batch_size=4).load_model().result()
    # Traced while loading, so the trace is part of the one-time load and not of the
    # first batch.
    assert model._search.experimental_get_tracing_count() == 1


class _GatedHandler(CaptionModelHandler):
    """load_now sets `entered`, waits for `gate`, then returns `model` or raises `error`."""

    def __init__(self, model=None, error=None):
        super().__init__("unused", DecodeConfig(), batch_size=2)
        self.gate, self.model, self.error = threading.Event(), model, error
        self.entered = threading.Event()

    def load_now(self):
        self.entered.set()
        assert self.gate.wait(30)
        if self.error is not None:
            raise self.error
        return self.model


class _Model:
    def caption(self, pixels):
        return [f"caption {i}" for i in range(len(pixels))]

    def get_model_id(self):
        return "m1"


@pytest.fixture()
def no_file_read_yet(monkeypatch):
    """This process as it is before its first file read (model_loading.work_ahead)."""
    monkeypatch.setattr(model_loading, "_work", threading.Event())
    monkeypatch.setattr(model_loading, "_pending", [])


def test_a_load_waits_for_the_first_file_read(no_file_read_yet):
    calls = []

    def load():
        calls.append(threading.current_thread().name)
        return _Model()

    waiting = model_loading.BackgroundLoad(load)
    threading.Event().wait(0.2)
    assert calls == []  # no file read: nothing loads
    model_loading.work_ahead()
    assert waiting.get_model_id() == "m1" and calls == ["batch_caption-model-load"]
    model_loading.BackgroundLoad(load).result()  # after the first read, a new load starts at once
    assert len(calls) == 2


def test_a_caller_starts_a_load_before_any_file_was_read(no_file_read_yet):
    loading = model_loading.BackgroundLoad(_Model)
    assert loading.get_model_id() == "m1" and loading.wait_load() >= 0
    assert not model_loading._work.is_set()


def test_load_model_returns_before_the_load_ends_and_methods_wait_for_it():
    handler = _GatedHandler(model=_Model())
    loading = handler.load_model()  # would block forever if it loaded in this thread
    done = []
    waiter = threading.Thread(target=lambda: done.append(loading.get_model_id()))
    waiter.start()
    assert handler.entered.wait(30)
    gated_from = time.perf_counter()  # the load started before this: it is waiting at the gate
    waiter.join(0.2)
    assert waiter.is_alive() and not done  # waits for the load
    gated = time.perf_counter() - gated_from  # and ends after this, however busy the machine
    handler.gate.set()
    waiter.join(30)
    assert done == ["m1"] and loading.caption(np.zeros((3, 2, 2, 3), np.uint8)) == ["caption 0", "caption 1", "caption 2"]
    seconds = loading.wait_load()
    assert seconds >= gated > 0 and loading.wait_load() is None  # the load's time, reported once


def test_a_failed_background_load_raises_model_load_error_from_every_wait():
    handler = _GatedHandler(error=OSError("weights unreadable"))
    loading = handler.load_model()
    handler.gate.set()
    for call in (loading.wait_load, loading.get_model_id, lambda: loading.caption(np.zeros((1, 2, 2, 3), np.uint8))):
        with pytest.raises(model_loading.ModelLoadError, match="the model failed to load: OSError: weights unreadable"):
            call()


def test_after_a_raised_failure_the_next_wait_loads_again_up_to_a_limit():
    # Beam's Shared hands the same object to a retried bundle's DoFn: a transient failure
    # must not stick for the life of the worker, and a permanent one must not reload forever.
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("storage hiccup")
        return _Model()

    loading = model_loading.BackgroundLoad(flaky)
    with pytest.raises(model_loading.ModelLoadError, match="storage hiccup"):
        loading.get_model_id()
    assert loading.get_model_id() == "m1" and loading.get_model_id() == "m1" and len(calls) == 2

    broken = []

    def always_broken():
        broken.append(1)
        raise OSError("weights unreadable")

    loading = model_loading.BackgroundLoad(always_broken)
    for _ in range(model_loading.BackgroundLoad.MAX_ATTEMPTS + 2):
        with pytest.raises(model_loading.ModelLoadError, match="weights unreadable"):
            loading.wait_load()
    assert len(broken) == model_loading.BackgroundLoad.MAX_ATTEMPTS


def test_the_first_batch_reports_the_load_and_its_wait(monkeypatch):
    reported = []

    class _Dist:
        def __init__(self, name):
            self.name = name

        def update(self, value):
            reported.append((self.name, value))

    monkeypatch.setattr(inference.Metrics, "distribution", staticmethod(lambda ns, name: _Dist(name)))
    handler = _GatedHandler(model=_Model())
    loading = handler.load_model()
    threading.Timer(0.3, handler.gate.set).start()
    batch = [ImageExample(f"p{i}", np.zeros((2, 2, 3), np.uint8), 2, 2, "PNG", "0" * 64, 1) for i in range(2)]
    results = list(handler.run_inference(batch, loading))
    assert [r.inference for r in results] == ["caption 0", "caption 1"]
    names = dict(reported)
    assert set(names) == {"model_wait_ms", "model_load_ms", "first_caption_ms"} and names["model_wait_ms"] >= 250
    assert names["first_caption_ms"] >= names["model_wait_ms"]  # counted from the package's import
    assert names["model_load_ms"] + 50 >= names["model_wait_ms"]  # the wait began after the load (up to a late wake-up)
    list(handler.run_inference(batch, loading))
    assert len(reported) == 3  # later batches report nothing
    # A stand-in model without wait_load (tests, other handlers' models) reports its first captions only.
    list(_GatedHandler().run_inference(batch, _Model()))
    assert [name for name, _ in reported[3:]] == ["first_caption_ms"]


_FIRST_LOADS = """
import gc, json, sys
import batch_caption.model.load as load
from batch_caption.core.inference import CaptionModelHandler
from batch_caption.model.config import DecodeConfig

real, gc_on = load.load_captioner, []
def spy(*args, **kwargs):
    gc_on.append(gc.isenabled())
    return real(*args, **kwargs)
load.load_captioner = spy
handler = CaptionModelHandler(sys.argv[1], DecodeConfig(), batch_size=2)
assert gc.get_freeze_count() == 0
handler.load_model().result()
frozen = gc.get_freeze_count()
handler.load_model().result()
print(json.dumps([gc_on, gc.isenabled(), frozen, gc.get_freeze_count()]))
"""


def test_the_first_model_load_runs_without_gc_then_freezes_what_it_made(tiny_bundle):
    # A fresh process: the first load imports TensorFlow (hundreds of thousands of
    # long-lived objects) with the cyclic GC off, then freezes them; a second load does
    # neither.
    out = subprocess.run([sys.executable, "-c", _FIRST_LOADS, tiny_bundle], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    gc_on, enabled, frozen, frozen_after = json.loads(out.stdout.splitlines()[-1])
    assert gc_on == [False, True] and enabled
    # Frozen objects can still be freed; a second freeze would add the second model's.
    assert frozen > 100_000 and frozen_after <= frozen


def test_a_failed_first_load_turns_gc_on_again_and_freezes_nothing(monkeypatch):
    freezes = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1))  # not this test process's objects
    monkeypatch.setattr(model_loading, "_gc_frozen", False)
    with pytest.raises(OSError, match="weights unreadable"):
        with model_loading.gc_frozen_after_first_load():
            assert not gc.isenabled()
            raise OSError("weights unreadable")
    assert gc.isenabled() and not freezes and not model_loading._gc_frozen
    with model_loading.gc_frozen_after_first_load():  # the next load is the first again
        assert not gc.isenabled()
    assert gc.isenabled() and freezes == [1] and model_loading._gc_frozen


def test_a_bundled_model_is_resolved_on_the_worker_not_the_driver():
    """The driver sends a marker, which each worker resolves to its own installed copy."""
    from batch_caption import bundled

    here = os.path.join(os.path.dirname(batch_caption.__file__), "models", "scenes")
    assert bundled.portable(os.path.abspath(here)) == "bundled:scenes"
    assert bundled.resolve("bundled:scenes") == os.path.abspath(here)
    assert bundled.portable("gs://b/m") == "gs://b/m" and bundled.resolve("gs://b/m") == "gs://b/m"
