import pytest

from batch_caption.model.config import DecodeConfig, ModelConfig


def test_model_config_round_trips_through_dict():
    c = ModelConfig(vocab_size=50, encoder="mobilenet_v3_small", image_size=128, encoder_weights="gs://b/w.weights.h5")
    assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(encoder="vgg"), "unknown encoder"),
        (dict(vocab_size=3), "vocab_size"),
        (dict(image_size=8), "image_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(lstm_units=0), "lstm_units"),
        (dict(small_cnn_grid=0), "small_cnn_grid must be in"),
        (dict(small_cnn_grid=9), "small_cnn_grid must be in"),
        (dict(encoder="resnet50", small_cnn_grid=3), "only applies to small_cnn"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"vocab_size": 50, **kwargs})


def test_model_config_rejects_unknown_version_and_keys():
    d = ModelConfig(vocab_size=50).to_dict()
    with pytest.raises(ValueError, match="format_version"):
        ModelConfig.from_dict({**d, "format_version": 99})
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**d, "colour": 1})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beam_size=0), "beam_size"),
        (dict(beam_size=2, num_alternatives=3), "num_alternatives"),
        (dict(max_length=0), "max_length"),
        (dict(length_normalization=-1), "length_normalization"),
    ],
)
def test_decode_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


def test_image_input_defaults_to_first_when_a_bundle_predates_it():
    d = ModelConfig(vocab_size=50, image_input="every_step").to_dict()
    assert ModelConfig.from_dict(d).image_input == "every_step"
    del d["image_input"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(d).image_input == "first"


def test_small_cnn_grid_defaults_to_4_when_a_bundle_predates_it():
    d = ModelConfig(vocab_size=50, small_cnn_grid=3).to_dict()
    assert d["small_cnn_grid"] == 3 and ModelConfig.from_dict(d).small_cnn_grid == 3
    del d["small_cnn_grid"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(d).small_cnn_grid == 4
