"""The layer rule, benchmarks -> echo_export -> echo_train -> runtime, read from the source;
no import cycles between modules; no module using another module's private (`_name`) names.

Every import of every module counts: top-level, inside functions, relative ones resolved to
their package, and importlib.import_module / __import__ calls with a literal name. The
runtime is the torch-free bottom layer, so it may not import torch or transformers either.
An import inside a function still makes a cycle: it only moves the failure from import time to
the first call, and the two modules still cannot be understood (or moved) one without the other.
A `_name` is private to the module that defines it: another module reaching for it (an import,
`module._name`, or `obj._attr` where only other modules define `_attr`) makes the name public in
all but spelling, so it should be renamed public or the caller should use a public route.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "runtime": {"echo_serve", "echo_train", "echo_export", "benchmarks", "torch", "torchvision", "transformers"},
    # serving sits beside the runtime and imports it alone: an edge box installs no torch
    "echo_serve": {"echo_train", "echo_export", "benchmarks", "torch", "torchvision", "transformers"},
    # the DICOM node too: runtime only (not even echo_serve: it needs no Triton)
    "echo_dicom": {"echo_serve", "echo_train", "echo_export", "benchmarks", "torch", "torchvision", "transformers"},
    "echo_train": {"echo_export", "benchmarks"},
    "echo_export": {"benchmarks"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`, the module named `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            # `from p import x` runs p and, where x is a submodule, p.x: each alias is kept as p.x, and the
            # import graph resolves it to the longest module that exists (p.x, else p)
            found += [(node.lineno, f"{name}.{a.name}" if name else a.name) for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def python_files(root: Path, package: str) -> list[Path]:
    """The package's modules: .py files whose folders are importable names (so not what a benchmark
    unpacked into its ignored output folder, e.g. a peer's converter under benchmarks/out/)."""
    return [p for p in sorted((root / package).rglob("*.py"))
            if all(part.isidentifier() for part in p.relative_to(root).parts[:-1]) and "out" not in p.relative_to(root).parts[:-1]]


def violations(layer: str, root: Path = ROOT) -> list[str]:
    out = []
    for path in python_files(root, layer):
        mod = module_name(path, root)
        for line, name in imported_modules(path.read_text(), mod, path.name == "__init__.py"):
            if name.split(".")[0] in FORBIDDEN[layer]:
                out.append(f"{path.relative_to(root)}:{line}: {mod} imports {name}")
    return out


def test_the_scanner_sees_every_kind_of_import():
    src = (
        "import numpy as np, runtime.schedule\n"
        "from ..model import backbone\n"
        "from . import common\n"
        "def f():\n"
        "    import torch\n"
        "    from echo_export.build import build\n"
        "    importlib.import_module('benchmarks.cli')\n"
    )
    names = [n for _, n in imported_modules(src, "echo_train.decoding.ar")]
    assert names == ["numpy", "runtime.schedule", "echo_train.model.backbone", "echo_train.decoding.common", "torch",
                     "echo_export.build.build", "benchmarks.cli"]
    assert [n for _, n in imported_modules("from .errors import E", "runtime", is_package=True)] == ["runtime.errors.E"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(layer):
    assert (ROOT / layer / "__init__.py").is_file()
    bad = violations(layer)
    assert not bad, f"{layer} may not import {sorted(FORBIDDEN[layer])}:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- cycles and private names
PACKAGES = ("runtime", "echo_train", "echo_export", "echo_serve", "echo_dicom", "benchmarks")

# Known cycles, each as its modules (none: an entry here is a debt, and a stale one fails the test).
ALLOWED_CYCLES: set[frozenset[str]] = set()
# Known (module that reaches in, private name) pairs (none; the same rule as above).
ALLOWED_PRIVATE: set[tuple[str, str]] = set()


def package_modules(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """module name -> file, for every .py file under the packages."""
    return {module_name(p, root): p for pkg in packages for p in python_files(root, pkg)}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module file an import of `name` runs: `a.b.c` is module a.b.c, or a name inside a.b."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line}, inside the given modules only."""
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        edges = graph.setdefault(mod, {})
        for line, name in imported_modules(path.read_text(), mod, path.name == "__init__.py"):
            target = _resolve(name, modules)
            if target and target != mod:
                edges.setdefault(target, line)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, {}))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return sorted(found)


