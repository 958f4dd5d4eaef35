"""The custom training loop: one code path for every tf.distribute strategy.

Why not `model.fit`: Keras 3's fit breaks under MultiWorkerMirroredStrategy, clips
gradients per replica before summing them, and its checkpoint/TensorBoard callbacks have
no notion of a chief. Here Keras supplies layers, optimizers and weight files; the loop is
`strategy.run(replica_step)` inside one `tf.function` per training stage:

    replica_step(batch [per-replica B], stop flag):
        forward, loss_sum and real-token count of this replica (caption_loss)
        local gradient sums = d loss_sum / d weights
        ONE all-reduce (SUM) of [loss_sum, count, stop], the gradients, BN moving stats
        loss = global sum / global count;  grads = reduced / global count
        clip by global norm (after the reduction: every replica clips identically)
        optimizer.apply (optim.PreReduced*: no second aggregation)
        BN moving stats <- their mean over replicas (Keras keeps them per replica)

With one replica the all-reduce is the identity, so this is exactly the plain
mean-token-loss step. No XLA (`jit_compile`): collectives cannot run inside it on CPU.

Training stages: with --fine_tune_after_steps K the CNN is frozen for steps [0, K) and
trained from K on with its own optimizer at learning_rate * encoder_lr_multiplier (a
separate tf.function is traced for each stage, because Keras bakes `trainable` in).

Checkpoints (tf.train.Checkpoint: model, optimizer(s), step) go to OUTPUT/checkpoints on
the chief; other workers must save too (saving may involve collectives) and write to a
temporary directory that they delete at the end. Every worker restores from the chief's
directory, so OUTPUT must be shared storage (e.g. gs://) in a multi-machine cluster. A
restart resumes at the checkpoint's step; the data order is reseeded from (seed, step)
rather than replayed, since iterator state (the shuffle buffers) is not checkpointed.

Stop requests: SIGTERM (preemption) or SIGINT sets a flag that enters the next step's
all-reduce, so every worker stops after the same step; each saves a checkpoint of that step
and `run` returns with `preempted` set (the CLI exits with code 75 by default). A second
signal acts immediately. SIGKILL loses at most the steps since the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from batch_caption.data.tfrecord import parse_example
from batch_caption.model import vocab as V
from batch_caption.model.beam_search import BeamSearchResult, beam_search
from batch_caption.model.bundle import save_bundle
from batch_caption.model.captioner import Captioner
from batch_caption.model.config import DecodeConfig, ModelConfig
from batch_caption.model.show_and_tell import ShowAndTell, caption_loss
from batch_caption.training import input as data_input
from batch_caption.training import optim
from batch_caption.training.config import TrainConfig, TrainingError, UsageError, join
from batch_caption.training.preflight import TRAIN_CONFIG_NAME, DatasetSpec, train_config_json
from batch_caption.training.strategy import Role

RESULT_NAME = "result.json"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run did (also OUTPUT/result.json, written by the chief).

    step: the last step trained (== steps unless preempted); loss: mean token loss of
    that step; val_loss: last validation loss (None without evaluation); resumed_from:
    checkpoint step the run started from (None for a fresh run); preempted: stopped by
    a signal after saving; weights_digest: sha256 over this process's copy of every model
    variable (equal on all workers of a synchronous run).
    """

    step: int
    steps: int
    loss: float | None
    val_loss: float | None
    examples_per_second: float | None
    resumed_from: int | None
    preempted: bool
    is_chief: bool
    checkpoint: str | None
    export_path: str | None
    bundle_id: str | None
    weights_digest: str
    elapsed_seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class StopRequest:
    """SIGTERM / SIGINT -> a flag the loop checks every step (a context manager).

    The first signal only sets `signum`; the previous handler is put back at once, so a
    second signal acts as it normally would (kills the process).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def weights_digest(model: keras.Model) -> str:
    """sha256 over every variable of `model`: path, dtype, shape and bytes, in path order."""
    h = hashlib.sha256()
    for w in sorted(model.weights, key=lambda w: w.path):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(w.value))
        h.update(f"{w.path}|{value.dtype.str}|{value.shape}\n".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _data_seed(seed: int, step: int) -> int:
    """The input pipeline's seed for a run starting at `step` (fresh order after a resume)."""
    return seed if step == 0 else (seed * 1_000_003 + step) % 2**31


