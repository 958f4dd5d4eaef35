"""Synthetic captioning scenes whose true content is known.

No real dataset or pretrained weights are reachable, so caption quality is
measured on generated scenes: 1-4 flat, saturated shapes on a neutral grey
background, each with reference captions in varied but regular phrasing and a
JSON "facts" record that :mod:`batch_caption.data.facts` checks captions
against ("content accuracy"). Everything aims at a task a small CNN+LSTM can
learn at 96-128 px:

* a closed vocabulary (5 shapes x 7 colours x 2 sizes), colours far from each
  other and from the grey backgrounds, sizes from disjoint ranges;
* unambiguous relations: with >= 2 objects each sits in its own cell of a 3x3
  grid, so two objects are either aligned or clearly apart; :class:`Scene`
  re-checks this on construction;
* a compositional hold-out: the (colour, shape) pairs in :data:`HELD_OUT_PAIRS`
  occur only in the "compositional" split;
* determinism: scene ``i`` of a split comes from ``SeedSequence([seed,
  split_index, i])``, so a longer run extends a shorter one; image ids are
  ``(split_index + 1) * 10_000_000 + i``, unique across splits.

Captions (lower case) come from a few templates (:func:`caption_candidates`):
explicit numbers state the exact count, "a"/"an" means "at least one", and a
relation word always links the two object phrases right next to it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND_TONES",
    "COLOURS",
    "COLOUR_RGB",
    "HELD_OUT_PAIRS",
    "INVERSE_RELATION",
    "PATTERNS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "SPLIT_ID_STRIDE",
    "Background",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "caption_candidates",
    "generate_scenes",
    "is_held_out",
    "reference_captions",
    "render_scene",
    "write_dataset",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLOUR_RGB: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 35),
        "orange": (245, 135, 20),
        "yellow": (245, 220, 35),
        "green": (35, 165, 60),
        "blue": (35, 80, 225),
        "purple": (140, 55, 190),
        "white": (245, 245, 245),
    }
)
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)
SIZES: tuple[str, ...] = ("small", "large")
# Nominal grey level of each background tone (the caption word -> level).
BACKGROUND_TONES: Mapping[str, float] = MappingProxyType(
    {"dark grey": 62.0, "grey": 112.0, "light grey": 160.0}
)
PATTERNS: tuple[str, ...] = ("plain", "gradient", "texture")
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")
# One pair per shape and per colour, so every colour and shape keeps four or
# more training partners (orange and white are never held out).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "star"),
    ("yellow", "square"),
    ("purple", "diamond"),
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: Mapping[str, str] = MappingProxyType(
    {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
)
SPLIT_ID_STRIDE = 10_000_000

# Layout geometry as fractions of the image size.
_GRID: tuple[float, ...] = (0.18, 0.5, 0.82)
_ALIGN_TOL = 0.05  # centres this close on an axis count as aligned
_RELATION_MARGIN = 0.2  # centres this far apart on an axis give a relation
_MIN_GAP_PX = 1.0  # bounding boxes of two objects must be this far apart
_MAX_ROTATION = 15.0  # degrees; more would blur square vs diamond
_MAX_RGB_DEVIATION = 40  # per channel, from the nominal colour
_MAX_TONE_DEVIATION = 12.0  # grey levels, from the nominal tone
_SIZE_RATIO = 1.4  # every large radius >= this x every small one in a scene
_NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
_SHADING = 0.05  # +-5 % top-to-bottom shading keeps colours recognisable
_CAPTION_STREAM = 0xCA9  # separates the caption rng from the scene rng


def is_held_out(colour: str, shape: str) -> bool:
    """Whether the (colour, shape) pair is reserved for the compositional split."""
    return (colour, shape) in HELD_OUT_PAIRS


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of floats, got {value!r}") from None
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class SceneConfig:
    """Generation and rendering parameters.

    Radii and jitter are fractions of ``image_size``; the defaults keep >= 4 px
    between neighbouring grid objects and between objects and the border at
    128 px. ``captions_per_image`` is how many references :func:`write_dataset`
    stores per image (the candidate pool always has at least 6).
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 3
    small_radius: tuple[float, float] = (0.06, 0.07)
    large_radius: tuple[float, float] = (0.115, 0.13)
    position_jitter: float = 0.012
    colour_jitter: int = 10
    supersample: int = 4
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        _check_int("image_size", self.image_size, 32, 1024)
        _check_int("min_objects", self.min_objects, 1, 4)
        _check_int("max_objects", self.max_objects, 1, 4)
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})"
            )
        small = _check_range("small_radius", self.small_radius, 0.02, 0.2)
        large = _check_range("large_radius", self.large_radius, 0.02, 0.2)
        object.__setattr__(self, "small_radius", small)
        object.__setattr__(self, "large_radius", large)
        if large[0] < 1.5 * small[1]:
            raise ValueError(
                "large_radius low end must be >= 1.5x small_radius high end so sizes "
                f"are unambiguous, got small={small} large={large}"
            )
        jitter = float(self.position_jitter)
        if not 0.0 <= jitter <= 0.02:
            raise ValueError(f"position_jitter must be in [0, 0.02], got {self.position_jitter}")
        object.__setattr__(self, "position_jitter", jitter)
        spacing = _GRID[1] - _GRID[0]
        if 2 * large[1] + 2 * jitter > spacing - 0.02:
            raise ValueError(
                f"large_radius {large} with jitter {jitter} would let neighbouring grid "
                "objects touch; lower large_radius or position_jitter"
            )
        if _GRID[0] - jitter - large[1] < 0.02:
            raise ValueError("large_radius too big: grid objects would touch the border")
        _check_int("colour_jitter", self.colour_jitter, 0, 20)
        _check_int("supersample", self.supersample, 1, 8)
        _check_int("captions_per_image", self.captions_per_image, 1, 6)

    def radius_range(self, size: str) -> tuple[float, float]:
        """Radius range in pixels for ``size`` ("small" or "large")."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        lo, hi = self.small_radius if size == "small" else self.large_radius
        return lo * self.image_size, hi * self.image_size


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; geometry is in pixels (x right, y down).

    ``radius`` is half the side of the object's square bounding box (every
    shape is scaled to fill it, the diamond only vertically), ``rotation`` a
    small jitter in degrees, ``rgb`` the drawn colour (defaults to the nominal
    colour; must stay close to it so the colour name remains true).
    """

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    radius: float
    rotation: float = 0.0
    rgb: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {COLOURS}, got {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        try:
            cx, cy = (float(v) for v in self.center)
        except (TypeError, ValueError):
            raise ValueError(f"center must be an (x, y) pair, got {self.center!r}") from None
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise ValueError(f"center must be finite, got {self.center!r}")
        object.__setattr__(self, "center", (cx, cy))
        radius = float(self.radius)
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a positive number, got {self.radius!r}")
        object.__setattr__(self, "radius", radius)
        rotation = float(self.rotation)
        if not abs(rotation) <= _MAX_ROTATION:
            raise ValueError(f"rotation must be within +-{_MAX_ROTATION} degrees, got {rotation}")
        if self.shape == "square" and rotation != 0.0:
            # A rotated square starts to look like a diamond.
            raise ValueError("squares must not be rotated (rotation must be 0)")
        object.__setattr__(self, "rotation", rotation)
        nominal = COLOUR_RGB[self.colour]
        rgb = nominal if self.rgb is None else tuple(int(v) for v in self.rgb)
        if len(rgb) != 3 or any(not 0 <= v <= 255 for v in rgb):
            raise ValueError(f"rgb must be three ints in [0, 255], got {self.rgb!r}")
        if any(abs(a - b) > _MAX_RGB_DEVIATION for a, b in zip(rgb, nominal)):
            raise ValueError(
                f"rgb {rgb} is too far from nominal {self.colour} {nominal} "
                f"(max {_MAX_RGB_DEVIATION} per channel)"
            )
        object.__setattr__(self, "rgb", rgb)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounding box in pixels."""
        cx, cy = self.center
        return (cx - self.radius, cy - self.radius, cx + self.radius, cy + self.radius)

    @property
    def description(self) -> str:
        """E.g. ``"large red circle"``."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    """Neutral grey background: ``tone`` is what captions may say about it.

    ``pattern`` is "plain", "gradient" (linear ramp of +-``amplitude`` grey
    levels along ``angle`` degrees) or "texture" (smooth blotches of
    +-``amplitude``); every pattern adds faint pixel noise from ``noise_seed``.
    """

    tone: str
    pattern: str = "plain"
    level: float | None = None
    angle: float = 0.0
    amplitude: float = 0.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.tone not in BACKGROUND_TONES:
            raise ValueError(f"tone must be one of {tuple(BACKGROUND_TONES)}, got {self.tone!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        nominal = BACKGROUND_TONES[self.tone]
        level = nominal if self.level is None else float(self.level)
        if not abs(level - nominal) <= _MAX_TONE_DEVIATION:
            raise ValueError(
                f"level {level} is too far from the {self.tone!r} tone ({nominal} +- "
                f"{_MAX_TONE_DEVIATION})"
            )
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "angle", float(self.angle))
        amplitude = float(self.amplitude)
        if not 0.0 <= amplitude <= 16.0:
            raise ValueError(f"amplitude must be in [0, 16] grey levels, got {self.amplitude}")
        object.__setattr__(self, "amplitude", amplitude)
        _check_int("noise_seed", self.noise_seed, 0, 2**63 - 1)

    @property
    def description(self) -> str:
        """E.g. ``"dark grey gradient"``, ``"plain grey"``, ``"textured light grey"``."""
        if self.pattern == "plain":
            return f"plain {self.tone}"
        if self.pattern == "texture":
            return f"textured {self.tone}"
        return f"{self.tone} gradient"


def _axis_relation(delta: float, image_size: int) -> int:
    """-1/+1 when ``delta`` (b - a) is a clear relation, 0 when aligned; else error."""
    if abs(delta) <= _ALIGN_TOL * image_size:
        return 0
    if abs(delta) >= _RELATION_MARGIN * image_size:
        return 1 if delta > 0 else -1
    raise ValueError(
        f"objects are {abs(delta):.1f} px apart on an axis: neither aligned "
        f"(<= {_ALIGN_TOL * image_size:.1f}) nor clearly apart "
        f"(>= {_RELATION_MARGIN * image_size:.1f}), so relations would be ambiguous"
    )


def _pair_relations(a: SceneObject, b: SceneObject, image_size: int) -> list[str]:
    """Relations that hold for ``a`` w.r.t. ``b`` ("a is <rel> b")."""
    rels = []
    horizontal = _axis_relation(b.center[0] - a.center[0], image_size)
    vertical = _axis_relation(b.center[1] - a.center[1], image_size)
    if horizontal:
        rels.append("left of" if horizontal > 0 else "right of")
    if vertical:
        rels.append("above" if vertical > 0 else "below")
    return rels


@dataclass(frozen=True)
class Scene:
    """A generated scene: what is in the image, and which split it belongs to.

    ``id`` is the integer image id (unique across splits when produced by
    :func:`generate_scenes`), ``seed`` drives the background noise and the
    default caption phrasing. Construction checks that objects lie inside the
    image, do not overlap, have unambiguous relations and consistent sizes,
    and that the split respects the compositional hold-out.
    """

    id: int
    split: str
    image_size: int
    objects: tuple[SceneObject, ...]
    background: Background
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("id", self.id, 0, 2**31 - 1)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        _check_int("image_size", self.image_size, 32, 1024)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= len(_NUMBER_WORDS) - 1:
            most = len(_NUMBER_WORDS) - 1
            raise ValueError(f"a scene needs 1-{most} objects, got {len(objects)}")
        if not all(isinstance(o, SceneObject) for o in objects):
            raise ValueError("objects must be SceneObject instances")
        if not isinstance(self.background, Background):
            raise ValueError("background must be a Background instance")
        size = self.image_size
        for obj in objects:
            x0, y0, x1, y1 = obj.bbox
            if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
                raise ValueError(f"{obj.description} at {obj.center} sticks out of the image")
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
                if gap < _MIN_GAP_PX:
                    raise ValueError(f"{a.description} and {b.description} overlap or touch")
                _pair_relations(a, b, size)  # raises when ambiguous
        small = [o.radius for o in objects if o.size == "small"]
        large = [o.radius for o in objects if o.size == "large"]
        if small and large and min(large) < _SIZE_RATIO * max(small):
            raise ValueError(
                f"large objects must be >= {_SIZE_RATIO}x the radius of small ones in a scene"
            )
        held = [o for o in objects if is_held_out(o.colour, o.shape)]
        if self.split == "compositional" and not held:
            raise ValueError(
                "a compositional scene needs at least one held-out (colour, shape) pair"
            )
        if self.split != "compositional" and held:
            raise ValueError(
                f"{held[0].colour} {held[0].shape} is held out and cannot appear in {self.split!r}"
            )

    @property
    def name(self) -> str:
        """File stem, e.g. ``"train_0000042"``."""
        return f"{self.split}_{self.id % SPLIT_ID_STRIDE:07d}"

    def relations(self) -> list[tuple[int, str, int]]:
        """All (subject index, relation, object index) triples that hold."""
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i != j:
                    out.extend((i, rel, j) for rel in _pair_relations(a, b, self.image_size))
        return out

    def to_facts(self) -> dict[str, Any]:
        """JSON-serialisable ground truth consumed by :mod:`batch_caption.data.facts`.

        Keys: image_id, split, image_size, count, objects (index, shape,
        colour, size, center, bbox, radius - pixels, y down), relations
        (subject/object are indices into objects; both directions listed),
        background (tone, pattern, description), held_out (bool).
        """
        return {
            "image_id": int(self.id),
            "split": self.split,
            "image_size": int(self.image_size),
            "count": len(self.objects),
            "objects": [
                {
                    "index": i,
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "center": [round(o.center[0], 2), round(o.center[1], 2)],
                    "bbox": [round(v, 2) for v in o.bbox],
                    "radius": round(o.radius, 2),
                }
                for i, o in enumerate(self.objects)
            ],
            "relations": [
                {"subject": i, "relation": rel, "object": j} for i, rel, j in self.relations()
            ],
            "background": {
                "tone": self.background.tone,
                "pattern": self.background.pattern,
                "description": self.background.description,
            },
            "held_out": any(is_held_out(o.colour, o.shape) for o in self.objects),
        }


# --------------------------------------------------------------------------- generation


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _sample_scene(split: str, index: int, seed: int, config: SceneConfig) -> Scene:
    split_index = SPLITS.index(split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, index]))
    allowed = [(c, s) for c in COLOURS for s in SHAPES if not is_held_out(c, s)]
    every = [(c, s) for c in COLOURS for s in SHAPES]
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    if split == "compositional":
        kinds = [HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]]
        kinds += [every[int(rng.integers(len(every)))] for _ in range(n - 1)]
    else:
        kinds = [allowed[int(rng.integers(len(allowed)))] for _ in range(n)]
    sizes = [SIZES[int(rng.integers(2))] for _ in range(n)]
    img = config.image_size
    radii = [float(rng.uniform(*config.radius_range(s))) for s in sizes]
    if n == 1:
        # A lone object has no relations, so it may sit anywhere with a margin.
        lo, hi = radii[0] + 0.04 * img, img - radii[0] - 0.04 * img
        centers = [(float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))]
    else:
        cells = rng.choice(len(_GRID) ** 2, size=n, replace=False)
        jitter = config.position_jitter * img
        centers = [
            (
                _GRID[int(c) % 3] * img + float(rng.uniform(-jitter, jitter)),
                _GRID[int(c) // 3] * img + float(rng.uniform(-jitter, jitter)),
            )
            for c in cells
        ]
    objects = []
    for (colour, shape), size, radius, center in zip(kinds, sizes, radii, centers):
        rotation = float(rng.uniform(-6.0, 6.0)) if shape in ("triangle", "star") else 0.0
        noise = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        rgb = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(COLOUR_RGB[colour], noise))
        objects.append(SceneObject(shape, colour, size, center, radius, rotation, rgb))
    # Left-to-right (then top-to-bottom) order makes the captions' object order regular.
    spacing = (_GRID[1] - _GRID[0]) * img
    objects.sort(key=lambda o: (round((o.center[0] - _GRID[0] * img) / spacing), o.center[1]))
    tone = tuple(BACKGROUND_TONES)[int(rng.integers(len(BACKGROUND_TONES)))]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    background = Background(
        tone=tone,
        pattern=pattern,
        level=BACKGROUND_TONES[tone] + float(rng.uniform(-6.0, 6.0)),
        angle=float(rng.uniform(0.0, 360.0)),
        amplitude={"plain": 0.0, "gradient": 14.0, "texture": 10.0}[pattern],
        noise_seed=int(rng.integers(2**63 - 1)),
    )
    return Scene(
        id=(split_index + 1) * SPLIT_ID_STRIDE + index,
        split=split,
        image_size=img,
        objects=tuple(objects),
        background=background,
        seed=int(rng.integers(2**63 - 1)),
    )


def generate_scenes(
    split: str, count: int, seed: int = 0, config: SceneConfig | None = None
) -> list[Scene]:
    """Generate ``count`` scenes of ``split`` deterministically from ``seed``.

    Scene ``i`` depends only on (seed, split, i, config), so the result for a
    smaller ``count`` is a prefix of the result for a larger one.
    """
    _check_split(split)
    _check_int("count", count, 0, SPLIT_ID_STRIDE - 1)
    _check_int("seed", seed, 0, 2**63 - 1)
    config = config or SceneConfig()
    return [_sample_scene(split, i, int(seed), config) for i in range(int(count))]


# --------------------------------------------------------------------------- rendering


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` around (0, 0), unrotated, y down."""
    if shape == "square":
        return [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    if shape == "triangle":
        return [(math.sin(a), -math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        return [
            (r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
            for k, r in ((k, 1.0 if k % 2 == 0 else 0.45) for k in range(10))
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _outline(obj: SceneObject) -> list[tuple[float, float]]:
    """Pixel polygon of ``obj``: rotated, then scaled to fill its bounding box."""
    theta = math.radians(obj.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    pts = [(x * cos - y * sin, x * sin + y * cos) for x, y in _unit_outline(obj.shape)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    # Centre the polygon's box on the object centre and scale its larger side
    # to 2 * radius, so every shape has the same extent for a given radius.
    mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    cx, cy = obj.center
    scale = obj.radius / half
    return [(cx + (x - mx) * scale, cy + (y - my) * scale) for x, y in pts]


def _object_alpha(obj: SceneObject, image_size: int, supersample: int) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1], drawn at ``supersample``x and box-filtered."""
    big = image_size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if obj.shape == "circle":
        draw.ellipse([v * supersample for v in obj.bbox], fill=255)
    else:
        draw.polygon([(x * supersample, y * supersample) for x, y in _outline(obj)], fill=255)
    small = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background_pixels(background: Background, image_size: int) -> np.ndarray:
    rng = np.random.default_rng(background.noise_seed)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    field = np.zeros((image_size, image_size), dtype=np.float32)
    if background.pattern == "gradient":
        theta = math.radians(background.angle)
        ramp = xs * math.cos(theta) + ys * math.sin(theta)
        field = background.amplitude * ramp / math.sqrt(0.5)
    elif background.pattern == "texture":
        coarse = rng.standard_normal((6, 6)).astype(np.float32)
        smooth = Image.fromarray(coarse, mode="F").resize(
            (image_size, image_size), Image.Resampling.BICUBIC
        )
        blotches = np.asarray(smooth, dtype=np.float32)
        field = background.amplitude * blotches / max(float(np.abs(blotches).max()), 1e-6)
    sigma = 3.0 if background.pattern == "texture" else 1.5
    grain = rng.normal(0.0, sigma, size=(image_size, image_size)).astype(np.float32)
    grey = background.level + field + grain
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_scene(scene: Scene, config: SceneConfig | None = None) -> Image.Image:
    """Render ``scene`` to an RGB image of ``scene.image_size`` pixels.

    ``config`` only supplies rendering options (``supersample``); its
    ``image_size`` must match the scene's. Output is deterministic.
    """
    config = config or SceneConfig(image_size=scene.image_size)
    if config.image_size != scene.image_size:
        raise ValueError(
            f"config.image_size {config.image_size} != scene.image_size {scene.image_size}; "
            "generate the scenes with the same config (or resize the rendered image)"
        )
    size = scene.image_size
    pixels = _background_pixels(scene.background, size)
    rows = np.arange(size, dtype=np.float32)[:, None] + 0.5
    for obj in scene.objects:
        alpha = _object_alpha(obj, size, config.supersample)[:, :, None]
        # Slightly lighter at the top, darker at the bottom: looks less flat
        # while staying within a few percent of the named colour.
        rel = np.clip((obj.center[1] - rows) / obj.radius, -1.0, 1.0)
        shade = np.broadcast_to(1.0 + _SHADING * rel, (size, size))[:, :, None]
        colour = np.asarray(obj.rgb, dtype=np.float32) * shade
        pixels = pixels * (1.0 - alpha) + colour * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _phrase(count: int, words: str) -> str:
    """``"a red circle"`` / ``"two red circles"``; numbers > 1 state the exact count."""
    if count == 1:
        return f"{_article(words)} {words}"
    return f"{_NUMBER_WORDS[count]} {words}s"


def _full(obj: SceneObject) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}"


def _short(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def _group_phrases(objects: Sequence[SceneObject], describe: Any) -> list[str]:
    """Group objects sharing a description (first-seen order) into counted phrases."""
    groups: dict[str, int] = {}
    for obj in objects:
        groups[describe(obj)] = groups.get(describe(obj), 0) + 1
    return [_phrase(k, words) for words, k in groups.items()]


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


_RELATION_PHRASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "left of": ("to the left of", "left of"),
        "right of": ("to the right of", "right of"),
        "above": ("above",),
        "below": ("below", "under"),
    }
)


def _as_rng(rng: np.random.Generator | int | None, scene: Scene) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng([scene.seed, _CAPTION_STREAM])
    if isinstance(rng, np.random.Generator):
        return rng
    _check_int("rng", rng, 0, 2**63 - 1)
    return np.random.default_rng(int(rng))


def _relational_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Captions stating a relation, using only objects whose description is unique.

    Uniqueness keeps the statement about *that* object; the remaining objects
    are listed after "and" (which the fact checker never links by a relation).
    """
    objs = scene.objects
    rels = scene.relations()
    out: list[str] = []
    for describe, prefix in ((_full, ""), (_short, "there is ")):
        names = [describe(o) for o in objs]
        unique = {i for i, n in enumerate(names) if names.count(n) == 1}
        pairs = sorted({(i, j) for i, _, j in rels if i in unique and j in unique})
        if not pairs:
            continue
        i, j = pairs[int(rng.integers(len(pairs)))]
        pair_rels = [r for a, r, b in rels if (a, b) == (i, j)]
        rel = pair_rels[int(rng.integers(len(pair_rels)))]
        words = _RELATION_PHRASES[rel][int(rng.integers(len(_RELATION_PHRASES[rel])))]
        text = f"{prefix}{_phrase(1, names[i])} {words} {_phrase(1, names[j])}"
        rest = [o for k, o in enumerate(objs) if k not in (i, j)]
        if rest:
            text += " and " + _join(_group_phrases(rest, describe))
        out.append(text)
    # Two relations in one caption, for three or more distinct objects.
    names = [_short(o) for o in objs]
    unique = [i for i, n in enumerate(names) if names.count(n) == 1]
    if len(unique) >= 3:
        order = [unique[int(k)] for k in rng.permutation(len(unique))]
        a, b, c = order[:3]
        rel_ab = [r for s, r, o in rels if (s, o) == (a, b)]
        rel_cb = [r for s, r, o in rels if (s, o) == (c, b)]
        if rel_ab and rel_cb:
            r1 = _RELATION_PHRASES[rel_ab[0]][0]
            r2 = _RELATION_PHRASES[rel_cb[-1]][0]
            out.append(
                f"{_phrase(1, names[a])} is {r1} {_phrase(1, names[b])}, "
                f"and {_phrase(1, names[c])} is {r2} the {names[b]}"
            )
    return out


def caption_candidates(
    scene: Scene, rng: np.random.Generator | int | None = None
) -> tuple[list[str], list[str]]:
    """All template captions for ``scene``: (plain captions, relational captions).

    Templates (``F`` = "size colour shape", ``S`` = "colour shape", lists of
    counted groups "a F, a F and two Fs", ``N`` = number word, ``BG`` = tone):

    * one object: "a F", "a S", "a F on a BG background", "there is one S",
      "a single F", "one S on a BG background", "an image of a F",
      "one shape: a F";
    * several: "<F list>", "<S list>", "N shapes: <F list>",
      "there are N shapes: <S list>", "<F list> on a BG background",
      "N objects on a BG background: <S list>";
    * relational (several, when two objects have unique descriptions):
      "a F <rel> a F [and <rest>]", "there is a S <rel> a S [and <rest>]",
      and for three distinct objects "a S is <rel> a S, and a S is <rel> the S".

    The plain list has >= 6 distinct captions. ``rng`` picks relation pairs and
    synonyms; ``None`` derives it from ``scene.seed``.
    """
    gen = _as_rng(rng, scene)
    objs = scene.objects
    bg = scene.background.tone
    if len(objs) == 1:
        o = objs[0]
        plain = [
            _phrase(1, _full(o)),
            _phrase(1, _short(o)),
            f"{_phrase(1, _full(o))} on a {bg} background",
            f"there is one {_short(o)}",
            f"a single {_full(o)}",
            f"one {_short(o)} on a {bg} background",
            f"an image of {_phrase(1, _full(o))}",
            f"one shape: {_phrase(1, _full(o))}",
        ]
        return plain, []
    n = _NUMBER_WORDS[len(objs)]
    full = _join(_group_phrases(objs, _full))
    short = _join(_group_phrases(objs, _short))
    plain = [
        full,
        short,
        f"{n} shapes: {full}",
        f"there are {n} shapes: {short}",
        f"{full} on a {bg} background",
        f"{n} objects on a {bg} background: {short}",
    ]
    return plain, _relational_captions(scene, gen)


def reference_captions(
    scene: Scene, rng: np.random.Generator | int | None = None, n: int = 5
) -> list[str]:
    """``n`` (default 5, at most 6) distinct true captions for ``scene``.

    Drawn from :func:`caption_candidates`; a multi-object scene with a
    describable relation always gets at least one relational caption.
    ``rng`` may be a Generator, an int seed, or None (derived from the scene).
    """
    _check_int("n", n, 1, 6)
    gen = _as_rng(rng, scene)
    plain, relational = caption_candidates(scene, gen)
    chosen: list[str] = []
    if relational:
        chosen.append(relational[int(gen.integers(len(relational)))])
    rest = [c for c in plain + relational if c not in chosen]
    chosen += [rest[int(k)] for k in gen.permutation(len(rest))[: n - len(chosen)]]
    return chosen


# --------------------------------------------------------------------------- dataset files

_IMAGE_FORMATS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {"png": ("png", "PNG"), "jpg": ("jpg", "JPEG"), "jpeg": ("jpg", "JPEG")}
)


def _write_json(path: Path, payload: Any) -> None:
    # Write-then-rename so a crash never leaves a truncated JSON file behind.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False)
    os.replace(tmp, path)


def write_dataset(
    out_dir: str | os.PathLike[str],
    counts: Mapping[str, int],
    seed: int = 0,
    config: SceneConfig | None = None,
    image_format: str = "png",
) -> dict[str, Any]:
    """Render splits to disk in COCO captions layout, plus ground-truth facts.

    Writes, for each split in ``counts``:

    * ``out_dir/images/<split>/<split>_<index:07d>.<ext>``;
    * ``out_dir/captions_<split>.json`` - COCO captions: ``info``,
      ``licenses`` (empty), ``images`` [{id, file_name (relative to out_dir),
      width, height}], ``annotations`` [{id, image_id, caption}] with
      ``config.captions_per_image`` captions per image; annotation id is
      ``image_id * 10 + k``;
    * ``out_dir/scenes_<split>.json`` - ``{"<image_id>": facts}`` where facts
      is :meth:`Scene.to_facts` plus ``file_name``; feed it to
      :func:`batch_caption.data.facts.content_accuracy`.

    Image and annotation ids are unique across splits. Returns a summary:
    ``{"out_dir", "seed", "image_size", "image_format", "held_out_pairs",
    "splits": {split: {"count", "n_captions", "images_dir", "captions_file",
    "scenes_file"}}}`` (paths as strings).
    """
    fmt = str(image_format).lower()
    if fmt not in _IMAGE_FORMATS:
        raise ValueError(
            f"image_format must be one of {tuple(_IMAGE_FORMATS)}, got {image_format!r}"
        )
    ext, pil_format = _IMAGE_FORMATS[fmt]
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError("counts must be a non-empty mapping of split -> count")
    for split, count in counts.items():
        _check_split(split)
        _check_int(f"counts[{split!r}]", count, 0, SPLIT_ID_STRIDE - 1)
    _check_int("seed", seed, 0, 2**63 - 1)
    config = config or SceneConfig()
    out = Path(out_dir)
    summary: dict[str, Any] = {
        "out_dir": str(out),
        "seed": int(seed),
        "image_size": config.image_size,
        "image_format": ext,
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "splits": {},
    }
    for split in (s for s in SPLITS if s in counts):
        scenes = generate_scenes(split, counts[split], seed, config)
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations, facts = [], [], {}
        for scene in scenes:
            file_name = f"images/{split}/{scene.name}.{ext}"
            image = render_scene(scene, config)
            save_args = {"quality": 95} if pil_format == "JPEG" else {}
            image.save(out / file_name, format=pil_format, **save_args)
            images.append(
                {
                    "id": scene.id,
                    "file_name": file_name,
                    "width": scene.image_size,
                    "height": scene.image_size,
                }
            )
            captions = reference_captions(scene, None, config.captions_per_image)
            annotations += [
                {"id": scene.id * 10 + k, "image_id": scene.id, "caption": caption}
                for k, caption in enumerate(captions)
            ]
            facts[str(scene.id)] = {**scene.to_facts(), "file_name": file_name}
        info = {
            "description": "batch_caption synthetic scenes",
            "version": "1",
            "split": split,
            "seed": int(seed),
            "image_size": config.image_size,
            "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        }
        captions_file = out / f"captions_{split}.json"
        scenes_file = out / f"scenes_{split}.json"
        _write_json(
            captions_file,
            {"info": info, "licenses": [], "images": images, "annotations": annotations},
        )
        _write_json(scenes_file, facts)
        summary["splits"][split] = {
            "count": len(scenes),
            "n_captions": len(annotations),
            "images_dir": str(image_dir),
            "captions_file": str(captions_file),
            "scenes_file": str(scenes_file),
        }
    return summary
