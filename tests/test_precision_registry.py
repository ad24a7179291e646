"""The precision registry (runtime/precisions.py): one entry per precision, read by every layer."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime import precisions

ROOT = Path(__file__).resolve().parents[1]


def test_lookup_names_the_choices_and_parse_keeps_registry_order():
    assert precisions.get("fp16").name == "fp16"
    with pytest.raises(precisions.UnknownPrecision, match=r"unknown precision bf8; choose from fp32, fp16, int8"):
        precisions.get("bf8")
    with pytest.raises(ValueError):  # UnknownPrecision is a ValueError and an EchoRuntimeError
        precisions.get("")
    assert precisions.parse_list("int8, fp16") == ["fp32", "fp16", "int8"]  # fp32 always, registry order
    assert precisions.parse_list(["FP16", "fp16"]) == ["fp32", "fp16"]
    with pytest.raises(precisions.UnknownPrecision):
        precisions.parse_list(" , ")


def test_entries_say_what_the_layers_used_to_hard_code():
    """The values that engine.py / verify.py / build.py spelled out before the registry."""
    from runtime import graph_io
    from runtime.engine import SHARED_PRECISIONS, fp16_cpu_session_bytes

    assert graph_io.PRECISIONS == precisions.NAMES
    assert {"fp32", "int8"} <= set(SHARED_PRECISIONS) and "fp16" not in SHARED_PRECISIONS
    assert fp16_cpu_session_bytes(10, sessions=2) == 40  # fp16 on a CPU: an fp32 copy per session
    assert precisions.get("fp32").cpu_session_bytes(10, sessions=2) == 10  # shared: once
    assert precisions.get("fp32").tolerances.must_be_identical
    assert [p for p in precisions.NAMES if precisions.get(p).needs_calibration] == \
        [p for p in precisions.NAMES if p in ("int8", "int4", "int8dyn")]


def test_every_converter_and_tensorrt_form_resolves():
    """The "module:function" names in the registry exist (a typo would only show in a build)."""
    import importlib

    for p in precisions.PRECISIONS.values():
        for spec in (p.converter, p.tensorrt_form):
            if spec is not None:
                module, _, name = spec.partition(":")
                assert callable(getattr(importlib.import_module(module), name)), (p.name, spec)


def test_cli_choices_come_from_the_registry(monkeypatch):
    """echo-report, echo-serve and echo-bench offer exactly the registry's precisions."""
    import click

    from benchmarks.engines import engine_names
    from echo_serve.cli import main as serve_main
    from runtime.cli import main as report_main

    for cmd in (report_main, serve_main):
        opt = next(o for o in cmd.params if o.name == "precision")
        assert isinstance(opt.type, click.Choice) and tuple(opt.type.choices) == precisions.NAMES
    assert [e for e in engine_names("cpu") if e.startswith("ort-")] == [f"ort-{p}" for p in precisions.NAMES]


def test_no_layer_spells_out_the_precision_list():
    """No tuple or list literal holding two or more precision names outside the registry (the
    code review found eight such lists before it)."""
    names = set(precisions.NAMES)
    found = []
    packages = sorted(d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file())  # every layer, new ones too
    assert {"runtime", "echo_export", "echo_serve", "benchmarks"} <= set(packages)
    for layer in packages:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if path.name == "precisions.py" or "results" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Tuple, ast.List)):
                    vals = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                    if len(vals & names) >= 2:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