class Trainer:
    """Builds model, optimizers, checkpointing and steps under `strategy`; `run()` trains.

    Create it right after the strategy (see train.py): everything here is TF work.

    Args:
      config, model_config: resolved options (preflight.resolve).
      spec: the prepared dataset.
      strategy, role: from strategy.create_strategy.
      log: where progress lines go (print).
    """

    def __init__(self, config: TrainConfig, model_config: ModelConfig, spec: DatasetSpec, strategy, role: Role,
                 log: Callable[[str], None] = print):
        self.config, self.model_config, self.spec = config, model_config, spec
        self.strategy, self.role, self._print = strategy, role, log
        self.replicas = strategy.num_replicas_in_sync
        if config.global_batch_size % self.replicas:
            raise UsageError(f"--global_batch_size {config.global_batch_size} is not divisible by the "
                             f"{self.replicas} replicas of this strategy")
        self.key = data_input.input_key(spec.info)
        self.encoder_start = config.fine_tune_after_steps if self.key == "images" and config.train_encoder else None
        with strategy.scope():
            self._build_model()
            self._build_optimizers()
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        objects = {"model": self.model, "optimizer": self.decoder_optimizer, "step": self.step_var}
        if self.encoder_optimizer is not None:
            objects["encoder_optimizer"] = self.encoder_optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        # Chief: the real directory. Others: a private one (deleted by close()); they must
        # still save, because saving distributed variables may run collectives.
        self._temp_dir = None if role.is_chief else tempfile.mkdtemp(prefix=f"batch_caption-train-{role.task_type}{role.task_id}-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, config.checkpoint_dir if role.is_chief else self._temp_dir, max_to_keep=config.keep_checkpoints
        )
        self.writer = tf.summary.create_file_writer(config.log_dir) if role.is_chief else tf.summary.create_noop_writer()
        self._train_steps: dict[bool, Callable] = {}
        self._eval_step = None
        self._samples = None

    # --- setup -----------------------------------------------------------------------
    def _build_model(self):
        model = ShowAndTell(self.model_config)  # loads --encoder_weights into the backbone
        model.build_all()
        info = self.spec.info
        if info.mode == "features" and model.feature_size != info.feature_size:
            raise UsageError(f"{info.encoder} at {info.image_size} px gives {model.feature_size} features, "
                             f"the dataset has {info.feature_size}")
        backbone = model.backbone
        backbone.trainable = True
        self.encoder_vars = list(backbone.trainable_variables)
        encoder_ids = {id(v) for v in self.encoder_vars}
        self.decoder_vars = [v for v in model.trainable_variables if id(v) not in encoder_ids]
        # BatchNorm moving statistics: updated per replica by Keras, averaged by the step.
        self.state_vars = [v for v in backbone.non_trainable_variables if v.dtype in ("float16", "bfloat16", "float32", "float64")]
        backbone.trainable = self.encoder_start == 0
        self.model = model

    def _schedule(self, peak: float, total: int):
        c = self.config
        return optim.WarmupDecay(peak, total, min(c.warmup_steps, max(total - 1, 0)), c.lr_schedule, c.final_lr_ratio)

    def _build_optimizers(self):
        c = self.config
        self.schedule = self._schedule(c.learning_rate, c.steps)
        self.decoder_optimizer = optim.make_optimizer(c.optimizer, self.schedule, "decoder_optimizer")
        self.decoder_optimizer.build(self.decoder_vars)
        self.encoder_optimizer = None
        if self.encoder_start is not None:
            self.encoder_schedule = self._schedule(c.learning_rate * c.encoder_lr_multiplier, c.steps - self.encoder_start)
            self.encoder_optimizer = optim.make_optimizer(c.optimizer, self.encoder_schedule, "encoder_optimizer")
            self.encoder_optimizer.build(self.encoder_vars)

    def log(self, message: str, every_worker: bool = False) -> None:
        if self.role.is_chief or every_worker:
            self._print(f"{self.role.label}{message}")

    # --- steps -----------------------------------------------------------------------
    def _make_train_step(self, train_encoder: bool):
        """A tf.function (iterator, stop float32 []) -> {"loss", "grad_norm", "tokens", "stop"}."""
        model, strategy, key, clip_norm = self.model, self.strategy, self.key, self.config.clip_norm
        variables = self.decoder_vars + (self.encoder_vars if train_encoder else [])
        n_dec = len(self.decoder_vars)
        state = self.state_vars if train_encoder else []  # frozen BN layers run in inference mode
        replicas = float(self.replicas)
        dec_opt, enc_opt = self.decoder_optimizer, self.encoder_optimizer

        def replica_step(batch, stop):
            ctx = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                logits = model({key: batch[key], "tokens": batch["tokens"]}, training=True)
                loss_sum, count = caption_loss(batch["targets"], logits)
            grads = [tf.zeros_like(v) if g is None else optim.densify(g)
                     for g, v in zip(tape.gradient(loss_sum, variables), variables)]
            stats = tf.stack([loss_sum, count, stop])
            reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [stats, *grads, *[tf.identity(v.value) for v in state]])
            stats, grad_sums, state_sums = reduced[0], reduced[1 : 1 + len(grads)], reduced[1 + len(grads) :]
            loss, grads = optim.normalise(grad_sums, stats[0], stats[1])
            grads, norm = optim.clip_by_global_norm(grads, clip_norm)
            dec_opt.apply(grads[:n_dec], variables[:n_dec])
            if train_encoder:
                enc_opt.apply(grads[n_dec:], variables[n_dec:])
            for v, total in zip(state, state_sums):
                v.assign(total / replicas)
            return {"loss": loss, "grad_norm": norm, "tokens": stats[1], "stop": stats[2]}

        @tf.function
        def train_step(iterator, stop):
            out = strategy.run(replica_step, args=(next(iterator), stop))
            return {k: strategy.experimental_local_results(v)[0] for k, v in out.items()}

        return train_step

    def _make_eval_step(self):
        """A tf.function iterator -> float32 [2]: (global loss sum, global token count)."""
        model, strategy, key = self.model, self.strategy, self.key

        def replica_eval(batch):
            logits = model({key: batch[key], "tokens": batch["tokens"]}, training=False)
            loss_sum, count = caption_loss(batch["targets"], logits)
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.stack([loss_sum, count]))

        @tf.function
        def eval_step(iterator):
            return strategy.experimental_local_results(strategy.run(replica_eval, args=(next(iterator),)))[0]

        return eval_step

    def _distributed(self, split: str, training: bool, seed: int):
        c = self.config
        fn = data_input.dataset_fn(self.spec.files[split], self.spec.info, c.global_batch_size, training=training,
                                   seed=seed, bucket_width=c.bucket_width, shuffle_buffer=c.shuffle_buffer)
        return self.strategy.distribute_datasets_from_function(fn)

    # --- evaluation ------------------------------------------------------------------
    def evaluate(self, step: int) -> float:
        """Validation loss over eval_steps batches (the same batches every time); all workers."""
        if self._eval_step is None:
            self._eval_step = self._make_eval_step()
            self._eval_data = self._distributed(self.config.eval_split, training=False, seed=0)
        iterator = iter(self._eval_data)
        total = np.zeros(2)
        for _ in range(self.config.eval_steps):
            total += self._eval_step(iterator).numpy()
        val_loss = float(total[0] / max(total[1], 1.0))
        with self.writer.as_default():
            tf.summary.scalar("val/loss", val_loss, step=step)
        line = f"eval step {step}: val loss {val_loss:.4f} ({int(total[1])} tokens)"
        if self.role.is_chief and self.config.num_samples:
            table, first = self._sample_captions()
            with self.writer.as_default():
                tf.summary.text("val/samples", table, step=step)
            line += f"  sample: {first}"
        self.writer.flush()
        self.log(line)
        return val_loss

    def _load_samples(self):
        """The first num_samples records of the eval split: inputs [n, ...] and references."""
        info, n = self.spec.info, self.config.num_samples
        ds = tf.data.TFRecordDataset(list(self.spec.files[self.config.eval_split])).take(n)
        xs, refs, ids = [], [], []
        for ex in ds.map(lambda s: parse_example(s, info)):
            xs.append(ex["image" if self.key == "images" else "features"].numpy())
            refs.append([self.spec.vocabulary.decode(c) for c in ex["captions"].to_list()])
            ids.append(int(ex["image_id"]))
        max_len = info.max_length + 1
        decoders = {"greedy": DecodeConfig(beam_size=1, max_length=max_len, num_alternatives=1),
                    "beam 3": DecodeConfig(beam_size=3, max_length=max_len, num_alternatives=1)}
        captioners = {name: Captioner(self.model, self.spec.vocabulary, d) for name, d in decoders.items()}
        if self.key == "features":
            # A features dataset holds no pixels: search from the features (the Captioner's
            # search minus its encoder), and let the Captioner format the result.
            searches = {name: self._features_search(d) for name, d in decoders.items()}
        else:
            searches = {name: c.search for name, c in captioners.items()}
        self._samples = (np.stack(xs), refs, ids, captioners, searches)

    def _features_search(self, d: DecodeConfig):
        model = self.model

        # A dynamic batch dimension, as in the Captioner: beam search's loop needs it.
        @tf.function(input_signature=[tf.TensorSpec([None, model.feature_size], tf.float32)])
        def search(features):
            return beam_search(model.step, model.initial_state(features), start_id=V.START_ID, end_id=V.END_ID,
                               pad_id=V.PAD_ID, beam_size=d.beam_size, max_length=d.max_length,
                               num_results=d.num_alternatives, alpha=d.length_normalization,
                               min_words=1)  # as the Captioner: never an empty caption

        return lambda x: BeamSearchResult(*(t.numpy() for t in search(tf.constant(x))))

    def _sample_captions(self) -> tuple[str, str]:
        """Markdown table of sample captions (TensorBoard text), and the first one as a line."""
        if self._samples is None:
            self._load_samples()
        xs, refs, ids, captioners, searches = self._samples
        columns = {name: [row[0].text if row else "" for row in captioners[name].to_captions(search(xs))]
                   for name, search in searches.items()}
        header = "| image | " + " | ".join(columns) + " | reference |\n|---|" + "---|" * (len(columns) + 1) + "\n"
        rows = [f"| {ids[i]} | " + " | ".join(c[i] for c in columns.values()) + f" | {refs[i][0] if refs[i] else ''} |"
                for i in range(len(ids))]
        first = ", ".join(f'{name} "{c[0]}"' for name, c in columns.items()) + f' (ref "{refs[0][0] if refs[0] else ""}")'
        return header + "\n".join(rows), first

    # --- the loop --------------------------------------------------------------------
    def restore(self) -> int:
        """Restores the chief's latest checkpoint, if any; returns its step (0 if none)."""
        latest = tf.train.latest_checkpoint(self.config.checkpoint_dir)
        if latest is None:
            return 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        step = int(self.step_var.numpy())
        self.log(f"resumed from {latest} at step {step}", every_worker=True)
        return step

    def save(self, step: int) -> str:
        self.step_var.assign(step)
        return self.manager.save(checkpoint_number=step)

    def run(self) -> TrainResult:
        c, started = self.config, time.monotonic()
        step = self.restore()
        resumed_from = step or None
        if self.role.is_chief:
            tf.io.gfile.makedirs(c.output)
            with tf.io.gfile.GFile(join(c.output, TRAIN_CONFIG_NAME), "w") as f:
                f.write(train_config_json(c, self.model_config))
        self.log(f"training {self.model_config.encoder} {self.key} on {self.spec.path}: steps {step}..{c.steps}, "
                 f"global batch {c.global_batch_size} over {self.replicas} replica(s) "
                 f"({type(self.strategy).__name__}), {'chief' if self.role.is_chief else 'worker'}", every_worker=True)
        self.log(f"checkpoints -> {self.manager.directory}"
                 f"{'' if self.role.is_chief else ' (private to this worker, deleted at the end)'}", every_worker=True)
        train_data = iter(self._distributed(c.train_split, training=True, seed=_data_seed(c.seed, step)))
        loss = val_loss = rate = None
        last_saved = step if resumed_from else None
        last_eval = None
        preempted = False
        window_start, window_steps = time.monotonic(), 0
        with StopRequest() as stop_request:
            while step < c.steps:
                train_encoder = self.encoder_start is not None and step >= self.encoder_start
                if train_encoder not in self._train_steps:
                    if train_encoder and step == self.encoder_start and step > 0:
                        self.log(f"step {step}: training the encoder too (lr x {c.encoder_lr_multiplier})")
                    self.model.backbone.trainable = train_encoder
                    self._train_steps[train_encoder] = self._make_train_step(train_encoder)
                out = self._train_steps[train_encoder](train_data, tf.constant(float(stop_request.requested)))
                step += 1
                window_steps += 1
                out = {k: float(v) for k, v in out.items()}
                loss = out["loss"]
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at step {step}: lower --learning_rate or set --clip_norm")
                stop = out["stop"] > 0
                if step % c.log_every == 0 or step == c.steps or stop:
                    now = time.monotonic()
                    seconds_per_step = (now - window_start) / window_steps
                    rate = c.global_batch_size / seconds_per_step
                    lr = float(self.schedule(step - 1))
                    self.log(f"step {step}/{c.steps}  loss {loss:.4f}  lr {lr:.2e}  grad norm {out['grad_norm']:.4g}  "
                             f"{rate:.1f} ex/s  eta {_fmt_duration(seconds_per_step * (c.steps - step))}")
                    with self.writer.as_default():
                        tf.summary.scalar("train/loss", loss, step=step)
                        tf.summary.scalar("train/learning_rate", lr, step=step)
                        tf.summary.scalar("train/gradient_norm", out["grad_norm"], step=step)
                        tf.summary.scalar("train/examples_per_second", rate, step=step)
                    window_start, window_steps = now, 0
                if step % c.checkpoint_every == 0 or step == c.steps or stop:
                    self.save(step)
                    last_saved = step
                if stop:
                    preempted = True
                    why = f"signal {stop_request.signum}" if stop_request.requested else "a stop request of another worker"
                    self.log(f"stopped at step {step} by {why}: checkpoint saved; rerun the same command to resume",
                             every_worker=True)
                    break
                if c.eval_every and step % c.eval_every == 0:
                    val_loss, last_eval = self.evaluate(step), step
                    window_start = time.monotonic()  # examples/s counts training only
        if not preempted:
            if last_saved != step:
                self.save(step)
            if c.eval_every and last_eval != step:
                val_loss = self.evaluate(step)
        self.writer.flush()
        bundle_id = export_path = None
        if self.role.is_chief and not preempted:
            export_path = c.export_path
            bundle_id = save_bundle(self.model, self.spec.vocabulary, export_path)
            self.log(f"exported bundle {bundle_id} to {export_path}")
        result = TrainResult(
            step=step, steps=c.steps, loss=loss, val_loss=val_loss, examples_per_second=rate,
            resumed_from=resumed_from, preempted=preempted, is_chief=self.role.is_chief,
            checkpoint=self.manager.latest_checkpoint if self.role.is_chief else None,
            export_path=export_path, bundle_id=bundle_id, weights_digest=weights_digest(self.model),
            elapsed_seconds=round(time.monotonic() - started, 3),
        )
        if self.role.is_chief:
            with tf.io.gfile.GFile(join(c.output, RESULT_NAME), "w") as f:
                f.write(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        self.log(f"{'stopped' if preempted else 'finished'} at step {step}: loss "
                 f"{'n/a' if loss is None else f'{loss:.4f}'}, weights sha256 {result.weights_digest}", every_worker=True)
        return result

    def close(self) -> None:
        """Deletes a non-chief worker's private checkpoint directory."""
        self.writer.close()
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
