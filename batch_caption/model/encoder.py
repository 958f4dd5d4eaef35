"""CNN encoder factory: uint8 RGB images -> flat features [B, F], and the package's encoders.

`build_backbone` looks the config's encoder up in `registry.ENCODERS`, runs its builder
(below for the package's own) and shapes its feature map as the decoder reads it: F =
cells x channels keeps a grid of cell features (small_cnn's grid pool, or an application's
last feature map for a decoder that reads a grid), which such a decoder reshapes to
[B, cells, channels] (`backbone.grid_shape`).

Every backbone takes raw uint8 pixels and does its own preprocessing inside the model,
so callers (the Beam job, dataset preparation, training) never need to know which
normalisation a backbone expects. Everything with weights after the CNN lives in the
decoder (`ShowAndTell.image_projection`, `AttendAndTell`'s attention), so backbone
features can be precomputed once and reused to train the decoder alone.
"""

from __future__ import annotations

import os
import tempfile

import keras
from keras import layers, ops

from batch_caption.model import efficientnet_lite
from batch_caption.model.config import DECODERS, ENCODERS, ModelConfig
from batch_caption.storage import files


def build_backbone(config: ModelConfig, load_weights: bool = True) -> keras.Model:
    """Builds the CNN: uint8 [B, S, S, 3] -> float32 [B, F] (flattened cells).

    The returned model's `grid_shape` is (cells, channels) with cells * channels = F. An
    encoder that takes the grid (`EncoderSpec.grid_channels`) pools its map to
    `small_cnn_grid`² cells whatever the decoder; another one's map is kept whole (h * w
    cells) for a decoder that reads a grid, and globally averaged (1 cell) for one that
    reads a pooled vector.

    Weights follow `config.encoder_weights`: None (random), "imagenet" (downloaded by
    Keras; needs network; encoders whose entry has `imagenet`), or a path (local or any
    Beam FileSystems scheme) to a `.weights.h5` file of this backbone. `load_weights=False`
    skips them (random init), for when trained weights of the whole model are loaded next.
    """
    encoder = ENCODERS[config.encoder]
    weights = config.encoder_weights if load_weights else None
    size = config.image_size
    images = keras.Input((size, size, 3), dtype="uint8", name="images")
    feature_map = encoder.load_builder()(ops.cast(images, "float32"), weights == "imagenet")
    h, w, channels = (int(d) for d in feature_map.shape[1:])
    if encoder.takes_grid:
        if channels != encoder.grid_channels:
            raise ValueError(f"encoder {encoder.name} gave {channels} channels, its entry says {encoder.grid_channels}")
        grid = config.small_cnn_grid
        cells = layers.AdaptiveAveragePooling2D((grid, grid), name="grid_pool")(feature_map)
        features, grid_shape = layers.Flatten(name="flatten")(cells), (grid * grid, channels)
    elif DECODERS[config.decoder].features == "grid":
        features, grid_shape = layers.Flatten(name="flatten")(feature_map), (h * w, channels)
    else:
        features, grid_shape = layers.GlobalAveragePooling2D(name="avg_pool")(feature_map), (1, channels)
    backbone = keras.Model(images, features, name=config.encoder)
    if weights not in (None, "imagenet"):
        _load_weights_file(backbone, weights)
    backbone.grid_shape = grid_shape
    backbone.trainable = config.train_encoder
    return backbone


# --- the package's encoders (`registry.ENCODERS`): float32 pixels [B, S, S, 3] in [0, 255],
# whether to start from ImageNet weights -> feature map [B, h, w, C] ---------------------

SMALL_CNN_CHANNELS = 128  # its entry's grid_channels


def small_cnn(x, imagenet: bool = False):
    """A 4-block conv net for tests and small data: -> [B, S/16, S/16, 128], pooled to a grid.

    Strided convolutions rather than max pooling: max-pool gradients are expensive on
    CPU, where this net trains. Pooled to a grid (`ModelConfig.small_cnn_grid`,
    default 4x4) rather than globally: captions state where things are ("to the left
    of"), and a global average throws position away. No ImageNet weights (its entry says so).
    """
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for i, filters in enumerate((32, 64, 128, SMALL_CNN_CHANNELS)):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
    return x


def efficientnet_lite0(x, imagenet: bool = False):
    """EfficientNet-Lite0's last map [B, S/32, S/32, 1280]. Its ImageNet weights are a file
    (`python -m batch_caption.training.convert_lite0`), passed as encoder_weights."""
    return efficientnet_lite.efficientnet_lite0(x)


_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _scale_to_unit(x):
    """[0, 255] -> [-1, 1] (InceptionV3)."""
    return x / 127.5 - 1.0


def _caffe(x):
    """RGB->BGR and ImageNet mean subtraction (ResNet50)."""
    return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)


def _application(constructor: str, preprocess=None):
    """A Keras application's builder: its last feature map, unpooled. `preprocess` maps
    [0, 255] pixels to what it expects; None where it does that itself (MobileNetV3,
    EfficientNet)."""

    def build(x, imagenet: bool = False):
        size = tuple(int(d) for d in x.shape[1:])
        app = getattr(keras.applications, constructor)(
            include_top=False, weights="imagenet" if imagenet else None, input_shape=size, pooling=None)
        return app(preprocess(x) if preprocess else x)

    return build


mobilenet_v3_small = _application("MobileNetV3Small")
mobilenet_v3_large = _application("MobileNetV3Large")
efficientnet_b0 = _application("EfficientNetB0")
inception_v3 = _application("InceptionV3", _scale_to_unit)
resnet50 = _application("ResNet50", _caffe)


def _load_weights_file(backbone: keras.Model, path: str) -> None:
    data = files.read_bytes(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "backbone.weights.h5")
        files.write_bytes(local, data)
        try:
            backbone.load_weights(local)
        except Exception as e:  # h5py/keras raise many types for a wrong file
            raise ValueError(f"cannot load encoder weights from {path}: {e}") from e
