"""The encoder alone on one batch of web photos: TensorFlow, LiteRT and ONNX Runtime.

    python bench/encoder_runtimes.py [--batch 41] [--rounds 10] [--model NAME|BUNDLE] [--onnx FILE]
                                     [--opset 17] [--out FILE] [--fold NAME]
    python bench/encoder_runtimes.py --export_onnx FILE [--model NAME|BUNDLE] [--opset 17]

ONNX Runtime and tf2onnx are not dependencies of the project: install them into a venv of
their own beside the package, and run this script with that venv's python:

    python3.11 -m venv .venv-onnx && .venv-onnx/bin/pip install -e . onnxruntime onnx \\
        && .venv-onnx/bin/pip install --no-deps tf2onnx

(tf2onnx 1.17's own requirements, protobuf>=3.20 and onnx>=1.14, are already met there;
--no-deps keeps pip from resolving them again.) The measurement, on a quiet machine:

    .venv-onnx/bin/python bench/encoder_runtimes.py --rounds 10

With tf2onnx importable the script converts the encoder itself; without it, pass --onnx
FILE, made beforehand where tf2onnx is installed by

    python bench/encoder_runtimes.py --export_onnx encoder.onnx

Without onnxruntime the script says so and times TensorFlow and LiteRT only.

The encoder is the bundle's backbone as the Captioner runs it (`model.encode`): uint8
pixels [B, S, S, 3] through its own preprocessing and CNN to the flat features [B, F]
that the decoder reads (for the attention decoder the grid of cells x channels, 7 x 7 x
1280 for efficientnet_lite0 at 224 px). Three runtimes run it on the same batch of decoded
web photos (corpora.web_photos, decoded as the job decodes them):

  tensorflow    model.encode in a tf.function (the Captioner's TF path, encoder part)
  litert        the backbone converted to an encoder-only .tflite (TFLiteConverter,
                builtin ops only, as model.lite compiles the whole graph), run by
                ai_edge_litert's interpreter (XNNPACK) with one thread per CPU
  onnxruntime   tensorflow's concrete function converted to ONNX by tf2onnx (or --onnx), run
                by ONNX Runtime's CPU execution provider with intra-op threads = CPUs and
                every graph optimization

Every call is made once untimed (warm-up), then the calls are timed in alternating rounds
(A B C A B C ...); medians are reported: seconds per batch, the speed-up over TensorFlow
and over LiteRT, the largest absolute difference of each runtime's features from
TensorFlow's, and whether the bundle's own beam search (TensorFlow) finds the same tokens
from them (with the largest score difference). The issue's bar: keep a runtime that wins
by >= 1.15x with captions identical (or scores within 1e-4).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import _common as c
import corpora

WIN = 1.15  # the speed-up a runtime must reach to be kept (issue 29, point 3)
SCORE_TOLERANCE = 1e-4


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def encoder_function(captioner):
    """The Captioner's encoder as a tf.function over uint8 [None, S, S, 3] -> [B, F]."""
    import tensorflow as tf

    s = captioner.image_size
    model = captioner.model
    return tf.function(lambda images: model.encode(images), autograph=False,
                       input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8, name="images")])


def to_tflite(backbone) -> bytes:
    """The encoder's .tflite (builtin ops only, as model.lite compiles the whole graph), from
    the backbone keras.Model that `model.encode` calls. Not from `encoder_function`'s
    concrete function: converted that way (TF 2.21) the weights stay resource variables
    that nothing initializes (READ_VARIABLE ops), and the features come out NaN."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(backbone)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def to_onnx(encode, opset: int) -> bytes:
    """The encoder's ONNX model, by tf2onnx (ImportError without it)."""
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(encode, input_signature=encode.input_signature, opset=opset)
    return proto.SerializeToString()


def litert_call(data: bytes, threads: int, batch):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=threads)
    entry, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    interpreter.resize_tensor_input(entry, batch.shape)
    interpreter.allocate_tensors()

    def call():
        interpreter.set_tensor(entry, batch)
        interpreter.invoke()
        return interpreter.get_tensor(out).copy()

    return call


def onnxruntime_call(data: bytes, threads: int, batch):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch}
    return lambda: session.run(None, feed)[0].reshape(batch.shape[0], -1)


def onnx_model(args, encode) -> tuple[bytes | None, str]:
    """(the encoder's ONNX bytes or None, where they came from or why there are none)."""
    if args.onnx:
        return pathlib.Path(args.onnx).read_bytes(), f"file {args.onnx}"
    try:
        import tf2onnx
    except ImportError:
        return None, "tf2onnx is not installed and no --onnx FILE was given"
    start = time.perf_counter()
    data = to_onnx(encode, args.opset)
    c.say(f"converted the encoder to ONNX (opset {args.opset}) in {time.perf_counter() - start:.1f} s")
    return data, f"tf2onnx {tf2onnx.__version__}, opset {args.opset}"


