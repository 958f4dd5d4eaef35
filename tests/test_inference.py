"""The caption model handler: what load_model hands to RunInference."""

import gc
import json
import os
import subprocess
import sys

import pytest

from batch_caption import inference
from batch_caption.inference import CaptionModelHandler
from batch_caption.model.config import DecodeConfig


def test_load_model_returns_a_traced_captioner(tiny_bundle):
    model = CaptionModelHandler(tiny_bundle, DecodeConfig(), batch_size=4).load_model()
    # Traced while loading, so the trace counts in Beam's load_model latency and not
    # in the first batch.
    assert model._search.experimental_get_tracing_count() == 1


_FIRST_LOADS = """
import gc, json, sys
import batch_caption.model.bundle as bundle
from batch_caption.inference import CaptionModelHandler
from batch_caption.model.config import DecodeConfig

real, gc_on = bundle.load_captioner, []
def spy(*args, **kwargs):
    gc_on.append(gc.isenabled())
    return real(*args, **kwargs)
bundle.load_captioner = spy
handler = CaptionModelHandler(sys.argv[1], DecodeConfig(), batch_size=2)
assert gc.get_freeze_count() == 0
handler.load_model()
frozen = gc.get_freeze_count()
handler.load_model()
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
    monkeypatch.setattr(inference, "_gc_frozen", False)
    with pytest.raises(OSError, match="weights unreadable"):
        with inference.gc_frozen_after_first_load():
            assert not gc.isenabled()
            raise OSError("weights unreadable")
    assert gc.isenabled() and not freezes and not inference._gc_frozen
    with inference.gc_frozen_after_first_load():  # the next load is the first again
        assert not gc.isenabled()
    assert gc.isenabled() and freezes == [1] and inference._gc_frozen
