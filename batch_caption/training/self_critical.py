"""Self-critical fine-tuning on CIDEr-D: a trained bundle in, a better-captioning bundle out.

    python -m batch_caption.training.self_critical --init BUNDLE --data FEATURES_DATASET \\
        --output DIR [--steps N --learning_rate LR ...]

Cross-entropy training (`batch_caption.train`) teaches the decoder the next word of a human
caption; the job then searches for whole captions. Self-critical sequence training
(Rennie et al. 2017) optimises what the search produces: the decoder samples K captions
of each image, each is scored by CIDEr-D against the image's references, and the policy
gradient raises the log-probability of captions that beat the mean of the other K - 1
(Luo 2020's baseline: no greedy decode, no learned critic):

    per step, B images of the training split (precomputed features [B, F]):
        samples   int32 [B * K, T]   sampled from the decoder (no dropout), Gumbel-max
        rewards   float [B, K]       CIDEr-D of each sample, idf from the split's references
        advantage float [B, K]       reward - mean reward of the image's other samples
        loss = -mean(advantage * sum of the sample's token log-probs)

Every `eval_every` steps the job's default beam search captions `eval_split` and its
CIDEr-D is computed the same way (idf from that split's references: evaluate's
definition, up to tokenisation); the bundle exported at the end holds the weights of the
best such evaluation, so the choice is made on the validation split. Runs on one device:
the cross-entropy stage is where distribution pays. Needs a features dataset whose
encoder, features and vocabulary are the bundle's. Checkpoints in OUTPUT/checkpoints
resume an interrupted run (SIGTERM/SIGINT save one and exit 75).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from batch_caption import cli, quiet
from batch_caption.cli import require as need
from batch_caption.model.bundle import WEIGHT_DTYPES
from batch_caption.storage import files
from batch_caption.training.cider import CiderD, is_word, read_references
from batch_caption.training.config import EXIT_PREEMPTED

PROG = "python -m batch_caption.training.self_critical"
RESULT_NAME = "result.json"
BEST_NAME = "best.json"


@dataclasses.dataclass(frozen=True)
class SelfCriticalConfig:
    """Options of a self-critical run (the CLI flags).

    init: the bundle to start from; data: a features dataset made for its decoder and
      encoder, with references_<split>.json for `train_split` and `eval_split`.
    output: checkpoints/, best/ (weights of the best evaluation), best.json, result.json.
    export: the bundle written at the end (default OUTPUT/export).
    samples_per_image (K >= 2), images_per_batch (B): each step scores B * K captions.
    steps, learning_rate, clip_norm: Adam at a constant rate; gradients clipped to this
      global norm (0 = off).
    eval_every, eval_images: the CIDEr-D evaluation's period in steps, and how many
      images of `eval_split` it captions (0 = all).
    checkpoint_every, log_every: periods in steps.
    seed: seeds the data order and the sampling; a resumed run reseeds from (seed, step).
    """

    init: str
    data: str
    output: str
    export: str | None = None
    export_weights_dtype: str = "float32"
    samples_per_image: int = 5
    images_per_batch: int = 32
    steps: int = 1000
    learning_rate: float = 5e-5
    clip_norm: float = 5.0
    eval_every: int = 200
    eval_images: int = 0
    checkpoint_every: int = 100
    log_every: int = 20
    train_split: str = "train"
    eval_split: str = "val"
    seed: int = 0

    def __post_init__(self):
        need(self.export_weights_dtype in WEIGHT_DTYPES,
             f"--export_weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.export_weights_dtype!r}")
        need(2 <= self.samples_per_image <= 64, f"--samples_per_image must be in [2, 64], got {self.samples_per_image}")
        need(1 <= self.images_per_batch <= 4096, f"--images_per_batch must be in [1, 4096], got {self.images_per_batch}")
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}")
        need(self.clip_norm >= 0, f"--clip_norm must be >= 0 (0 = off), got {self.clip_norm}")
        need(self.eval_every >= 1, f"--eval_every must be >= 1, got {self.eval_every}")
        need(self.eval_images >= 0, f"--eval_images must be >= 0 (0 = all), got {self.eval_images}")
        need(self.checkpoint_every >= 1, f"--checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.log_every >= 1, f"--log_every must be >= 1, got {self.log_every}")
        need(self.train_split != self.eval_split, "--train_split and --eval_split must differ")
        need(0 <= self.seed < 2**31, f"--seed must be in [0, 2**31), got {self.seed}")

    @property
    def export_path(self) -> str:
        return self.export or files.join(self.output, "export")


class SelfCriticalTrainer:
    """Loads the bundle and dataset, builds the graph functions; `run()` trains and exports."""

    def __init__(self, config: SelfCriticalConfig, log=print):
        import keras
        import tensorflow as tf

        from batch_caption.model.bundle import BundleError
        from batch_caption.model.load import load_bundle
        from batch_caption.training.preflight import read_dataset

        self.config, self.log = config, log
        spec = read_dataset(config.data)
        info = spec.info
        for split in (config.train_split, config.eval_split):
            if not spec.files.get(split):
                raise cli.UsageError(f"{config.data} has no {split!r} split")
        if info.mode != "features":
            raise cli.UsageError(f"{config.data} holds images; self-critical training needs a features dataset "
                                 "(prepare --precompute_features)")
        try:
            bundle = load_bundle(config.init)
        except BundleError as e:
            raise cli.UsageError(str(e)) from e
        model = bundle.model
        if bundle.vocabulary != spec.vocabulary:
            raise cli.UsageError(f"{config.data}'s vocabulary is not the bundle's: use the dataset the bundle was trained on")
        if info.encoder != bundle.config.encoder or info.feature_size != model.feature_size:
            raise cli.UsageError(f"{config.data} holds {info.feature_size} {info.encoder} features; the bundle's "
                                 f"{bundle.config.encoder} decoder reads {model.feature_size}")
        refs = {}
        for split in (config.train_split, config.eval_split):
            path = files.join(config.data, f"references_{split}.json")
            if not files.exists(path):
                raise cli.UsageError(f"{path} not found: prepare writes it beside the {split} split")
            refs[split] = read_references(path)
        self.spec, self.model, self.vocabulary = spec, model, bundle.vocabulary
        self.reward = CiderD(refs[config.train_split])
        self.eval_metric = CiderD(refs[config.eval_split])
        self.max_tokens = info.max_length + 1  # words, then <end>
        encoder_vars = {id(w) for w in model.backbone.trainable_variables}
        self.decoder_vars = [v for v in model.trainable_variables if id(v) not in encoder_vars]
        self.optimizer = keras.optimizers.Adam(config.learning_rate, name="self_critical_optimizer")
        self.optimizer.build(self.decoder_vars)
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.rng = tf.random.Generator.from_seed(config.seed)
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=self.optimizer, step=self.step_var, rng=self.rng)
        self.manager = tf.train.CheckpointManager(self.checkpoint, files.join(config.output, "checkpoints"), max_to_keep=2)
        self.best_checkpoint = tf.train.Checkpoint(model=model)
        self._build_functions()

    # --- graph functions -------------------------------------------------------------
    def _build_functions(self):
        import tensorflow as tf

        from batch_caption.model.captioner import search_features
        from batch_caption.model.config import DecodeConfig
        from batch_caption.training import policy

        model, k = self.model, self.config.samples_per_image
        self._sample = policy.make_sampler(model, k, self.max_tokens, self.rng)
        self._train_step = policy.make_policy_step(model, k, self.decoder_vars, self.optimizer, self.config.clip_norm)
        decode = DecodeConfig()  # the job's default search

        @tf.function(input_signature=[tf.TensorSpec([None, model.feature_size], tf.float32)], autograph=False)
        def search(features):
            return search_features(model, features, decode).tokens[:, 0]

        self._search = search

    # --- data and rewards ------------------------------------------------------------
    def _images(self, split: str, *, training: bool, seed: int):
        """(image ids int64 [B], features float32 [B, F]) batches of `split`."""
        import tensorflow as tf

        from batch_caption.data.tfrecord import parse_example

        info = self.spec.info
        ds = tf.data.TFRecordDataset(list(self.spec.files[split]))
        if training:
            ds = ds.repeat().shuffle(2048, seed=seed)

        def parse(serialized):
            example = parse_example(serialized, info)
            return example["image_id"], example["features"]

        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(self.config.images_per_batch if training else 100, drop_remainder=training).prefetch(2)

    def _words(self, ids) -> list[str]:
        """A caption's ids -> its words as CIDEr-D compares them; <unk> stays a word that
        matches no reference."""
        from batch_caption.model import vocab as V

        words = (self.vocabulary.words[i] for i in ids[: self._length(ids)] if i not in (V.PAD_ID, V.START_ID))
        return [w for w in words if is_word(w)]

    @staticmethod
    def _length(ids) -> int:
        from batch_caption.model import vocab as V

        ids = list(ids)
        return ids.index(V.END_ID) if V.END_ID in ids else len(ids)

    def _rewards(self, image_ids, samples):
        """CIDEr-D of every sample -> float32 [B, K]."""
        k = self.config.samples_per_image
        out = np.empty(len(samples), np.float32)
        for row, ids in enumerate(samples.tolist()):
            key = int(image_ids[row // k])
            if key not in self.reward:
                raise cli.UsageError(f"image id {key} of {self.config.train_split} has no references")
            out[row] = self.reward.score(key, self._words(ids))
        return out.reshape(-1, k)

    # --- evaluation, checkpoints, the loop ---------------------------------------------
    def evaluate(self) -> float:
        """Mean CIDEr-D of the default search's captions of `eval_split` (the first `eval_images`)."""
        scores, limit = [], self.config.eval_images or None
        for image_ids, features in self._images(self.config.eval_split, training=False, seed=0):
            best = self._search(features).numpy()
            for key, ids in zip(image_ids.numpy().tolist(), best.tolist()):
                scores.append(self.eval_metric.score(int(key), self._words(ids)))
            if limit and len(scores) >= limit:
                break
        scores = scores[:limit]
        return float(np.mean(scores))

    def _best(self) -> dict:
        path = files.join(self.config.output, BEST_NAME)
        return json.loads(files.read_text(path)) if files.exists(path) else {}

    def _evaluate_and_keep(self, step: int) -> float:
        score = self.evaluate()
        best = self._best()
        kept = not best or score > best["cider_d"]
        if kept:
            self.best_checkpoint.write(files.join(self.config.output, "best", "weights"))
            best = {"step": step, "cider_d": score, "split": self.config.eval_split}
            files.write_bytes(files.join(self.config.output, BEST_NAME), json.dumps(best, indent=2, sort_keys=True).encode())
        note = "best so far, kept" if kept else f"best: {best['cider_d']:.4f} at step {best['step']}"
        self.log(f"eval step {step}: {self.config.eval_split} CIDEr-D {score:.4f} ({note})")
        return score

    def run(self) -> dict:
        from batch_caption.model.bundle import save_bundle
        from batch_caption.training.stop import StopRequest

        c, started = self.config, time.monotonic()
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self.log(f"resumed from {latest}")
        step = int(self.step_var.numpy())
        if step == 0 and not self._best():
            self._evaluate_and_keep(0)  # the starting bundle is a candidate too
        data = iter(self._images(c.train_split, training=True, seed=(c.seed * 1_000_003 + step) % 2**31))
        k, window, window_start, preempted = c.samples_per_image, [], time.monotonic(), False
        with StopRequest() as stop_request:
            while step < c.steps:
                image_ids, features = next(data)
                samples = self._sample(features).numpy()
                rewards = self._rewards(image_ids.numpy(), samples)
                advantages = (rewards - (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)).reshape(-1)
                longest = max(min(self._length(s) + 1, samples.shape[1]) for s in samples)
                loss, norm = self._train_step(features, samples[:, :longest], advantages.astype(np.float32))
                step += 1
                window.append(float(rewards.mean()))
                if step % c.log_every == 0 or step == c.steps:
                    rate = len(window) * c.images_per_batch / (time.monotonic() - window_start)
                    self.log(f"step {step}/{c.steps}  sample CIDEr-D {np.mean(window):.4f}  loss {float(loss):.4f}  "
                             f"grad norm {float(norm):.3g}  {rate:.1f} images/s")
                    window, window_start = [], time.monotonic()
                if step % c.checkpoint_every == 0 or step == c.steps or stop_request.requested:
                    self.step_var.assign(step)
                    self.manager.save(checkpoint_number=step)
                if stop_request.requested:
                    self.log(f"stopped at step {step} by signal {stop_request.signum}: checkpoint saved; "
                             "rerun the same command to resume")
                    preempted = True
                    break
                if step % c.eval_every == 0 or step == c.steps:
                    self._evaluate_and_keep(step)
                    window_start = time.monotonic()
        result = {"step": step, "steps": c.steps, "preempted": preempted, "best": self._best(),
                  "elapsed_seconds": round(time.monotonic() - started, 3)}
        if not preempted:
            self.best_checkpoint.read(files.join(c.output, "best", "weights")).assert_existing_objects_matched()
            result["bundle_id"] = save_bundle(self.model, self.vocabulary, c.export_path, c.export_weights_dtype)
            result["export"] = c.export_path
            self.log(f"exported the weights of step {result['best']['step']} ({c.eval_split} CIDEr-D "
                     f"{result['best']['cider_d']:.4f}) as bundle {result['bundle_id']} to {c.export_path}")
        files.write_bytes(files.join(c.output, RESULT_NAME), json.dumps(result, indent=2, sort_keys=True).encode())
        return result


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    d = SelfCriticalConfig.__dataclass_fields__
    p.add_argument("--init", required=True, help="the trained bundle to start from")
    p.add_argument("--data", required=True, help="its features dataset (prepare --precompute_features)")
    p.add_argument("--output", required=True, help="directory: checkpoints/, best/, best.json, result.json")
    p.add_argument("--export", default=None, help="bundle written at the end (default OUTPUT/export)")
    p.add_argument("--export_weights_dtype", choices=WEIGHT_DTYPES, default=d["export_weights_dtype"].default,
                   help="(default %(default)s)")
    for name, kind, text in (
        ("samples_per_image", int, "captions sampled per image (K)"),
        ("images_per_batch", int, "images per step (B): each step scores B * K captions"),
        ("steps", int, "optimizer steps"),
        ("learning_rate", float, "Adam's constant learning rate"),
        ("clip_norm", float, "clip gradients to this global norm, 0 = off"),
        ("eval_every", int, "evaluate CIDEr-D on --eval_split every this many steps; the best is exported"),
        ("eval_images", int, "images of --eval_split to caption per evaluation, 0 = all"),
        ("checkpoint_every", int, "checkpoint period in steps"),
        ("log_every", int, "progress line period in steps"),
        ("train_split", str, "split to train on"),
        ("eval_split", str, "split that chooses the exported weights"),
        ("seed", int, "seed of the data order and the sampling"),
    ):
        p.add_argument(f"--{name}", type=kind, default=d[name].default, help=f"{text} (default %(default)s)")
    quiet.add_verbose_flag(p)
    return p


def run(argv: Sequence[str] | None = None) -> dict:
    args = vars(build_parser().parse_args(argv))
    args.pop("verbose", None)
    config = SelfCriticalConfig(**args)
    return SelfCriticalTrainer(config).run()


def main(argv: Sequence[str] | None = None) -> int:
    quiet.setup_when_command_line(argv)
    code, result = cli.run_job(PROG, lambda: run(argv))
    if code == 0 and result and result["preempted"]:
        return EXIT_PREEMPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