def export_onnx(args) -> int:
    captioner = c.load_captioner(c.model_path(args.model))
    data = to_onnx(encoder_function(captioner), args.opset)
    pathlib.Path(args.export_onnx).write_bytes(data)
    c.say(f"wrote {args.export_onnx} ({len(data) / 2**20:.1f} MiB): the encoder of {captioner.model_id}, "
          f"opset {args.opset}")
    return 0


def versions() -> dict:
    from importlib import metadata

    got = {}
    for package in ("tensorflow", "ai-edge-litert", "onnxruntime", "tf2onnx", "onnx"):
        try:
            got[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            got[package] = None
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=41, help="images per call (41: the job's at 224 px)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--model", default=None, help="bundled model name or bundle (default: the default bundled model)")
    p.add_argument("--onnx", default=None, metavar="FILE", help="the encoder's ONNX (default: tf2onnx converts it)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of tf2onnx's conversion")
    p.add_argument("--export_onnx", default=None, metavar="FILE",
                   help="only write the encoder's ONNX (needs tf2onnx) to FILE, and time nothing")
    c.add_out_flags(p, "encoder_runtimes")
    args = p.parse_args(argv)
    if args.export_onnx:
        return export_onnx(args)

    import numpy as np
    import tensorflow as tf

    from batch_caption.core.cpus import available_cpus
    from batch_caption.model.captioner import search_features

    cpus = available_cpus()
    captioner = c.load_captioner(c.model_path(args.model))
    model, s = captioner.model, captioner.image_size
    batch = np.stack([c.decode(pathlib.Path(p).read_bytes(), s) for p in corpora.web_photos(args.batch)])
    encode = encoder_function(captioner)
    calls = {"tensorflow": lambda: encode(batch).numpy(),
             "litert": litert_call(to_tflite(model.backbone), cpus, batch)}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        data, onnx_source = None, "ONNX Runtime is not installed"
    else:
        data, onnx_source = onnx_model(args, encode)
    if data is None:
        c.say(f"skipping ONNX Runtime: {onnx_source}")
    else:
        calls["onnxruntime"] = onnxruntime_call(data, cpus, batch)

    features = {name: call() for name, call in calls.items()}  # warm up
    search = tf.function(lambda f: search_features(model, f, captioner.decode), autograph=False,
                         input_signature=[tf.TensorSpec([None, model.feature_size], tf.float32)])
    results = {name: [t.numpy() for t in search(f)] for name, f in features.items()}
    want, want_features = results["tensorflow"], features["tensorflow"]
    finite = np.isfinite(want[3])
    agree = {name: {"max_abs_feature_difference": float(np.max(np.abs(f - want_features))),
                    "tokens_equal": bool(np.array_equal(results[name][0], want[0])),
                    "max_score_difference": float(np.max(np.abs(np.where(finite, results[name][3] - want[3], 0.0))))}
             for name, f in features.items()}

    times = c.alternate(args.rounds, {name: (lambda call: lambda r: timed(call))(call) for name, call in calls.items()})
    medians = {name: c.median(t) for name, t in times.items()}
    over_tf = {name: medians["tensorflow"] / m for name, m in medians.items()}
    over_lite = {name: medians["litert"] / m for name, m in medians.items()}
    # A runtime is kept where it beats every other one by WIN, with the same captions.
    margin = {name: min([m2 for n2, m2 in medians.items() if n2 != name], default=m) / m for name, m in medians.items()}
    keep = {name: margin[name] >= WIN and (agree[name]["tokens_equal"]
                                           or agree[name]["max_score_difference"] <= SCORE_TOLERANCE)
            for name in medians}
    print(f"encoder of {captioner.model_id} ({model.config.encoder}, {s} px -> features [B, {model.feature_size}]), "
          f"{cpus} CPUs; ONNX: {onnx_source}\n")
    print(f"| runtime | s / batch of {args.batch} (median of {args.rounds}) | over TensorFlow | over LiteRT | "
          "max abs feature difference | tokens equal | max score difference |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, m in medians.items():
        a = agree[name]
        print(f"| {name} | {m:.4f} | {over_tf[name]:.2f}x | {over_lite[name]:.2f}x | {a['max_abs_feature_difference']:.1e} | "
              f"{a['tokens_equal']} | {a['max_score_difference']:.1e} |")
    fastest = min(medians, key=medians.get)
    print(f"\nfastest: {fastest}, {margin[fastest]:.2f}x over the next; kept by the {WIN}x bar: "
          f"{', '.join(n for n, k in keep.items() if k) or 'none'}")
    c.write_report(args, argv, "encoder_runtimes.py", {
        "model": captioner.model_id, "encoder": model.config.encoder, "image_size": s,
        "feature_size": model.feature_size, "grid_shape": list(model.backbone.grid_shape), "cpus": cpus,
        "decode": captioner.decode.to_dict(), "settings": vars(args), "versions": versions(), "onnx": onnx_source,
        "seconds_per_batch": times, "median": medians, "speedup_over_tensorflow": over_tf,
        "speedup_over_litert": over_lite, "margin_over_the_next_fastest": margin, "agree": agree,
        "win_bar": WIN, "kept": keep})
    return 0


if __name__ == "__main__":
    sys.exit(main())
