"""The house plan (docs/architecture.md, "Layers"): imports run downward only, no module
imports itself through others, and in-function imports are kept to the listed cases.

Read from the sources with ``ast`` (nothing is imported), so a violation fails here whatever
is installed. Layers, bottom to top:

    0 config            1 data, prompts, models, rewards, metrics
    2 the Megatron runtime (model_providers: knows no RL)
    3 rollout, algorithms, bridge      4 the trainer (training)
    5 cli, launch, evaluation, report, ablate
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> installed package name (setup.py's package_dir)
PACKAGES = {"megatron_ivr": "megatron_ivr", "model_providers": "megatron_ivr.model_providers",
            "launch": "megatron_ivr.launch"}
LAYERS = [
    ("megatron_ivr", "megatron_ivr.config"),
    ("megatron_ivr.data", "megatron_ivr.prompts", "megatron_ivr.models", "megatron_ivr.rewards",
     "megatron_ivr.metrics"),
    ("megatron_ivr.model_providers",),
    ("megatron_ivr.rollout", "megatron_ivr.algorithms", "megatron_ivr.bridge"),
    ("megatron_ivr.training",),
    ("megatron_ivr.cli", "megatron_ivr.launch", "megatron_ivr.evaluation", "megatron_ivr.report",
     "megatron_ivr.ablate"),
]
RUNTIME_AND_TRAINER = ("megatron_ivr.model_providers", "megatron_ivr.training")
# where an import of our own modules may sit inside a function: the CLI's subcommands (each
# imports only what it runs, so that ``megatron-ivr --help`` and ``data synth`` stay light)
IN_FUNCTION_ALLOWED = {"megatron_ivr.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """The layer of a module: the longest listed prefix it falls under."""
    best, found = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and len(prefix) > best:
                best, found = len(prefix), index
    if found is None:
        raise AssertionError(f"{module} is in no layer: add its package to LAYERS in tests/test_layers.py")
    return found


def _target(module: str, node: ast.ImportFrom | ast.Import, alias: ast.alias) -> str:
    if isinstance(node, ast.Import):
        name = alias.name
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        name = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _optional(tree: ast.AST) -> set[int]:
    """The imports under ``try: ... except ImportError`` (an optional module or a name that not
    every megatron-core version has): they may sit in a function."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, inside a function, line) for every import of our own modules and of
    megatron (imported as ``megatron...``); an optional import (``_optional``) counts as at the
    top."""
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        in_function -= _optional(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    target = _target(module, node, alias)
                    if target in MODULES or target.split(".")[0] == "megatron":
                        out.append((module, target, id(node) in in_function, node.lineno))
    return out


IMPORTS = imports()


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_run_downward_only():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}) at line {line}"
              for a, b, _, line in IMPORTS if b in MODULES and layer_of(b) > layer_of(a)]
    assert upward == [], "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    """No module reaches itself through imports, in functions included (a package counts as
    the modules its ``__init__`` imports, so a package is not in a cycle with its own parts)."""
    edges = defaultdict(set)
    for a, b, _, _ in IMPORTS:
        if b in MODULES and b != a and not (MODULES[b].name == "__init__.py" and _within(a, b)):
            edges[a].add(b)
    assert cycles(edges) == []


def test_own_modules_imported_at_module_top():
    inside = [f"{a}:{line} imports {b} inside a function" for a, b, in_function, line in IMPORTS
              if in_function and b in MODULES and a not in IN_FUNCTION_ALLOWED]
    assert inside == [], "\n".join(inside)


@pytest.mark.parametrize("package", RUNTIME_AND_TRAINER)
def test_megatron_imported_at_module_top(package):
    inside = [f"{a}:{line} imports {b} inside a function" for a, b, in_function, line in IMPORTS
              if in_function and b.split(".")[0] == "megatron" and _within(a, package)]
    assert inside == [], "\n".join(inside)


def test_only_runtime_and_above_import_megatron():
    """megatron-core is the runtime's business: config, data, models, rewards and prompts run
    without it (``data synth`` and the graders do not import it)."""
    below = [f"{a}:{line} imports {b}" for a, b, _, line in IMPORTS
             if b.split(".")[0] == "megatron" and layer_of(a) < layer_of("megatron_ivr.model_providers")]
    assert below == [], "\n".join(below)
