"""The linter's settings (pyproject.toml [tool.ruff]) hold for the whole tree, and they
catch what they are there for: an import of another module's private name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("ruff")


def _ruff(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_tree_is_clean():
    done = _ruff(".")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("source, rule", [
    ("from batch_caption.core.read import _FileFn\n\nprint(_FileFn)\n", "PLC2701"),
    ("import os\n", "F401"),
    ("x = '" + "a" * 140 + "'\n", "E501"),
])
def test_the_rules_catch_what_they_are_for(tmp_path, source, rule):
    (tmp_path / "probe.py").write_text(source)
    config = ("--config", str(REPO / "pyproject.toml"))
    assert _ruff(*config, "probe.py", cwd=tmp_path).returncode == 1
    # ... and that rule is what fails it.
    assert _ruff(*config, "--extend-ignore", rule, "probe.py", cwd=tmp_path).returncode == 0
