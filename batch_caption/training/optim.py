"""Learning-rate schedule, optimizers that apply pre-reduced gradients, clipping, loss scale.

The distributed update (see loop.py) is

    per replica:   grads_r = d(sum of token losses on replica r) / d(weights)
    all-reduce:    G = sum_r grads_r,  N = sum_r real tokens_r          (one collective)
    normalise:     g = G / N           (the gradient of the global mean token loss)
    clip:          g = g * min(1, clip_norm / ||g||)                    (global norm)
    apply:         optimizer step with g, no further aggregation

Keras 3's TensorFlow optimizer all-reduces (SUMs) the gradients again inside `apply`
whenever it runs in a replica context (`TFOptimizer._all_reduce_sum_gradients`, called from
`_backend_update_step`), and Keras' own `clipnorm` would clip per replica before that sum.
The optimizers here override that one hook so that `apply` takes the already reduced and
clipped gradients as they are. `make_optimizer` checks the hook still exists, so a Keras
upgrade that renames it fails loudly instead of silently summing twice.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then decay to peak * final_ratio at the last step.

    lr(s), s = 0-based step:
      s <  warmup:  peak * (s + 1) / warmup
      s >= warmup:  peak * f(p), p = (s - warmup) / (total - warmup - 1), clipped to [0, 1]
        constant:    f = 1
        cosine:      f = r + (1 - r) * (1 + cos(pi p)) / 2
        exponential: f = r ** p
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine", final_ratio: float = 0.1):
        if kind not in ("constant", "cosine", "exponential"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.kind, self.final_ratio = kind, float(final_ratio)

    def __call__(self, step):
        s = tf.cast(step, tf.float32)
        warmup = float(self.warmup_steps)
        span = float(max(self.total_steps - self.warmup_steps - 1, 1))
        p = tf.clip_by_value((s - warmup) / span, 0.0, 1.0)
        r = self.final_ratio
        if self.kind == "cosine":
            f = r + (1.0 - r) * 0.5 * (1.0 + tf.cos(math.pi * p))
        elif self.kind == "exponential":
            f = tf.pow(r, p)
        else:
            f = tf.ones_like(p)
        lr = self.peak * f
        if self.warmup_steps:
            lr = tf.where(s < warmup, self.peak * (s + 1.0) / warmup, lr)
        return lr

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind, "final_ratio": self.final_ratio}


class _PreReduced:
    """Mixin: `apply` takes gradients that are already all-reduced (no second SUM)."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


class PreReducedAdam(_PreReduced, keras.optimizers.Adam):
    """keras.optimizers.Adam whose `apply` does not all-reduce the gradients again."""


class PreReducedSGD(_PreReduced, keras.optimizers.SGD):
    """keras.optimizers.SGD whose `apply` does not all-reduce the gradients again."""


_OPTIMIZERS = {"adam": PreReducedAdam, "sgd": PreReducedSGD}


def make_optimizer(name: str, learning_rate, name_scope: str = "optimizer") -> keras.optimizers.Optimizer:
    """An optimizer (adam | sgd) for pre-reduced, pre-clipped gradients. Create it in strategy.scope()."""
    if not hasattr(keras.optimizers.Optimizer, "_all_reduce_sum_gradients"):
        raise RuntimeError(
            f"keras {keras.__version__}: the optimizer has no _all_reduce_sum_gradients hook any more; "
            "check how it aggregates gradients under tf.distribute before training distributed"
        )
    return _OPTIMIZERS[name](learning_rate=learning_rate, name=name_scope)


def densify(grad):
    """IndexedSlices (embedding gradients) -> dense, so every gradient all-reduces alike."""
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad


def normalise(grad_sums, loss_sum, token_count):
    """Global sums -> (mean token loss [], its gradients). Counts of 0 give 0, not NaN."""
    denominator = tf.maximum(token_count, 1.0)
    return loss_sum / denominator, [g / denominator for g in grad_sums]


def clip_by_global_norm(grads, clip_norm: float):
    """(grads, clip_norm; 0 = off) -> (clipped grads, global norm before clipping [])."""
    if clip_norm > 0:
        clipped, norm = tf.clip_by_global_norm(grads, clip_norm)
        return clipped, norm
    return list(grads), tf.linalg.global_norm(grads)
