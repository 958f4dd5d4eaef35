"""The benchmarks name only public, existing names of the package, so a rename or a move
in batch_caption fails here instead of in the next benchmark run."""

from __future__ import annotations

import ast
import importlib
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
SCRIPTS = sorted(n[:-3] for n in os.listdir(BENCH) if n.endswith(".py"))


def _package_names(tree: ast.AST) -> list[tuple[str, str]]:
    """(module, name) for every name a script takes from batch_caption: names imported from
    it, and attributes read off the modules it imports (`from batch_caption import x; x.y`)."""
    modules: dict[str, str] = {}  # local alias -> batch_caption module
    named: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "batch_caption":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                try:
                    importlib.import_module(full)
                    modules[alias.asname or alias.name] = full
                except ImportError:
                    named.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "batch_caption" and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            named.append((modules[node.value.id], node.attr))
    return named


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bench_script_imports_and_names_only_public_package_names(script, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    importlib.import_module(script)  # its own imports resolve (no Beam or TensorFlow needed for --help)
    with open(os.path.join(BENCH, f"{script}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for module, name in _package_names(tree):
        assert not name.startswith("_"), f"bench/{script}.py names the private {module}.{name}"
        assert hasattr(importlib.import_module(module), name), f"bench/{script}.py names {module}.{name}, gone"


def test_the_profiled_phases_exist():
    from batch_caption import pipeline

    phases = pipeline.timed_phases()
    assert [label for _, _, label in phases][0] == "match"
    for cls, method, _ in phases:
        assert callable(getattr(cls, method)), f"{cls.__name__}.{method}"


def test_the_tf_data_pipeline_captions_every_jpeg_once_from_the_jobs_pixels(tmp_path, monkeypatch):
    """bench/tf_data_pipeline.py, vs_tf_data.py's baseline: one record per JPEG, from pixels
    within half a grey level of the job's decode on average, DCT-scaled or not."""
    import json

    import numpy as np
    from PIL import Image

    from batch_caption.images import decoding

    monkeypatch.syspath_prepend(BENCH)
    import tf_data_pipeline as pipeline

    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 48), (640, 480), (1100, 600), (2200, 1100)]):  # ratio 1, 1, 2, 4 at 128 px
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize(size, Image.Resampling.BICUBIC)
        smooth.save(tmp_path / f"{i}.jpg", quality=90)
    paths = pipeline.jpeg_files(str(tmp_path))
    (named, pixels), = pipeline.image_dataset(paths, 128, 8).as_numpy_iterator()
    config = decoding.ImageConfig(image_size=128)
    job = np.stack([decoding.decode_image((tmp_path / f"{i}.jpg").read_bytes(), config).pixels for i in range(4)])
    assert [p.decode() for p in named] == paths
    assert np.abs(pixels.astype(int) - job).mean() < 0.5

    out = tmp_path / "captions.jsonl"
    assert pipeline.main(["--input", str(tmp_path), "--model", "scenes", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == paths
    assert all(r["caption"] and isinstance(r["score"], float) for r in records)


def teardown_module():
    sys.modules.pop("_common", None)
