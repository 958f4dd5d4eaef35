"""The models shipped inside the package, by name, and which one the job uses by default.

    BundledModel        one bundled model: its bundle, its sample images, its calibration
    BUNDLED             name -> BundledModel, every model the package ships
    DEFAULT_MODEL_NAME  the model of a run without --model
    find                a --model value (name, "bundled:<name>" or path) -> BundledModel or None
    resolve             a --model value -> a bundle path on this installation
    portable            a bundled model's path -> "bundled:<name>", what a worker resolves again
    low_score_threshold a bundle id -> its calibrated --low_score_threshold

Adding a model: its bundle goes in batch_caption/models/<name>/, its samples in a directory
under batch_caption/samples/, and one BundledModel line below. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import json
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MARKER = "bundled:"
# The default model too: the marker earlier versions' manifests and commands carry.
LEGACY_MARKER = "bundled:default_model"


@dataclasses.dataclass(frozen=True)
class BundledModel:
    """A model bundle shipped in the package.

    name: what --model takes ("scenes"), and "bundled:<name>" on the workers.
    directory: the bundle, relative to the package.
    samples: the images the job captions when no input is given, relative to the package
      (only the files directly in it: subdirectories hold other models' samples).
    low_score: the default --low_score_threshold with this bundle, as its calibration
      chose it (bench/results/low_score_<name>.json, whose bundle id tests/test_quality.py
      checks against the bundle's).
    """

    name: str
    directory: str
    samples: str
    low_score: float

    def __post_init__(self):
        if not self.name or "/" in self.name or ":" in self.name:
            raise ValueError(f"a bundled model's name must be a plain word, got {self.name!r}")

    @property
    def path(self) -> str:
        return os.path.join(PACKAGE_DIR, self.directory)

    @property
    def samples_dir(self) -> str:
        return os.path.join(PACKAGE_DIR, self.samples)

    @property
    def marker(self) -> str:
        return MARKER + self.name

    def installed(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "bundle.json"))

    def sample_files(self) -> list[str]:
        """The sample images: the files directly in `samples` (none when it is absent)."""
        if not os.path.isdir(self.samples_dir):
            return []
        return sorted(e.path for e in os.scandir(self.samples_dir) if e.is_file() and not e.name.startswith("."))

    def bundle_id(self) -> str | None:
        """The installed bundle's id (from bundle.json, unverified), None when absent."""
        try:
            with open(os.path.join(self.path, "bundle.json"), encoding="utf-8") as f:
                return json.load(f)["bundle_id"]
        except (OSError, ValueError, KeyError):
            return None


BUNDLED = {m.name: m for m in (
    # Synthetic scenes of coloured shapes (batch_caption.data.scenes): jobs/train_scenes_model.sh.
    BundledModel("scenes", "models/scenes", "samples/scenes", low_score=-0.54),
    # Real photos: EfficientNet-Lite0 + attention LSTM on Flickr8k, jobs/train_flickr8k.sh.
    BundledModel("flickr8k", "models/flickr8k", "samples/photos", low_score=-1.09),
)}
DEFAULT_MODEL_NAME = "flickr8k"


def default() -> BundledModel:
    return BUNDLED[DEFAULT_MODEL_NAME]


def find(model: str) -> BundledModel | None:
    """The bundled model a --model value names: a name, "bundled:<name>", the legacy
    "bundled:default_model" (the default) or a bundled model's own path. Other values
    (paths) give None. An unknown "bundled:" name raises KeyError."""
    if model == LEGACY_MARKER:
        return default()
    if model.startswith(MARKER):
        name = model[len(MARKER):]
        if name not in BUNDLED:
            raise KeyError(f"no bundled model {name!r} (bundled: {', '.join(BUNDLED)})")
        return BUNDLED[name]
    if model in BUNDLED:
        return BUNDLED[model]
    local = "://" not in model and os.path.abspath(model)
    for m in BUNDLED.values():
        if local == m.path:
            return m
    return None


def resolve(model: str) -> str:
    """A --model value -> the bundle's path here: a bundled model's installed directory,
    any other path as given. A bare name wins over a directory of the same name
    ("./scenes" is the directory)."""
    bundled = find(model)
    return bundled.path if bundled else model


def portable(path: str) -> str:
    """A bundled model's path on this machine -> its marker (its path on a worker differs);
    other paths as given."""
    bundled = find(path)
    return bundled.marker if bundled else path


def low_score_threshold(bundle_id: str) -> float:
    """The calibrated low_score threshold of the bundled model with this id, wherever its
    copy lives; a bundle with no calibration of its own gets the default model's."""
    for m in BUNDLED.values():
        if m.bundle_id() == bundle_id:
            return m.low_score
    return default().low_score
