"""What a training run did: `TrainResult` (OUTPUT/result.json) and the weights digest
that lets workers of one synchronous run, and a run and its export, be compared."""

from __future__ import annotations

import dataclasses

import keras

from batch_caption.model.bundle import arrays_digest

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


def weights_digest(model: keras.Model) -> str:
    """sha256 over every variable of `model` (bundle.arrays_digest, by variable path)."""
    return arrays_digest((w.path, keras.ops.convert_to_numpy(w.value)) for w in model.weights)
