"""The custom training loop: one code path for every tf.distribute strategy.

Not `model.fit`: Keras 3's fit breaks under MultiWorkerMirroredStrategy, clips gradients
per replica before summing them, and its callbacks have no notion of a chief. The loop is
`strategy.run(replica_step)` inside one `tf.function` per training stage:

    replica_step(batch [per-replica B], stop flag):
        forward, loss_sum and real-token count of this replica (caption_loss, or
            distill.distillation_loss against --teachers run on the same batch)
        local gradient sums = d loss_sum / d weights
        ONE all-reduce (SUM) of [loss_sum, count, stop], the gradients, BN moving stats
        loss = global sum / global count;  grads = reduced / global count
        clip by global norm (after the reduction: every replica clips identically)
        optimizer.apply (optim.PreReduced*: no second aggregation)
        BN moving stats <- their mean over replicas (Keras keeps them per replica)

With one replica this is exactly the plain mean-token-loss step. No XLA: collectives
cannot run inside it on CPU. With --fine_tune_after_steps K the CNN is frozen for steps
[0, K), then trained by its own optimizer (one tf.function per stage: Keras bakes
`trainable` in). Checkpoints go to OUTPUT/checkpoints on the chief and to a private
temporary directory on other workers (saving may run collectives); every worker restores
from the chief's, so OUTPUT must be shared storage across machines. A resumed run reseeds
the data order from (seed, step): shuffle buffers are not checkpointed. Stop requests
(SIGTERM, SIGINT): see `training.stop`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from batch_caption.storage import files
from batch_caption.model.bundle import save_bundle
from batch_caption.model.attend_and_tell import attention_penalty
from batch_caption.model.network import build_model
from batch_caption.model.show_and_tell import caption_loss
from batch_caption.training import distill
from batch_caption.training import input as data_input
from batch_caption.training import optim
from batch_caption.training.config import TrainConfig, TrainingError, UsageError
from batch_caption.training.preflight import TRAIN_CONFIG_NAME, DatasetSpec
from batch_caption.training.result import RESULT_NAME, TrainResult, weights_digest
from batch_caption.training.samples import SampleCaptions
from batch_caption.training.stop import StopRequest
from batch_caption.training.strategy import Role

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
      config: resolved options (preflight.resolve).
      spec: the prepared dataset.
      strategy, role: from strategy.create_strategy.
      log: where progress lines go (print).
    """

    def __init__(self, config: TrainConfig, spec: DatasetSpec, strategy, role: Role, log: Callable[[str], None] = print):
        self.config, self.model_config, self.spec = config, config.model, spec
        self.strategy, self.role, self._print = strategy, role, log
        self.replicas = strategy.num_replicas_in_sync
        if config.global_batch_size % self.replicas:
            raise UsageError(f"--global_batch_size {config.global_batch_size} is not divisible by the "
                             f"{self.replicas} replicas of this strategy")
        self.key = data_input.input_key(spec.info)
        self.encoder_start = config.fine_tune_after_steps if self.key == "images" and config.model.train_encoder else None
        with strategy.scope():
            self._build_model()
            self._build_optimizers()
            self.teachers = distill.Teachers(config.teachers) if config.teachers else None
            self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        objects = {"model": self.model, "optimizer": self.decoder_optimizer, "step": self.step_var}
        if self.encoder_optimizer is not None:
            objects["encoder_optimizer"] = self.encoder_optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        # Chief: the real directory. Others: a private one (deleted by close()); they must
        # still save, because saving distributed variables may run collectives.
        self._temp_dir = None if role.is_chief else tempfile.mkdtemp(
            prefix=f"batch_caption-train-{role.task_type}{role.task_id}-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, config.checkpoint_dir if role.is_chief else self._temp_dir, max_to_keep=config.keep_checkpoints
        )
        self.writer = tf.summary.create_file_writer(config.log_dir) if role.is_chief else tf.summary.create_noop_writer()
        self._train_steps: dict[bool, Callable] = {}
        self._eval_step = None
        self._samples = SampleCaptions(self.model, spec, config.eval_split, config.num_samples, self.key)

    # --- setup -----------------------------------------------------------------------
    def _build_model(self):
        model = build_model(self.model_config)  # loads --encoder_weights into the backbone
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
        floats = ("float16", "bfloat16", "float32", "float64")
        self.state_vars = [v for v in backbone.non_trainable_variables if v.dtype in floats]
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
        penalty = self.config.attention_penalty  # TrainConfig allows it only with a decoder that has attention maps
        teachers, teacher_weight = self.teachers, self.config.teacher_weight

        def replica_step(batch, stop):
            ctx = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                inputs = {key: batch[key], "tokens": batch["tokens"]}
                if penalty:
                    logits, alphas = model.call_with_attention(inputs, training=True)
                else:
                    logits = model(inputs, training=True)
                if teachers is None:
                    loss_sum, count = caption_loss(batch["targets"], logits)
                else:
                    loss_sum, count = distill.distillation_loss(batch["targets"], logits, teachers.probs(inputs),
                                                                teacher_weight)
                if penalty:  # summed like the token losses: normalised by the global token count
                    loss_sum += penalty * attention_penalty(alphas, batch["targets"])
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
            table, first = self._samples.table()
            with self.writer.as_default():
                tf.summary.text("val/samples", table, step=step)
            line += f"  sample: {first}"
        self.writer.flush()
        self.log(line)
        return val_loss

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
            with tf.io.gfile.GFile(files.join(c.output, TRAIN_CONFIG_NAME), "w") as f:
                f.write(c.to_json())
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
            bundle_id = save_bundle(self.model, self.spec.vocabulary, export_path, c.export_weights_dtype)
            self.log(f"exported bundle {bundle_id} to {export_path}")
        result = TrainResult(
            step=step, steps=c.steps, loss=loss, val_loss=val_loss, examples_per_second=rate,
            resumed_from=resumed_from, preempted=preempted, is_chief=self.role.is_chief,
            checkpoint=self.manager.latest_checkpoint if self.role.is_chief else None,
            export_path=export_path, bundle_id=bundle_id, weights_digest=weights_digest(self.model),
            elapsed_seconds=round(time.monotonic() - started, 3),
        )
        if self.role.is_chief:
            with tf.io.gfile.GFile(files.join(c.output, RESULT_NAME), "w") as f:
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
