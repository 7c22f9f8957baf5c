"""The package's layering, read from the source (every import, also those inside functions): the framework's
folders never import the tiny world, lower layers never import higher ones, and no module imports itself through
others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "covipal"
FRAMEWORK = ("models", "data", "pruning", "training", "evaluation", "efficiency")
# each layer may import only the layers after it (entry points → {training, evaluation, efficiency} → pruning →
# {models, data})
LOWER = {
    "training": {"pruning", "models", "data"},
    "evaluation": {"pruning", "models", "data"},
    "efficiency": {"pruning", "models", "data"},
    "pruning": {"models", "data"},
    "models": {"data"},
    "data": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the covipal modules it imports (anywhere in its source)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("covipal"):
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_the_graph_is_read():
    graph = imports()
    assert "covipal.tiny_world.model" in graph["covipal.pretrain"]  # an entry point reaches the miniature
    assert "covipal.pruning.session" in graph["covipal.evaluation.vlmevalkit.model"]


@pytest.mark.parametrize("layer", FRAMEWORK)
def test_the_framework_never_imports_the_tiny_world(layer):
    offenders = {
        module: sorted(t for t in targets if t.startswith("covipal.tiny_world"))
        for module, targets in imports().items()
        if folder(module) == layer
    }
    assert {m: t for m, t in offenders.items() if t} == {}


@pytest.mark.parametrize("layer", FRAMEWORK)
def test_lower_layers_never_import_higher_ones(layer):
    allowed = LOWER[layer] | {layer}
    offenders = {
        module: sorted(t for t in targets if folder(t) in FRAMEWORK and folder(t) not in allowed)
        for module, targets in imports().items()
        if folder(module) == layer
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_pruners_never_import_each_other():
    pruners = {"covipal.pruning." + name for name in ("covipal", "fastv", "pdrop", "sparsevlm", "visionzip")}
    pruners |= {"covipal.pruning." + name for name in ("vitcop", "random", "pool", "none")}
    graph = imports()
    assert {p: sorted(graph[p] & pruners) for p in pruners if graph[p] & pruners} == {}


def test_no_import_circles():
    graph = imports()
    circles, done = [], set()

    def visit(module, path):
        if module in path:
            circles.append(path[path.index(module) :] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert circles == []
