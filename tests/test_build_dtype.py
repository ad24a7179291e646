"""The build in the checkpoint's own dtype (issue 30): an fp16 build of a bf16 checkpoint never
holds fp32 weights, writes no weights.fp32.bin, and gives the folder an fp32-then-fp16 build
gives; a build that cannot fit refuses before the heavy work with its estimate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_tiny_model, make_tokenizer, write_tiny_dataset

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

BLOCK, MAX_NEW, CAP = 4, 8, 64


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory) -> Path:
    from echo_train.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bf16")
    tok = make_tokenizer()
    model = make_tiny_model(tok, stage="dcd", block_size=BLOCK)
    model.cfg.max_response_tokens = MAX_NEW
    save_checkpoint(root / "ckpt", model.to(torch.bfloat16), tok)
    write_tiny_dataset(root / "data")
    return root


def _build(root: Path, name: str, precisions: list[str], **kw) -> Path:
    from echo_export.build import BuildOptions, build

    opts = dict(ckpt=root / "ckpt", out=root / name, precisions=precisions, capacity=CAP, verify_n=2,
                data=root / "data", summary_json=root / f"{name}.json")
    return build(BuildOptions(**{**opts, **kw}), log=lambda s: None)


def test_checkpoint_loads_in_its_own_dtype(bf16_ckpt):
    from echo_train.model.checkpoint import checkpoint_dtype, load_checkpoint

    assert checkpoint_dtype(bf16_ckpt / "ckpt") == torch.bfloat16
    model, _ = load_checkpoint(bf16_ckpt / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fp32_compute_of_a_bf16_model_is_the_fp32_model(bf16_ckpt):
    from echo_export.graphs import example_inputs, make_graph
    from echo_export.stream_export import fp32_compute
    from echo_train.model.checkpoint import load_checkpoint
    from runtime import graph_io as gio

    wide, tok = load_checkpoint(bf16_ckpt / "ckpt")
    narrow, _ = load_checkpoint(bf16_ckpt / "ckpt", dtype=torch.bfloat16)
    P = len(tok.prefix_ids(wide.n_image_tokens))
    x = example_inputs(gio.VISION_PREFILL, wide.cfg, 1, CAP, P)
    x = (torch.rand_like(x[0]), x[1])
    with torch.no_grad(), fp32_compute(narrow):
        got = make_graph(gio.VISION_PREFILL, narrow, CAP, P, tok.mask_id)(*x)
    want = make_graph(gio.VISION_PREFILL, wide, CAP, P, tok.mask_id)(*x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert {p.dtype for p in narrow.parameters()} == {torch.bfloat16}  # the hooks put the bf16 weights back


def test_fp16_only_build_is_the_fp32_then_fp16_build(bf16_ckpt):
    from runtime.engine import EchoRuntime

    both = _build(bf16_ckpt, "both", ["fp32", "fp16"])
    only = _build(bf16_ckpt, "only", ["fp16"])
    assert not (only / "weights.fp32.bin").exists()
    assert not list(only.glob("*.fp32.*"))
    man = json.loads((only / "manifest.json").read_text())
    assert man["precisions"] == ["fp16"] and man["verified"] is False
    # the same graphs and the same fp16 bytes as through fp32
    assert (only / "weights.fp16.bin").read_bytes() == (both / "weights.fp16.bin").read_bytes()
    for g in sorted(only.glob("*.fp16.*.onnx")):
        assert g.read_bytes() == (both / g.name).read_bytes(), g.name
    rep = json.loads((only / "verify.json").read_text())
    assert rep["verification"]["checked"] == ["fp16"] and "no fp32 graphs" in rep["verification"]["base"]
    assert rep["fp32_identical"] is None
    img = (np.arange(32 * 32) % 7 / 7.0).reshape(1, 32, 32).astype(np.float32)
    toks = [EchoRuntime(f, precision="fp16").generate(img)[0].tokens for f in (both, only)]
    assert toks[0] == toks[1]
