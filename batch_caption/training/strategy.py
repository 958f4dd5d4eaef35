"""The tf.distribute strategy, chosen from flags and TF_CONFIG, and this process's role.

`create_strategy` must run before any other TensorFlow op: logical CPU devices can only be
configured, and a multi-worker strategy can only start its server, before the runtime is
initialised.
"""

from __future__ import annotations

import dataclasses
import json
import os

from batch_caption.training.config import UsageError


@dataclasses.dataclass(frozen=True)
class Role:
    """Who this process is in the cluster.

    is_chief: writes checkpoints to OUTPUT, summaries, the bundle and result.json. With
      TF_CONFIG: the "chief" task, or worker 0 when the cluster has no chief.
    """

    is_chief: bool = True
    task_type: str | None = None
    task_id: int = 0
    num_workers: int = 1

    @property
    def label(self) -> str:
        """"" for a lone process, else e.g. "worker 1: " (a log prefix)."""
        return f"{self.task_type} {self.task_id}: " if self.num_workers > 1 else ""


def read_tf_config(environ=os.environ) -> dict | None:
    """TF_CONFIG as a dict (None when unset); UsageError when it is malformed."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config.get("task", {})
        if not isinstance(cluster, dict) or not all(isinstance(v, list) for v in cluster.values()):
            raise ValueError("cluster must map task types to address lists")
        task_type, task_id = task.get("type"), int(task.get("index", 0))
        if task_type is not None and not 0 <= task_id < len(cluster.get(task_type, [])):
            raise ValueError(f"task {task_type}:{task_id} is not in the cluster")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"TF_CONFIG is invalid: {e}") from e
    return tf_config


def role_from_tf_config(tf_config: dict | None) -> Role:
    """The Role a TF_CONFIG describes (a lone chief when there is none)."""
    if not tf_config:
        return Role()
    cluster, task = tf_config["cluster"], tf_config.get("task", {})
    task_type, task_id = task.get("type"), int(task.get("index", 0))
    workers = sum(len(cluster.get(t, [])) for t in ("chief", "worker"))
    if task_type == "chief":
        chief = True
    elif task_type == "worker":
        chief = task_id == 0 and not cluster.get("chief")
    else:  # an evaluator or parameter server never trains here
        chief = task_type is None
    return Role(chief, task_type, task_id, max(workers, 1))


def resolve_name(name: str, tf_config: dict | None, num_cpu_devices: int) -> str:
    """Maps "auto" to a concrete strategy and checks TF_CONFIG against the choice (no TF)."""
    workers = role_from_tf_config(tf_config).num_workers
    if name == "auto":
        if workers > 1:
            return "multi_worker"
        return "mirrored" if num_cpu_devices > 1 else "one_device"  # several GPUs: see create_strategy
    if name == "multi_worker" and tf_config is None:
        raise UsageError("--strategy multi_worker needs the TF_CONFIG environment variable")
    if name not in ("multi_worker", "tpu") and workers > 1:
        raise UsageError(f"TF_CONFIG lists {workers} workers but --strategy {name} trains on one machine; "
                         "use --strategy multi_worker (or auto)")
    return name


def _configure_cpu_devices(tf, count: int) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as e:  # the runtime is already initialised (e.g. called twice in one process)
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UsageError(f"--num_cpu_devices {count}: TensorFlow is already initialised in this process ({e})") from e


def create_strategy(name: str, *, tpu: str = "", num_cpu_devices: int = 0):
    """Creates the strategy (first TF work of the process); returns (strategy, Role).

    name: a resolved name (see `resolve_name`) or "auto".
      one_device: the first GPU, else the CPU.
      mirrored:   every GPU, else every logical CPU device (see num_cpu_devices).
      multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG (collectives: NCCL on GPU,
        ring over gRPC on CPU).
      tpu: TPUClusterResolver(tpu) -> connect, initialise the TPU system, TPUStrategy. This
        path is written from the TensorFlow documentation and untested here (no TPU
        wheel for TF 2.21); on TPU the input is padded to static shapes (see input.py).
    """
    import tensorflow as tf

    tf_config = read_tf_config()
    resolved = resolve_name(name, tf_config, num_cpu_devices)
    if num_cpu_devices:
        _configure_cpu_devices(tf, num_cpu_devices)
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto" and resolved == "one_device" and len(gpus) > 1:
        resolved = "mirrored"
    if resolved == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        role = role_from_tf_config({"cluster": resolver.cluster_spec().as_dict(),
                                    "task": {"type": resolver.task_type, "index": resolver.task_id}})
        return strategy, role
    if resolved == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver), Role()
    if resolved == "default":
        return tf.distribute.get_strategy(), Role()
    if resolved == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices), Role()
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0"), Role()
