"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variant of TensorFlow's TPU models) in Keras 3.

    uint8 [B, S, S, 3] -> (x - 127) / 128
      -> stem: conv 3x3/2, 32                                  -> [B, S/2, S/2, 32]
      -> 16 MBConv blocks (7 stages below), no squeeze-excitation, ReLU6
      -> head: conv 1x1, 1280                                  -> [B, S/32, S/32, 1280]
      -> (include_top) global average, dense 1000               -> [B, 1000] logits

Every convolution pads the TensorFlow 'same' way and every batch norm has epsilon 1e-3,
as in the original TF checkpoints; the layer names follow the PyTorch checkpoint's keys
(`convert_state_dict`), so ImageNet weights converted from it load by name. Keras
applications have no Lite variant: its stem and head are fixed in size, it drops SE and
uses ReLU6, all of which keep it fast on CPUs.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
from keras import layers

# (expand ratio, kernel, stride, output channels, repeats) per stage.
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
_EPSILON = 1e-3


def _conv_bn(x, filters, kernel, stride, name, act=True, depthwise=False):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if act else x


def efficientnet_lite0(inputs, include_top: bool = False):
    """float32 pixels [B, S, S, 3] in [0, 255] -> [B, S/32, S/32, 1280] (or logits [B, 1000])."""
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="scale")(inputs)
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, "stem")
    index = 0
    for expand, kernel, stride, channels, repeats in STAGES:
        for r in range(repeats):
            name, h = f"block{index}", x
            if expand != 1:
                h = _conv_bn(h, x.shape[-1] * expand, 1, 1, f"{name}_expand")
            h = _conv_bn(h, None, kernel, stride if r == 0 else 1, f"{name}_dw", depthwise=True)
            h = _conv_bn(h, channels, 1, 1, f"{name}_project", act=False)
            # The residual where the block keeps the shape (stride 1, same channels).
            x = layers.Add(name=f"{name}_add")([x, h]) if h.shape[1:] == x.shape[1:] else h
            index += 1
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(NUM_CLASSES, name="predictions")(x)
    return x


def build_classifier(image_size: int = 224) -> keras.Model:
    """The ImageNet classifier: float32 [B, S, S, 3] in [0, 255] -> logits [B, 1000]."""
    images = keras.Input((image_size, image_size, 3), name="images")
    return keras.Model(images, efficientnet_lite0(images, include_top=True), name="efficientnet_lite0")


# --- weights from the PyTorch checkpoint --------------------------------------------------


def _torch_names():
    """(keras layer, torch prefix) of every conv and batch norm, in network order."""
    yield "stem_conv", "_conv_stem"
    yield "stem_bn", "_bn0"
    index = 0
    for expand, _, _, _, repeats in STAGES:
        for _ in range(repeats):
            p, k = f"_blocks.{index}", f"block{index}"
            if expand != 1:
                yield f"{k}_expand_conv", f"{p}._expand_conv"
                yield f"{k}_expand_bn", f"{p}._bn0"
            yield f"{k}_dw_conv", f"{p}._depthwise_conv"
            yield f"{k}_dw_bn", f"{p}._bn1"
            yield f"{k}_project_conv", f"{p}._project_conv"
            yield f"{k}_project_bn", f"{p}._bn2"
            index += 1
    yield "head_conv", "_conv_head"
    yield "head_bn", "_bn1"


def convert_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The PyTorch checkpoint's tensors -> {keras layer name: its weights in Keras order}.

    Convolutions go from [out, in, kh, kw] to [kh, kw, in, out] (depthwise: [kh, kw, ch,
    1]); batch norms keep (gamma, beta, moving mean, moving variance); the classifier's
    dense from [1000, 1280] to [1280, 1000]. Raises KeyError naming a missing tensor.
    """
    out: dict[str, list[np.ndarray]] = {}
    for layer, prefix in _torch_names():
        if layer.endswith("_conv"):
            w = np.asarray(state[f"{prefix}.weight"], np.float32)
            out[layer] = [w.transpose(2, 3, 0, 1) if layer.endswith("_dw_conv") else w.transpose(2, 3, 1, 0)]
        else:
            out[layer] = [np.asarray(state[f"{prefix}.{n}"], np.float32)
                          for n in ("weight", "bias", "running_mean", "running_var")]
    out["predictions"] = [np.asarray(state["_fc.weight"], np.float32).T, np.asarray(state["_fc.bias"], np.float32)]
    return out


def set_converted_weights(model: keras.Model, weights: Mapping[str, list[np.ndarray]]) -> None:
    """Loads `convert_state_dict`'s output into a model built from `efficientnet_lite0`,
    layer by layer (the classifier only when the model has it)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            set_converted_weights(layer, weights)
        elif layer.name in weights:
            layer.set_weights(weights[layer.name])
