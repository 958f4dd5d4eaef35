"""The package's shape: modules small enough to read in one sitting, no import cycles."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "batch_caption"
MAX_LINES = 400
# Tables of scene vocabulary and the metric plumbing: long, but one job each.
LONG_MODULES_ALLOWED = {"data/scenes.py", "evaluate.py"}


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file, function bodies included."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from pkg import name` imports pkg.name when that is a module, else pkg.
            names.update(f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names)
    names = {n for n in names if n in known and n != module}
    return names | {p for n in names for p in _parents_run(module, n) if p in known}


def _parents_run(importer: str, target: str) -> list[str]:
    """The packages whose `__init__` importing `target` runs first: importing a.b.c runs
    a/__init__ and a/b/__init__, except the packages that hold `importer` (already running)."""
    parts = target.split(".")
    own = importer.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))
            if parts[:i] != own[:i]]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {m: _imported(m, p, set(modules)) for m, p in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# The entry points' own packages: each imports the shared ones (core and below), never
# another's modules.
STAGES = {
    "pipeline": ("batch_caption.pipeline",),
    "prepare": ("batch_caption.prepare",),
    "report": ("batch_caption.report",),
}


# What the stages share: none of it imports a stage's modules.
SHARED = ("batch_caption.core", "batch_caption.images", "batch_caption.storage")


def _shared(module: str) -> bool:
    return any(module == r or module.startswith(r + ".") for r in SHARED)


def _stage(module: str) -> str | None:
    return next((name for name, roots in STAGES.items()
                 if any(module == r or module.startswith(r + ".") for r in roots)), None)


def _reaches(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of one stage's module by another stage's."""
    return sorted(f"{m} -> {n}" for m, targets in graph.items() for n in targets
                  if _stage(m) and _stage(n) and _stage(m) != _stage(n))


def test_no_stage_imports_another_stages_modules():
    modules = _modules()
    graph = {m: _imported(m, p, set(modules)) for m, p in modules.items()}
    assert _reaches(graph) == []
    shared_reaching_up = [f"{m} -> {n}" for m, targets in graph.items() if _shared(m) for n in targets if _stage(n)]
    assert shared_reaching_up == []


def test_the_shared_packages_inits_import_nothing():
    """Importing one module of a shared package runs no other of it."""
    modules = _modules()
    assert {p: _imported(p, modules[p], set(modules)) for p in SHARED} == {p: set() for p in SHARED}


def test_a_reach_into_another_stage_is_found():
    graph = {"batch_caption.report.thumbnails": {"batch_caption.pipeline.config", "batch_caption.core.bounded_reads"},
             "batch_caption.pipeline.read": {"batch_caption.core.elements"}, "batch_caption.prepare": set()}
    assert _reaches(graph) == ["batch_caption.report.thumbnails -> batch_caption.pipeline.config"]


def test_importing_a_submodule_runs_its_parent_packages():
    assert _parents_run("x.y", "a.b.c") == ["a", "a.b"]
    assert _parents_run("a.b.d", "a.b.c") == []  # a and a.b are already running
    assert _parents_run("a.e", "a.b.c") == ["a.b"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")))
def test_module_is_short(name):
    lines = len((PACKAGE / name).read_text().splitlines())
    if name in LONG_MODULES_ALLOWED:
        return
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by what its parts do"
