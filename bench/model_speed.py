"""The model alone on pre-decoded batches: beam search against greedy, and per encoder.

    python bench/model_speed.py beam [--batch 32] [--rounds 20] [--model NAME|BUNDLE]
    python bench/model_speed.py encoders [--batch 16] [--rounds 3] [--encoders small_cnn,resnet50,...]
    python bench/model_speed.py runtimes [--batch 41] [--rounds 10] [--model NAME|BUNDLE]
    python bench/model_speed.py models --old REV [--old_model DIR] [--new NAME|BUNDLE] [--batch 32] [--images 1000]
                                       [--rounds 5]
    (both: [--out FILE] [--fold NAME])

Every call is made once untimed (trace, warm-up), then the calls are timed in alternating
rounds (A B C A B C ...) on the same batch of synthetic scenes, so all see the same machine
load; medians are reported.

  beam      the default bundled model's `Captioner.search` with beam search k=3 and with greedy
            decoding (k=1), sharing the weights: seconds per batch and their ratio.
  encoders  for every encoder of `ModelConfig`, a model built as a bundle builds it, with
            random weights (no download) and the default bundled model's decoder, at the
            encoder's usual input side: `Captioner.search` (backbone + beam search k=3,
            at most 20 tokens) and the backbone alone, images/s and the ratio to
            small_cnn. With random weights the decoder seldom emits the end token, so
            the search runs all its steps: the upper bound of a trained decoder's cost,
            the same for every encoder.
  runtimes  one bundle with its own search settings on a batch of decoded web photos
            (corpora.web_photos), run by TensorFlow (the Captioner's tf.function), by
            TensorFlow with XLA (the same graph function with jit_compile=True) and by
            LiteRT (model.lite: the graph compiled to a .tflite): seconds per batch, each
            one's speed-up over TensorFlow, and whether its tokens equal TensorFlow's
            (with the largest score difference).
  models    two bundles side by side: the default bundled model of git revision REV
            (old; --old_model names another directory of that revision) and the default
            bundled model of the checkout or --new (new). Per model: beam k=3 and
            greedy seconds per batch, and the whole job's images/s (steady: without its
            wait for the model load) on the small corpus; then new / old of each.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import _common as c
import corpora


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def beam(args, argv) -> int:
    beam3 = c.load_captioner(c.model_path(args.model), beam_size=3, num_alternatives=3)
    greedy = c.with_search(beam3, beam_size=1, num_alternatives=1)
    batch = c.scene_batch(args.batch, beam3.image_size)
    for captioner in (beam3, greedy):
        captioner.search(batch)  # trace + warm up
    times = c.alternate(args.rounds, {"beam3": lambda r: timed(lambda: beam3.search(batch)),
                                      "greedy": lambda r: timed(lambda: greedy.search(batch))})
    b, g = c.median(times["beam3"]), c.median(times["greedy"])
    print(f"| decoding | s / batch of {args.batch} (median of {args.rounds}) |\n| --- | --- |")
    print(f"| beam k=3 | {b:.4f} |\n| greedy | {g:.4f} |\n\nbeam3 / greedy = {b / g:.2f}x")
    c.write_report(args, argv, "model_speed.py", {"model": beam3.model_id, "settings": vars(args),
                                                  "seconds_per_batch": times, "median": {"beam3": b, "greedy": g},
                                                  "beam3_over_greedy": b / g})
    return 0


def runtimes(args, argv) -> int:
    import numpy as np
    import tensorflow as tf

    from batch_caption.model import lite

    captioner = c.load_captioner(c.model_path(args.model))
    s = captioner.image_size
    batch = np.stack([c.decode(pathlib.Path(p).read_bytes(), s) for p in corpora.web_photos(args.batch)])
    xla = tf.function(captioner._search_graph, input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)],
                      autograph=False, jit_compile=True)
    compiled = lite.LiteCaptioner(lite.compile_captioner(captioner), captioner.vocabulary, captioner.model_id, s)
    calls = {"tensorflow": lambda: captioner.search(batch),
             "tensorflow_xla": lambda: lite.LiteResult(*(t.numpy() for t in xla(batch)[0])),
             "litert": lambda: compiled.search(batch)}
    results = {name: call() for name, call in calls.items()}  # trace, compile, warm up
    want = results["tensorflow"]
    agree = {name: {"tokens_equal": bool(np.array_equal(got.tokens, want.tokens)),
                    "max_score_difference": float(np.max(np.abs(np.where(np.isfinite(want.scores), got.scores - want.scores,
                                                                            0.0))))}
             for name, got in results.items()}
    times = c.alternate(args.rounds, {name: (lambda call: lambda r: timed(call))(call) for name, call in calls.items()})
    medians = {name: c.median(t) for name, t in times.items()}
    print(f"| runtime | s / batch of {args.batch} (median of {args.rounds}) | speed-up over TensorFlow | tokens equal | "
          "max score difference |\n| --- | --- | --- | --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m:.4f} | {medians['tensorflow'] / m:.2f}x | {agree[name]['tokens_equal']} | "
              f"{agree[name]['max_score_difference']:.1e} |")
    c.write_report(args, argv, "model_speed.py", {
        "model": captioner.model_id, "decode": captioner.decode.to_dict(), "settings": vars(args),
        "seconds_per_batch": times, "median": medians,
        "speedup_over_tensorflow": {name: medians["tensorflow"] / m for name, m in medians.items()}, "agree": agree})
    return 0


def encoders(args, argv) -> int:
    import tensorflow as tf

    from batch_caption.model.captioner import Captioner
    from batch_caption.model.config import DecodeConfig

    names = c.encoder_names(args.parser, args.encoders)
    tf.get_logger().setLevel("ERROR")  # one Captioner per encoder: TF warns of "retracing" across them
    decode = DecodeConfig(beam_size=3, max_length=20, num_alternatives=3)
    setups, calls = {}, {}
    for name in names:
        size = c.USUAL_SIZE[name]
        model, vocabulary, base = c.random_model(name)
        captioner = Captioner(model, vocabulary, decode)
        encode = tf.function(model.encode, input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        batch = c.scene_batch(args.batch, size)
        calls[f"{name} caption"] = lambda r, f=captioner.search, b=batch: timed(lambda: f(b))
        calls[f"{name} encoder"] = lambda r, f=encode, b=batch: timed(lambda: f(b).numpy())
        calls[f"{name} caption"](0), calls[f"{name} encoder"](0)  # trace + warm up
        setups[name] = {"image_size": size, "params": int(model.count_params()),
                        "encoder_params": int(model.backbone.count_params()), "feature_size": model.feature_size}
        c.say(f"built {name} ({size} px, {setups[name]['encoder_params']:,} encoder parameters)")
    times = c.alternate(args.rounds, calls)
    results = {}
    for name in names:
        per = {what: times[f"{name} {what}"] for what in ("caption", "encoder")}
        med = {what: c.median(t) for what, t in per.items()}
        results[name] = {**setups[name], "seconds_per_batch": per, "median_seconds_per_batch": med,
                         "images_per_s": {what: args.batch / s for what, s in med.items()}}
    ref = results.get("small_cnn")
    for res in results.values():
        res["speed_vs_small_cnn"] = ({what: res["images_per_s"][what] / ref["images_per_s"][what]
                                      for what in ("caption", "encoder")} if ref else None)
    print("| encoder | input | encoder params | caption img/s | vs small_cnn | encoder-only img/s | vs small_cnn |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, res in results.items():
        ips, rel = res["images_per_s"], res["speed_vs_small_cnn"] or {}
        print(f"| {name} | {res['image_size']} | {res['encoder_params'] / 1e6:.2f} M | {ips['caption']:.1f} | "
              f"{rel.get('caption', 0):.2f}x | {ips['encoder']:.1f} | {rel.get('encoder', 0):.2f}x |")
    c.write_report(args, argv, "model_speed.py", {
        "measured": "Captioner.search (backbone + beam search k=3, max 20 tokens) and the backbone alone, "
                    "per batch, random weights, median over alternating rounds",
        "decoder": {"vocab_size": len(vocabulary), "image_input": base.image_input,
                    "embedding_size": base.embedding_size, "lstm_units": base.lstm_units},
        "decode": decode.to_dict(), "settings": {k: v for k, v in vars(args).items() if k != "parser"},
        "tensorflow": tf.__version__, "encoders": results})
    return 0


def models(args, argv) -> int:
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # a Captioner per model and search: TF warns of "retracing" across them
    old_tree = tempfile.mkdtemp(prefix="bench_old_model_")
    work = tempfile.mkdtemp(prefix="bench_models_")
    try:
        return _models(args, argv, old_tree, work)
    finally:
        shutil.rmtree(old_tree, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _old_default(old_tree: str) -> str:
    """The default bundled model's directory in an exported revision: where this checkout
    keeps it, else where revisions before named models kept it."""
    from batch_caption import bundled

    here = os.path.join("batch_caption", bundled.default().directory)
    return here if os.path.isdir(os.path.join(old_tree, here)) else os.path.join("batch_caption", "default_model")


def _models(args, argv, old_tree: str, work: str) -> int:
    old_commit = c.export_revision(args.old, old_tree)
    bundles = {"old": os.path.join(old_tree, args.old_model or _old_default(old_tree)),
               "new": c.model_path(args.new)}
    paths = corpora.small_images(args.images, args.size)
    input_dir = os.path.dirname(paths[0])
    calls, ids = {}, {}
    for name, bundle in bundles.items():
        beam3 = c.load_captioner(bundle, beam_size=3, num_alternatives=3)
        greedy = c.with_search(beam3, beam_size=1, num_alternatives=1)
        batch = c.scene_batch(args.batch, beam3.image_size)
        ids[name] = {"bundle_id": beam3.model_id, "decoder": beam3.model.config.decoder}
        for captioner in (beam3, greedy):
            captioner.search(batch)  # trace + warm up
        calls[f"{name} beam3"] = lambda r, f=beam3.search, b=batch: timed(lambda: f(b))
        calls[f"{name} greedy"] = lambda r, f=greedy.search, b=batch: timed(lambda: f(b))
        calls[f"{name} job"] = lambda r, n=name, m=bundle: c.job_round(input_dir, work, f"{n}{r}", ["--model", m])
    times = c.alternate(args.rounds, calls)
    results = {}
    for name in bundles:
        b, g = c.median(times[f"{name} beam3"]), c.median(times[f"{name} greedy"])
        steady, wall = c.median_job_rates(times[f"{name} job"])
        results[name] = {**ids[name], "beam3_s_per_batch": b, "greedy_s_per_batch": g, "beam3_over_greedy": b / g,
                         "job_steady_images_per_s": steady, "job_wall_images_per_s": wall}
    old, new = results["old"], results["new"]
    ratios = {"job_steady_new_over_old": new["job_steady_images_per_s"] / old["job_steady_images_per_s"],
              "job_wall_new_over_old": new["job_wall_images_per_s"] / old["job_wall_images_per_s"],
              "beam3_time_new_over_old": new["beam3_s_per_batch"] / old["beam3_s_per_batch"]}
    print(f"| model | decoder | beam k=3 s / batch of {args.batch} | greedy | beam3 / greedy | job img/s steady | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, res in results.items():
        print(f"| {name} {res['bundle_id']} | {res['decoder']} | {res['beam3_s_per_batch']:.4f} | "
              f"{res['greedy_s_per_batch']:.4f} | {res['beam3_over_greedy']:.2f}x | "
              f"{res['job_steady_images_per_s']:.1f} | {res['job_wall_images_per_s']:.1f} |")
    print("\n" + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    for job in (j for name in bundles for j in times[f"{name} job"]):
        job.pop("options", None)
    c.write_report(args, argv, "model_speed.py", {
        "old_revision": old_commit, "settings": vars(args), "models": results, "ratios": ratios,
        "seconds_per_batch": {k: v for k, v in times.items() if not k.endswith(" job")},
        "job_rounds": {k: v for k, v in times.items() if k.endswith(" job")}})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("beam", help="beam search k=3 against greedy, bundled model")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--rounds", type=int, default=20)
    b.add_argument("--model", default=None, help="bundled model name or bundle (default: the default bundled model)")
    c.add_out_flags(b, "beam_vs_greedy")
    e = sub.add_parser("encoders", help="captioning and backbone throughput per encoder, random weights")
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--encoders", default=None, help="comma-separated subset (default: every encoder)")
    c.add_out_flags(e, "encoders")
    t = sub.add_parser("runtimes", help="TensorFlow, TensorFlow with XLA and LiteRT on one bundle")
    t.add_argument("--batch", type=int, default=41, help="images per call (41: the job's at 224 px)")
    t.add_argument("--rounds", type=int, default=10)
    t.add_argument("--model", default=None, help="bundled model name or bundle (default: the default bundled model)")
    c.add_out_flags(t, "runtimes")
    m = sub.add_parser("models", help="an older revision's bundled model against this one's: decoding and the job")
    m.add_argument("--old", required=True, help="git revision whose default bundled model is the old model")
    m.add_argument("--old_model", default=None, metavar="DIR",
                   help="the old bundle's directory in that revision (default: its default bundled model's)")
    m.add_argument("--new", default=None, help="bundled model name or bundle (default: the default bundled model)")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--images", type=int, default=1000, help="job corpus size (small synthetic scenes)")
    m.add_argument("--size", type=int, default=256, help="corpus image side in pixels")
    m.add_argument("--rounds", type=int, default=5)
    c.add_out_flags(m, "default_models")
    args = p.parse_args(argv)
    if args.command == "beam":
        return beam(args, argv)
    if args.command == "models":
        return models(args, argv)
    if args.command == "runtimes":
        return runtimes(args, argv)
    args.parser = e
    return encoders(args, argv)


if __name__ == "__main__":
    sys.exit(main())
