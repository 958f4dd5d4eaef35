"""No committed data file names a machine's paths: bundles, benchmark results, docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(^|[\s\"'(=])/(work|root|home|Users|tmp|var/folders)/")
FILES = sorted([*REPO.glob("batch_caption/models/*/*.json"), *REPO.glob("batch_caption/models/*/*.md"),
                *REPO.glob("bench/results/*.json"), *REPO.glob("docs/*.md"), REPO / "README.md"])


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_names_no_machine_path(path):
    found = [line for line in path.read_text(encoding="utf-8").splitlines() if MACHINE_PATH.search(line)]
    assert not found, found[:3]


def test_the_pattern_finds_one():
    assert MACHINE_PATH.search('"command": "x --work /tmp/drill"') and not MACHINE_PATH.search("bench/.corpus/tmp/x")
