"""Small test data builders shared by test modules (importable: pytest.ini pythonpath)."""

from __future__ import annotations


def varied_images(n: int, size: int = 64, seed: int = 0):
    """uint8 [n, size, size, 3]: each image its own colour and gradient, plus noise, so
    that even a random network tells them apart (plain noise pools to the same vector)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    slope = rng.uniform(-120, 120, (n, 1, 1, 3))
    noise = rng.normal(0, 10, (n, size, size, 3))
    return np.clip(base + slope * ramp + noise, 0, 255).astype(np.uint8)
