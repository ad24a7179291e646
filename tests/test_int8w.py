"""int8w: weight-only 8-bit MatMulNBits (echo_export/int4.py with bits=8, runtime/precisions.py):
the byte layout against onnxruntime's kernel at both accuracy levels, the options, and a built
engine's tokens against fp32's."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import helper  # noqa: E402

from echo_export import int4  # noqa: E402
from echo_export.precision import PrecisionError  # noqa: E402


def _session(qw: int4.QuantizedWeight, level: int, rows: int) -> ort.InferenceSession:
    wm = int4.WeightMatMul("mm", "W", False, "decoder")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    nodes, inits = int4._matmulnbits_nodes(wm, node, qw, level)
    n = qw.q.shape[0]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [rows, qw.k])],
                          [helper.make_tensor_value_info("y", 1, [rows, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(int4.MS_DOMAIN, 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("block", int4.BLOCK_SIZES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_8bit_packing_is_what_onnxruntime_computes(block, symmetric):
    """MatMulNBits bits=8 on our bytes computes x @ the weight we say we stored (fp32 arithmetic,
    accuracy_level 1), with a K that is not a multiple of the block; 8-bit levels are 16x finer
    than 4-bit's on the same weight."""
    rng = np.random.default_rng(block)
    k, n = 96, 40
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    qw = int4.quantize_blockwise(w, block, symmetric, bits=8)
    assert qw.bits == 8 and qw.q.max() <= 255 and (not symmetric or np.all(qw.zero_points == 128))
    deq = qw.dequantized()
    step = np.repeat(qw.scales.T, block, axis=0)[:k]
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-7)
    q4 = int4.quantize_blockwise(w, block, symmetric, bits=4)
    assert np.abs(deq - w).max() < np.abs(q4.dequantized() - w).max() / 8
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    got = _session(qw, 1, 3).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)


def test_8bit_int8_activation_kernel_stays_close():
    """accuracy_level 4 (activations quantised to int8 per block: the fast CPU path) stays within
    the activations' own rounding of the fp32-arithmetic result, for one row and for 16 rows."""
    rng = np.random.default_rng(1)
    k, n = 256, 64
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    qw = int4.quantize_blockwise(w, 32, True, bits=8)
    for rows in (1, 16):
        x = rng.normal(0, 1, (rows, k)).astype(np.float32)
        ref = x @ qw.dequantized()
        got = _session(qw, 4, rows).run(None, {"x": x})[0]
        assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


def test_int8w_options():
    o = int4.Int4Options.parse({}, bits=8, prefix="int8w")
    assert (o.bits, o.method, o.block_size) == (8, "rtn", 32)
    assert int4.Int4Options.parse({}).bits == 4 and int4.Int4Options.parse({}).method == "awq"
    with pytest.raises(PrecisionError, match="unknown int8w option.*bits"):
        int4.Int4Options.parse({"bits": "8"}, bits=8, prefix="int8w")
    with pytest.raises(PrecisionError, match="3 bits"):
        int4.Int4Options.parse({}, bits=3)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """fp32 + int8w (RTN, block 32) of the varied test model (tests/varied_models.py), with AR graphs."""
    from tests.test_export import build_varied_engine

    return build_varied_engine(tmp_path_factory.mktemp("int8w"), ["fp32", "int8w"])


def test_int8w_engine_tokens_equal_fp32(engine):
    """The int8w folder's reports equal fp32's token for token on the test images (8-bit weights,
    fp32 activations: far inside the tolerance int4 needs), every linear layer is a bits=8
    MatMulNBits, and the build says int8w has no TensorRT form."""
    from runtime.engine import EchoRuntime

    out, data, logs = engine
    rep = json.loads((out / "verify.json").read_text())
    v = rep["variants"]["block.int8w.b1"]
    assert v["within_tolerance"] and v["per_pass_token_agreement"] == 1.0
    man = json.loads((out / "manifest.json").read_text())
    info = man["precision_info"]["int8w"]
    assert info["method"] == "rtn" and info["accuracy_level"] in (1, 4) and info["tensorrt_form"] is None
    images = sorted(str(p) for p in (data / "img").glob("test*.png"))
    got = [r.tokens for r in EchoRuntime(out, precision="int8w").generate(images)]
    ref = [r.tokens for r in EchoRuntime(out, precision="fp32").generate(images)]
    assert got == ref and sum(map(len, ref)) > 0
    m = onnx.load(str(out / "block_step.int8w.b1.onnx"), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14 and all(helper.get_attribute_value(a) == 8 for n in nbits for a in n.attribute if a.name == "bits")
    inits = {t.name for t in m.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in m.graph.node)
    assert (out / "weights.int8w.bin").stat().st_size < (out / "weights.fp32.bin").stat().st_size
