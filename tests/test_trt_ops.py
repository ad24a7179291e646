"""TensorRT readiness without TensorRT (echo_export/trt_ops.py): the operator matrix refuses what
TensorRT's ONNX parser would, by node and reason, and every precision's TensorRT form passes it."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from echo_export import trt_ops  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, t=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, t, list(shape))


def test_the_matrix_file_names_its_source_and_version():
    m = trt_ops.load_matrix()
    assert "onnx-tensorrt" in m["source"] and m["tensorrt_version"] and m["opset_max"] >= 21
    assert m["operators"]["MatMul"]["supported"] and not m["operators"]["Unique"]["supported"]
    assert "INT4" in m["operators"]["DequantizeLinear"]["types"]


def test_a_plain_float_graph_passes():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_vi("x")], [_vi("y", shape=(2, 3))], [w])
    assert trt_ops.check_model(m) == []


@pytest.mark.parametrize("case", ["onnxruntime_op", "unsupported_op", "opset", "dtype", "zero_point", "layernorm_output"])
def test_what_tensorrt_refuses_is_named(case):
    """One graph per reason; the problem names the node and why."""
    x, y = _vi("x"), _vi("y")
    if case == "onnxruntime_op":
        m = _model([helper.make_node("FastGelu", ["x"], ["y"], name="fg", domain="com.microsoft")], [x], [y],
                   extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
        want = ("fg", "domain 'com.microsoft'")
    elif case == "unsupported_op":
        m = _model([helper.make_node("Unique", ["x"], ["y"], name="u")], [x], [_vi("y", shape=(None,))])
        want = ("u", "not supported")
    elif case == "opset":
        m = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y], opset=25)
        want = ("(model)", "opset 25 outside")
    elif case == "dtype":
        m = _model([helper.make_node("MatMul", ["x", "x2"], ["y"], name="imm")], [_vi("x", TensorProto.INT32),
                   _vi("x2", TensorProto.INT32, (4, 4))], [_vi("y", TensorProto.INT32)])
        want = ("imm", "type INT32 not in")
    elif case == "zero_point":
        inits = [numpy_helper.from_array(np.ones(4, np.int8), "q"), numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.array(3, np.int8), "zp")]
        m = _model([helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dq"),
                    helper.make_node("Add", ["x", "d"], ["y"], name="add")], [x], [y], inits)
        want = ("dq", "nonzero zero point")
    else:
        inits = [numpy_helper.from_array(np.ones(4, np.float32), "g")]
        m = _model([helper.make_node("LayerNormalization", ["x", "g"], ["n", "mean"], name="ln"),
                    helper.make_node("Add", ["n", "mean"], ["y"], name="add")], [x], [y], inits)
        want = ("ln", "only the first output")
    problems = trt_ops.check_model(m)
    assert any(p.node == want[0] and want[1] in p.reason for p in problems), problems
    print(f"\n{case}: {problems[0]}")


@pytest.fixture(scope="module")
def all_precisions(tmp_path_factory):
    """The varied test model built in every registry precision (the build runs the check itself)."""
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from runtime import precisions
    from tests.conftest import make_tokenizer
    from tests.test_export import write_varied_dataset
    from varied_models import as_stage, get_varied

    root = tmp_path_factory.mktemp("trt")
    tok = make_tokenizer()
    model = as_stage(get_varied(tok, shifted=True, causal_context=True), "dcd", block_size=4)
    model.cfg.max_response_tokens = 12
    save_checkpoint(root / "ckpt", model, tok)
    data = write_varied_dataset(root / "data", 2, 1)
    logs: list[str] = []
    out = build(BuildOptions(ckpt=root / "ckpt", out=root / "engine", precisions=list(precisions.NAMES), capacity=96,
                             calib_size=2, verify_n=1, data=data, int8_mode="u8s7",
                             precision_options={"int4": {"method": "rtn"}}), log=logs.append)
    return out, logs


def test_every_precision_tensorrt_form_passes_and_is_recorded(all_precisions):
    from runtime import precisions

    out, logs = all_precisions
    info = json.loads((out / "manifest.json").read_text())["precision_info"]
    for p in precisions.NAMES:
        if p in ("int8w", "int8dyn"):  # blockwise 8-bit, DynamicQuantizeMatMul: no TensorRT form, recorded as such
            assert not info[p]["tensorrt_ready"] and "no TensorRT form" in info[p]["tensorrt_reason"]
            continue
        assert info[p]["tensorrt_ready"] and info[p]["tensorrt_graphs"] == 2, (p, info[p])
        assert f"  {p}: 2 TensorRT form(s) pass" in logs
    # the onnxruntime graphs of int4 are not TensorRT's: the TensorRT form is what makes them pass
    assert any("MatMulNBits" in str(p) or "com.microsoft" in str(p) for p in trt_ops.check_file(out / "block_step.int4.b1.onnx"))


def test_a_node_the_matrix_refuses_fails_the_check_by_name(all_precisions, monkeypatch):
    """With Softmax taken out of the matrix, every graph's attention softmax is named as refused."""
    out, _ = all_precisions
    man = json.loads((out / "manifest.json").read_text())
    files = {(role, key.split(".")[0], int(key.split(".b")[1])): name for role, by in man["graphs"].items()
             for key, name in by.items()}
    m = copy.deepcopy(trt_ops.load_matrix())
    m["operators"]["Softmax"]["supported"] = False
    monkeypatch.setattr(trt_ops, "load_matrix", lambda path=None: m)
    with pytest.raises(trt_ops.TensorRTNotReady, match=r"block_step\.int4\.b1\.onnx: node '.*' \(Softmax\): not supported"):
        trt_ops.check_engine_folder(out, files, log=lambda s: None)
    assert not list(out.glob(".trtcheck.*"))  # the temporary TensorRT forms are gone
    # --tensorrt-check warn: the build goes on, and the precision is recorded as not TensorRT-ready
    warned = trt_ops.check_engine_folder(out, files, log=lambda s: None, strict=False)
    assert not warned["int4"]["tensorrt_ready"] and "Softmax" in warned["int4"]["tensorrt_problems"][0]


