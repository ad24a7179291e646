"""int8dyn: 8-bit weights per column, activations quantised each pass (echo_export/int8_dynamic.py):
the bytes against onnxruntime's DynamicQuantizeMatMul (exactly, by an integer emulation), the
weights' width per CPU kind, the options, and a built engine against fp32."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import helper  # noqa: E402

from echo_export import int8_dynamic as i8d  # noqa: E402
from echo_export.int4 import MS_DOMAIN, WeightMatMul  # noqa: E402
from echo_export.precision import PrecisionError  # noqa: E402


def _session(w: np.ndarray, bits: int, rows: int) -> ort.InferenceSession:
    k, n = w.shape
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    nodes, inits = i8d.dynamic_matmul_nodes(WeightMatMul("mm", "W", False, "decoder"), node, w, bits)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [rows, k])],
                          [helper.make_tensor_value_info("y", 1, [rows, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def _emulated(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeMatMul computes, in integers: ONNX DynamicQuantizeLinear of x (uint8, one
    range including 0 over the tensor, zero point rounded half to even), int32 products, then the
    two scales."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    sx = np.float32((hi - lo) / 255.0)
    zp = int(np.clip(np.rint(-lo / sx), 0, 255))
    qx = np.clip(np.rint(x / sx) + zp, 0, 255).astype(np.int32)
    acc = (qx - zp) @ q.astype(np.int32)
    return acc.astype(np.float32) * (sx * scale)[None, :]


def test_per_column_quantisation_bounds():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (64, 24)).astype(np.float32)
    w[:, 3] = 0.0
    for bits, qmax in ((8, 127), (7, 63)):
        q, s = i8d.quantize_per_column(w, bits)
        assert q.dtype == np.int8 and np.abs(q).max() == qmax and s[3] == 1.0 and not q[:, 3].any()
        assert np.all(np.abs(q * s - w) <= 0.5 * s + 1e-8)  # round to nearest, per column
        assert np.allclose(np.abs(w).max(axis=0)[s != 1.0], (qmax * s)[s != 1.0])  # each column's range used


@pytest.mark.parametrize("rows", [1, 16])
def test_onnxruntime_computes_what_we_stored(rows):
    """DynamicQuantizeMatMul on our weight bytes equals the integer emulation, for one row (an AR
    step) and 16 (a fused one-step pass at B=8); 7-bit weights on every CPU, 8-bit ones where the
    build would choose them (VNNI: exact; AVX2 without VNNI saturates them, which is why auto picks 7)."""
    from echo_export.build import resolve_int8_mode

    rng = np.random.default_rng(rows)
    w = rng.normal(0, 0.05, (256, 48)).astype(np.float32)
    x = rng.normal(0, 1, (rows, 256)).astype(np.float32)
    x[:, 7] *= 20  # an outlier channel: the per-tensor range is set by it
    for bits in sorted({7, i8d.weight_bits_for_mode(resolve_int8_mode("auto")["mode"])}):
        q, s = i8d.quantize_per_column(w, bits)
        got = _session(w, bits, rows).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, _emulated(x, q, s), rtol=1e-5, atol=1e-5 * np.abs(got).max())
        ref = x @ w
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_options_and_modes():
    assert i8d.Int8DynOptions.parse({}).parts() == ("decoder",)
    assert i8d.Int8DynOptions.parse({"lm_head": "true", "vision": "1"}).parts() == ("decoder", "vision", "lm_head")
    with pytest.raises(PrecisionError, match="unknown int8dyn option.*block_size"):
        i8d.check_options({"block_size": "32"})
    with pytest.raises(PrecisionError, match="expected true or false"):
        i8d.check_options({"lm_head": "maybe"})
    assert (i8d.weight_bits_for_mode("u8s8"), i8d.weight_bits_for_mode("u8s7")) == (8, 7)
    with pytest.raises(PrecisionError, match="s8s8"):
        i8d.weight_bits_for_mode("s8s8")
    with pytest.raises(PrecisionError, match="no TensorRT form"):
        i8d.int8dyn_for_tensorrt("a.onnx", "b.onnx")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """fp32 + int8dyn of the varied test model, int8 mode u8s7 (7-bit weights, safe on every x86 CPU)."""
    from tests.test_export import build_varied_engine

    return build_varied_engine(tmp_path_factory.mktemp("int8dyn"), ["fp32", "int8dyn"], int8_mode="u8s7")


def test_int8dyn_engine_against_fp32(engine):
    """Verification passes the variant; its reports follow fp32's; every decoder linear layer is a
    DynamicQuantizeMatMul of 7-bit weights; the manifest says what the weights were made for, and
    echo-report warns exactly where this CPU is the other kind."""
    from click.testing import CliRunner

    from runtime.cli import main
    from runtime.cpu_features import AVX2_NO_VNNI, detect_cpu_features, int8_cpu_mismatch
    from runtime.engine import EchoRuntime

    out, data, logs = engine
    v = json.loads((out / "verify.json").read_text())["variants"]["block.int8dyn.b1"]
    assert v["within_tolerance"] and v["per_pass_token_agreement"] >= 0.95
    info = json.loads((out / "manifest.json").read_text())["precision_info"]["int8dyn"]
    assert (info["mode"], info["weight_bits"], info["chosen_for"]) == ("u8s7", 7, AVX2_NO_VNNI)
    assert info["tensorrt_ready"] is False and "no TensorRT form" in info["tensorrt_reason"]
    images = sorted(str(p) for p in (data / "img").glob("test*.png"))
    got = [r.tokens for r in EchoRuntime(out, precision="int8dyn").generate(images)]
    ref = [r.tokens for r in EchoRuntime(out, precision="fp32").generate(images)]
    same = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r))
    assert len({tuple(r) for r in ref}) > 1 and same >= 0.9 * sum(map(len, ref))
    m = onnx.load(str(out / "block_step.int8dyn.b1.onnx"), load_external_data=False)
    dq = [n for n in m.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    inits = {t.name: t for t in m.graph.initializer}
    assert len(dq) == 14 and not any(n.op_type == "MatMul" and n.input[1] in inits for n in m.graph.node)
    w = onnx.numpy_helper.to_array(inits[dq[0].input[1]], base_dir=str(out))
    assert w.dtype == np.int8 and np.abs(w).max() <= 63
    r = CliRunner().invoke(main, ["--engine-dir", str(out), "--precision", "int8dyn", images[0]])
    assert r.exit_code == 0, r.output
    assert ("warning:" in r.stderr) == (int8_cpu_mismatch(AVX2_NO_VNNI, detect_cpu_features()) is not None)
