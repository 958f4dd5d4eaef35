"""The test suite itself: no assertion that cannot fail."""

from __future__ import annotations

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def self_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, text) of each comparison in `source` with the same expression on both sides of
    one operator (`x == x`, also inside a chain such as `a < x == x`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(ast.unparse(a) == ast.unparse(b) for a, b in zip(sides, sides[1:])):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_scan_finds_a_value_compared_with_itself():
    source = "assert x == x\nassert f(a)['k'] != f(a)['k']\nassert 0 < n == n\nassert x == y\nassert x == (x)\n"
    assert [line for line, _ in self_comparisons(source)] == [1, 2, 3, 5]


def test_no_test_compares_a_value_with_itself():
    files = sorted(TESTS.rglob("*.py"))
    assert TESTS / "test_suite_hygiene.py" in files and len(files) > 40
    found = [f"{path.relative_to(TESTS)}:{line}: {text}" for path in files
             for line, text in self_comparisons(path.read_text(encoding="utf-8"))]
    assert found == []
