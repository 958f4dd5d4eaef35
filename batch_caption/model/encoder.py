"""CNN encoder factory: uint8 RGB images -> pooled feature vectors.

Features are flat [B, F] either way; F = cells x channels keeps a grid of cell features
(small_cnn's grid pool, or an application's last feature map when the decoder attends),
which the attention decoder reshapes to [B, cells, channels] (`backbone.grid_shape`).

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

from batch_caption import files
from batch_caption.model.config import SMALL_CNN_CHANNELS, ModelConfig
from batch_caption.model.efficientnet_lite import efficientnet_lite0

# name -> (keras.applications constructor, preprocessing of float pixels in [0, 255]).
#   "none":  the application does it itself (MobileNetV3 / EfficientNet include it).
#   "tf":    scale to [-1, 1] (InceptionV3).
#   "caffe": RGB->BGR and ImageNet mean subtraction (ResNet50).
_APPLICATIONS = {
    "mobilenet_v3_small": ("MobileNetV3Small", "none"),
    "mobilenet_v3_large": ("MobileNetV3Large", "none"),
    "efficientnet_b0": ("EfficientNetB0", "none"),
    "inception_v3": ("InceptionV3", "tf"),
    "resnet50": ("ResNet50", "caffe"),
}

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _preprocess(x, mode: str):
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
    return x


def _small_cnn(x, grid: int):
    """A 4-block conv net for tests and small data: [B, S, S, 3] in [0, 255] -> [B, grid²·128].

    Strided convolutions rather than max pooling: max-pool gradients are expensive on
    CPU, where this net trains. Pooled to a grid (`ModelConfig.small_cnn_grid`,
    default 4x4) rather than globally: captions state where things are ("to the left
    of"), and a global average throws position away.
    """
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for i, filters in enumerate((32, 64, 128, SMALL_CNN_CHANNELS)):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
    x = layers.AdaptiveAveragePooling2D((grid, grid), name="grid_pool")(x)
    return layers.Flatten(name="flatten")(x)


def build_backbone(config: ModelConfig, load_weights: bool = True) -> keras.Model:
    """Builds the CNN: uint8 [B, S, S, 3] -> float32 [B, F] (pooled features).

    The returned model's `grid_shape` is (cells, channels) with cells * channels = F:
    small_cnn's grid²; a Keras application's global average (1 cell) for the Show-and-Tell
    decoder, its last feature map unpooled (h * w cells) for the attention decoder.

    Weights follow `config.encoder_weights`: None (random), "imagenet" (downloaded by
    Keras; needs network; Keras applications only: efficientnet_lite0's ImageNet weights
    come from `python -m batch_caption.training.convert_lite0`), or a path (local or any Beam FileSystems scheme) to a
    `.weights.h5` file of this backbone. `load_weights=False` skips them (random init),
    for when trained weights of the whole model are loaded next.
    """
    weights = config.encoder_weights if load_weights else None
    size = config.image_size
    images = keras.Input((size, size, 3), dtype="uint8", name="images")
    x = ops.cast(images, "float32")
    if config.encoder == "small_cnn":
        features = _small_cnn(x, config.small_cnn_grid)
        backbone = keras.Model(images, features, name="small_cnn")
        grid_shape = (config.small_cnn_grid ** 2, SMALL_CNN_CHANNELS)
        if weights == "imagenet":
            raise ValueError("small_cnn has no imagenet weights; use a weights file or None")
    elif config.encoder == "efficientnet_lite0":
        if weights == "imagenet":
            raise ValueError("efficientnet_lite0's imagenet weights are a file: convert them with "
                             "python -m batch_caption.training.convert_lite0 and pass its path")
        backbone, grid_shape = _keep_grid_or_pool(images, efficientnet_lite0(x), config)
    else:
        ctor_name, mode = _APPLICATIONS[config.encoder]
        ctor = getattr(keras.applications, ctor_name)
        imagenet = "imagenet" if weights == "imagenet" else None
        app = ctor(include_top=False, weights=imagenet, input_shape=(size, size, 3), pooling=None)
        backbone, grid_shape = _keep_grid_or_pool(images, app(_preprocess(x, mode)), config)
    if weights not in (None, "imagenet"):
        _load_weights_file(backbone, weights)
    backbone.grid_shape = grid_shape
    backbone.trainable = config.train_encoder
    return backbone


def _keep_grid_or_pool(images, feature_map, config: ModelConfig):
    """[B, h, w, C] -> (the backbone model, grid_shape): flattened cells [B, h*w*C] for
    the attention decoder, their global average [B, C] for Show and Tell."""
    h, w, channels = (int(d) for d in feature_map.shape[1:])
    if config.decoder == "attention":
        features, grid_shape = layers.Flatten(name="flatten")(feature_map), (h * w, channels)
    else:
        features, grid_shape = layers.GlobalAveragePooling2D(name="avg_pool")(feature_map), (1, channels)
    return keras.Model(images, features, name=config.encoder), grid_shape


def _load_weights_file(backbone: keras.Model, path: str) -> None:
    data = files.read_bytes(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "backbone.weights.h5")
        files.write_bytes(local, data)
        try:
            backbone.load_weights(local)
        except Exception as e:  # h5py/keras raise many types for a wrong file
            raise ValueError(f"cannot load encoder weights from {path}: {e}") from e
