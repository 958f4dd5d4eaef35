"""Regenerates batch_caption/samples/scenes/: the scenes model's sample images, which the
job captions when given no input with that model.

    python jobs/make_samples.py

Synthetic scenes from a seed the training data never uses (the scenes model's test
split is generated from seed 0; these come from seed 20261126), saved as PNG and JPEG.
"""

import os
import sys

from batch_caption import bundled
from batch_caption.data import scenes

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "batch_caption", bundled.BUNDLED["scenes"].samples)  # the checkout's


def main(count: int = 8) -> int:
    os.makedirs(OUT, exist_ok=True)
    config = scenes.SceneConfig(image_size=128)
    for i, scene in enumerate(scenes.generate_scenes("test", count, seed=20261126, config=config)):
        image = scenes.render_scene(scene, config)
        ext = "jpg" if i % 2 else "png"
        image.save(os.path.join(OUT, f"scene_{i:02d}.{ext}"), quality=92)
    return 0


if __name__ == "__main__":
    sys.exit(main())
