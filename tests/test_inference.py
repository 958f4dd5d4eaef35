"""The caption model handler: what load_model hands to RunInference."""

from batch_caption.inference import CaptionModelHandler
from batch_caption.model.config import DecodeConfig


def test_load_model_returns_a_traced_captioner(tiny_bundle):
    model = CaptionModelHandler(tiny_bundle, DecodeConfig(), batch_size=4).load_model()
    # Traced while loading, so the trace counts in Beam's load_model latency and not
    # in the first batch.
    assert model._search.experimental_get_tracing_count() == 1
