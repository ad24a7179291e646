"""The layer rule, benchmarks -> echo_export -> echo_train -> runtime, read from the source.

Every import of every module counts: top-level, inside functions, relative ones resolved to
their package, and importlib.import_module / __import__ calls with a literal name. The
runtime is the torch-free bottom layer, so it may not import torch or transformers either.
"""
from __future__ import annotations

import ast
from pathlib import Path

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
            # `from . import x` imports the submodule x (or a name of the package: either way, inside it)
            found += [(node.lineno, name)] if node.module else [(node.lineno, f"{name}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(layer: str, root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted((root / layer).rglob("*.py")):
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
    assert names == ["numpy", "runtime.schedule", "echo_train.model", "echo_train.decoding.common", "torch",
                     "echo_export.build", "benchmarks.cli"]
    assert [n for _, n in imported_modules("from .errors import E", "runtime", is_package=True)] == ["runtime.errors"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(layer):
    assert (ROOT / layer / "__init__.py").is_file()
    bad = violations(layer)
    assert not bad, f"{layer} may not import {sorted(FORBIDDEN[layer])}:\n" + "\n".join(bad)
