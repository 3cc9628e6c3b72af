"""The layout rules of ``bindings/`` (README "Layout"), read from the source with ``ast``:

- no module imports another module's private (``_``-prefixed) name, nor reaches into one through
  an imported module (``native._helper``);
- no import cycle among the modules of ``bitempered`` (function-level imports count too: a lazy
  import only hides a cycle);
- feature modules (fused linear head, vocab-parallel) never import their framework's public API
  module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each import package's source lives (pyproject's package-dir)
PACKAGE_DIRS = {"bitempered.bindings": ROOT / "bindings", "bitempered.kernels": ROOT / "kernels"}
FEATURE_MODULES = ("linear", "vocab_parallel")


def _module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    return modules


MODULES = _module_files()


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Imports(ast.NodeVisitor):
    """Every import of a ``bitempered`` module in one file, and the private names it reaches."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.edges: set[str] = set()
        self.private: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> imported bitempered module

    def _edge(self, name: str, line: int) -> None:
        if name in MODULES and name != self.module:
            self.edges.add(name)

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.startswith("bitempered."):
                self._edge(alias.name, node.lineno)
                if alias.asname:
                    self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node):
        source = _resolve(self.module, self.is_package, node.level, node.module)
        if not source.startswith("bitempered"):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in MODULES:  # ``from package import module``
                self._edge(full, node.lineno)
                self.aliases[alias.asname or alias.name] = full
            else:
                self._edge(source, node.lineno)
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    self.private.append(f"line {node.lineno}: from {source} import {alias.name}")

    def visit_Attribute(self, node):
        if (isinstance(node.value, ast.Name) and node.value.id in self.aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            self.private.append(f"line {node.lineno}: {node.value.id}.{node.attr} "
                                f"({self.aliases[node.value.id]})")
        self.generic_visit(node)


def _scan():
    found = {}
    for module, path in MODULES.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        found[module] = visitor
    return found


SCANNED = _scan()


def test_the_scan_sees_the_packages():
    """A scan that found nothing would pass every rule below: check it reads the real tree."""
    assert "bitempered.bindings.torch.api" in MODULES and "bitempered.bindings.jax.api" in MODULES
    assert "bitempered.bindings.torch.native.loss" in SCANNED["bitempered.bindings.torch.api"].edges or any(
        "bitempered.bindings.torch.native.loss" in v.edges for v in SCANNED.values())


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("bitempered.bindings")))
def test_no_private_names_of_other_modules(module):
    assert not SCANNED[module].private, "\n".join(SCANNED[module].private)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles():
    assert _cycles({module: visitor.edges for module, visitor in SCANNED.items()}) == []


def test_cycle_search_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_private_reach_is_detected():
    visitor = _Imports("bitempered.bindings.torch.linear", False)
    visitor.visit(ast.parse("from bitempered.bindings.torch import ops\nfrom .rows import _scale\nops._triton()\n"))
    assert len(visitor.private) == 2


@pytest.mark.parametrize("module", [f"bitempered.bindings.{framework}.{feature}" for framework in ("torch", "jax")
                                    for feature in FEATURE_MODULES] + ["bitempered.bindings.torch.dtensor"])
def test_feature_modules_do_not_import_the_public_api(module):
    framework = module.split(".")[2]
    assert f"bitempered.bindings.{framework}.api" not in SCANNED[module].edges


@pytest.mark.parametrize("name, home", [("MAX_PASSES", "bitempered.kernels.launch_config"),
                                        ("REDUCTIONS", "bitempered.bindings.common.validation")])
def test_shared_constants_are_defined_once(name, home):
    """The solver's pass cap and the reductions have one definition each; others import it."""
    defined_in = sorted(module for module, path in MODULES.items()
                        for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                                for t in node.targets))
    assert defined_in == [home]