def test_the_mask_token_exclusion_exports_without_a_bool_scatter(tiny_tokenizer):
    """At a real vocabulary (16,000 here) the exporter no longer folds `onehot[token_id] = True` into
    a constant, and TensorRT's ScatterElements takes no BOOL: the exclusion is a comparison instead."""
    import torch

    from echo_export.graphs import exclude_token

    class Head(torch.nn.Module):
        def forward(self, logits):
            return exclude_token(logits, 7)

    path = str(__import__("tempfile").mkdtemp()) + "/head.onnx"
    torch.onnx.export(Head(), (torch.zeros(1, 4, 16000),), path, dynamo=True, opset_version=18)
    m = onnx.load(path)
    assert trt_ops.check_model(m) == [], trt_ops.check_model(m)
    # the old form is refused, and the problem says which line of the model's code made the node
    class OldHead(torch.nn.Module):
        def forward(self, logits):
            onehot = torch.zeros(logits.shape[-1], dtype=torch.bool)
            onehot[7] = True
            return torch.where(onehot, torch.full_like(logits, -3e4), logits)

    torch.onnx.export(OldHead(), (torch.zeros(1, 4, 16000),), path, dynamo=True, opset_version=18)
    old = [str(p) for p in trt_ops.check_model(onnx.load(path))]
    assert len(old) == 1 and "ScatterElements" in old[0] and "type BOOL" in old[0] and "[test_trt_ops.py:" in old[0], old
    got = exclude_token(torch.ones(1, 2, 16000), 7)
    assert float(got[0, 0, 7]) < -1e4 and float(got[0, 0, 6]) == 1.0
