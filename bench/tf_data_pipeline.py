"""The tf.data pipeline a user would write instead of the job: vs_tf_data.py's baseline.

    python bench/tf_data_pipeline.py --input DIR --output FILE.jsonl [--model NAME_OR_BUNDLE] [--batch_size N]

The same Captioner as the job's TensorFlow runtime (the bundle's own search settings),
fed by tf.data: DIR's JPEG files; read and decode in parallel (`num_parallel_calls=AUTOTUNE`),
DCT-scaled by the job's draft rule (the largest ratio of 1, 2, 4, 8 that keeps both sides
>= 2x the model's input) with Pillow's IDCT; squashed to the model's square input,
bicubic and antialiased like the job's Pillow resize (mean pixel difference from the job's
decode ~0.15 grey levels); batches of the job's default size for the model; prefetch.
Writes one JSON line per image ({path, caption, score}, the best caption) and prints one
summary line with its seconds. No error handling: a file that does not decode ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

START = time.perf_counter()
RATIOS = (1, 2, 4, 8)


def jpeg_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                  if name.lower().endswith((".jpg", ".jpeg")))


def image_dataset(paths: list[str], image_size: int, batch_size: int):
    """(paths, uint8 [B, S, S, 3]) batches."""
    import tensorflow as tf

    from batch_caption.images.decoding import DRAFT_REDUCING_GAP

    target = DRAFT_REDUCING_GAP * image_size

    def decode(data, ratio):  # INTEGER_ACCURATE: libjpeg's islow IDCT, the one Pillow uses
        return tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")

    def load(path):
        data = tf.io.read_file(path)
        fits = tf.reduce_min(tf.image.extract_jpeg_shape(data)[:2]) // target  # ratios up to this keep >= target
        index = tf.reduce_sum(tf.cast(tf.constant(RATIOS[1:]) <= fits, tf.int32))
        pixels = tf.switch_case(index, [lambda r=r: decode(data, r) for r in RATIOS])
        pixels = tf.image.resize(pixels, [image_size, image_size], method="bicubic", antialias=True)
        return path, tf.saturate_cast(tf.round(pixels), tf.uint8)

    return (tf.data.Dataset.from_tensor_slices(paths)
            .map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="directory of JPEG files")
    p.add_argument("--model", default=None, help="bundled model name or bundle path (default: the job's)")
    p.add_argument("--output", required=True, help="JSON lines file to write")
    p.add_argument("--batch_size", type=int, default=None, help="images per model call (default: the job's)")
    args = p.parse_args(argv)

    from batch_caption import bundled
    from batch_caption.model.load import load_captioner
    from batch_caption.pipeline.config import default_batch_size

    paths = jpeg_files(args.input)
    # No DecodeConfig given: the bundle's own search settings (its decode.json), as the job's default.
    captioner = load_captioner(bundled.resolve(args.model or bundled.DEFAULT_MODEL_NAME))
    loaded = time.perf_counter() - START
    batch_size = args.batch_size or default_batch_size(captioner.image_size)
    with open(args.output, "w", encoding="utf-8") as out:
        for batch_paths, pixels in image_dataset(paths, captioner.image_size, batch_size).as_numpy_iterator():
            for path, captions in zip(batch_paths, captioner.caption(pixels)):
                best = captions[0]
                out.write(json.dumps({"path": path.decode(), "caption": best.text, "score": best.score}) + "\n")
    seconds = time.perf_counter() - START
    print(f"tf.data: {len(paths)} images captioned in {seconds:.1f} s ({len(paths) / seconds:.1f} img/s), "
          f"model loaded after {loaded:.1f} s, batches of {batch_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