def describe_cycle(comp: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path],
                   root: Path = ROOT) -> str:
    edges = [f"  {modules[a].relative_to(root)}:{line}: {a} imports {b}"
             for a in comp for b, line in graph[a].items() if b in comp]
    return " <-> ".join(comp) + "\n" + "\n".join(edges)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_definitions(tree: ast.AST) -> set[str]:
    """The `_names` a module defines: functions, classes, assigned names and attributes (self._x = ...)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_private(node.name):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for x in ast.walk(target):
                    if isinstance(x, ast.Name) and _is_private(x.id):
                        out.add(x.id)
                    elif isinstance(x, ast.Attribute) and _is_private(x.attr):
                        out.add(x.attr)
    return out


def private_uses(modules: dict[str, Path], root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(module, private name, "file:line: what") for each use of another module's `_name`.

    An import `from m import _x` of one of our modules; an attribute `something._x` (not on
    self / cls) where `_x` is not defined in this module but is in another of ours. Private
    names of third-party libraries are not this rule's business."""
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    defined = {m: private_definitions(t) for m, t in trees.items()}
    defined_anywhere: set[str] = set().union(*defined.values()) if defined else set()
    found = []
    for mod, tree in trees.items():
        where = modules[mod].relative_to(root)
        package = mod.split(".") if modules[mod].name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    if _is_private(a.name) and _resolve(source, modules) not in (None, mod):
                        found.append((mod, a.name, f"{where}:{node.lineno}: {mod} imports {source}.{a.name}"))
            elif isinstance(node, ast.Attribute) and _is_private(node.attr):
                on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if not on_self and node.attr in defined_anywhere and node.attr not in defined[mod]:
                    found.append((mod, node.attr, f"{where}:{node.lineno}: {mod} uses {ast.unparse(node)}"))
    return found


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import g\n")  # the import that hides the cycle
    (pkg / "c.py").write_text("from . import a, b\n")  # imports both, in no cycle
    modules = package_modules(tmp_path, ["pkg"])
    graph = import_graph(modules)
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]
    assert "pkg/b.py:2: pkg.b imports pkg.a" in describe_cycle(["pkg.a", "pkg.b"], graph, modules, tmp_path)
    (pkg / "b.py").write_text("def f():\n    pass\n")
    assert import_cycles(import_graph(package_modules(tmp_path, ["pkg"]))) == []


def test_the_private_finder_sees_imports_and_attributes(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("class R:\n    def __init__(self):\n        self._graph = 1\n"
                              "    def _own(self):\n        return self._graph\n\ndef _helper():\n    pass\n")
    (pkg / "b.py").write_text("import pkg.a as a\nfrom .a import _helper\nimport sys\n"
                              "def f(rt):\n    sys._getframe()\n    a._helper()\n    return rt._graph\n")
    uses = private_uses(package_modules(tmp_path, ["pkg"]), tmp_path)
    assert sorted((m, n, w.split(":")[1]) for m, n, w in uses) == [
        ("pkg.b", "_graph", "7"), ("pkg.b", "_helper", "2"), ("pkg.b", "_helper", "6")]  # not sys._getframe


def test_no_import_cycles():
    modules = package_modules()
    graph = import_graph(modules)
    cycles = [c for c in import_cycles(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles (an import inside a function counts):\n" + "\n".join(
        describe_cycle(c, graph, modules) for c in cycles)
    stale = ALLOWED_CYCLES - {frozenset(c) for c in import_cycles(graph)}
    assert not stale, f"allowed cycles that no longer exist (remove them from ALLOWED_CYCLES): {stale}"


def test_no_module_uses_another_modules_private_names():
    uses = private_uses(package_modules())
    bad = [what for mod, name, what in uses if (mod, name) not in ALLOWED_PRIVATE]
    assert not bad, "private names used outside their module (make them public or use a public route):\n" + "\n".join(bad)
    stale = ALLOWED_PRIVATE - {(mod, name) for mod, name, _ in uses}
    assert not stale, f"allowed private uses that no longer exist (remove them from ALLOWED_PRIVATE): {stale}"
