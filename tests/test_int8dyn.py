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


def _two_weight_graph(ws: list[np.ndarray]) -> onnx.ModelProto:
    """x -> one MatMul per weight (every one reading x, as q/k/v do), named by their namespace as the
    exporter's decoder layers are."""
    k = ws[0].shape[0]
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(ws))]
    for n in nodes:
        n.metadata_props.add(key="namespace", value="model.lm.layers.0")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["rows", k])],
                          [helper.make_tensor_value_info(f"y{i}", 1, None) for i in range(len(ws))],
                          [onnx.numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(ws)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])


def test_smoothing_moves_an_outlier_channel_into_the_weights(tmp_path):
    """An activation channel 50x the others: smoothing (alpha 0.5) shares one Mul and one scale
    between the weights that read the tensor, and cuts the int8 error against fp32 several-fold."""
    from echo_export.int4 import _replace_nodes, weight_key, weight_matmuls

    rng = np.random.default_rng(3)
    ws = [rng.normal(0, 0.05, (64, 32)).astype(np.float32) for _ in range(2)]
    x = rng.normal(0, 1, (16, 64)).astype(np.float32)
    x[:, 5] *= 50
    plan = i8d.SmoothingPlan(0.5)
    plan.add_rows({weight_key(w): x for w in ws})
    errs = {}
    for smooth in (False, True):
        model = _two_weight_graph(ws)
        by_node = plan.for_graph(model, ("decoder",), tmp_path).by_node if smooth else {}
        nodes = {n.name: n for n in model.graph.node}
        new, inits = {}, []
        for wm, w in zip(weight_matmuls(model, ("decoder",)), ws):
            new[wm.node], more = i8d.dynamic_matmul_nodes(wm, nodes[wm.node], w, 8, by_node.get(wm.node))
            inits += more
        _replace_nodes(model, new, inits)
        if smooth:
            assert [n.op_type for n in model.graph.node].count("Mul") == 1
            (s0, s1) = (by_node[f"mm{i}"].scale for i in range(2))
            assert np.array_equal(s0, s1) and s0[5] > 5 * np.median(s0)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x})
        errs[smooth] = max(np.abs(g - x @ w).max() / np.abs(x @ w).max() for g, w in zip(got, ws))
    assert errs[True] < errs[False] / 3, errs


def test_options_and_modes():
    assert i8d.Int8DynOptions.parse({}).parts() == ("decoder",)
    assert i8d.Int8DynOptions.parse({"lm_head": "true", "vision": "1"}).parts() == ("decoder", "vision", "lm_head")
    with pytest.raises(PrecisionError, match="unknown int8dyn option.*block_size"):
        i8d.check_options({"block_size": "32"})
    with pytest.raises(PrecisionError, match="expected true or false"):
        i8d.check_options({"lm_head": "maybe"})
    assert i8d.Int8DynOptions.parse({}).smooth == 0.5 and i8d.Int8DynOptions.parse({"smooth": "0"}).smooth == 0.0
    with pytest.raises(PrecisionError, match="smooth=1.5"):
        i8d.check_options({"smooth": "1.5"})
    with pytest.raises(PrecisionError, match="expected a float"):
        i8d.check_options({"smooth": "high"})
    assert i8d.smooth_rows_wanted(["fp32", "int8dyn"], {}) == 256
    assert i8d.smooth_rows_wanted(["fp32", "int8dyn"], {"int8dyn": {"smooth": "0"}}) is None
    assert i8d.smooth_rows_wanted(["fp32", "int4"], {}) is None
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
    assert info["smooth"] == 0.5 and info["smoothed"] == info["weights"] > 0  # every weight had calibration rows
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
    smooth = [n for n in m.graph.node if n.op_type == "Mul" and n.name.endswith("_int8dyn_smoothed_mul")]
    assert len(smooth) == 2 and {n.output[0] for n in smooth} <= {d.input[0] for d in dq}  # o_proj's input, per layer
    # the other divisions are folded upstream: q/k/v's and gate/up's into the two norms' weights, down's into up
    assert len([t for t in m.graph.initializer if t.name.endswith("_int8dyn_smoothed")]) == 2 * 2
    assert info["mul_free"] == info["smoothed"] - info["smoothed"] // 7  # 6 of each layer's 7 weights
    w = onnx.numpy_helper.to_array(inits[dq[0].input[1]], base_dir=str(out))
    assert w.dtype == np.int8 and np.abs(w).max() <= 63
    r = CliRunner().invoke(main, ["--engine-dir", str(out), "--precision", "int8dyn", images[0]])
    assert r.exit_code == 0, r.output
    assert ("warning:" in r.stderr) == (int8_cpu_mismatch(AVX2_NO_VNNI, detect_cpu_features()) is not None)


def test_int8dyn_alone_builds_from_the_stored_weights_with_smoothing(tmp_path):
    """--precision int8dyn alone makes no fp32 graphs (the 7B path): the smoothing's activation
    maxima come from the PyTorch decodes' hooks instead, and every weight is smoothed."""
    from tests.test_export import build_varied_engine

    out, _, logs = build_varied_engine(tmp_path, ["int8dyn"])
    man = json.loads((out / "manifest.json").read_text())
    assert not (out / "weights.fp32.bin").exists() and "fp32" not in {k.split(".")[0] for g in man["graphs"].values() for k in g}
    info = man["precision_info"]["int8dyn"]
    assert info["smoothed"] == info["weights"] > 0
    assert any("activation rows" in line for line in logs)


def test_a_norm_weight_read_by_two_muls_folds_into_each(tmp_path):
    """One norm weight read by two Mul nodes (a layer called twice in one graph), each feeding its
    own pair of matmuls: both fold (differently named constants, a valid graph, no smoothing Mul
    left) and the graph computes what the unsmoothed one does, within int8 rounding."""
    from onnx import numpy_helper

    from echo_export.external_weights import WeightsFile
    from echo_export.int4 import rewrite_weight_matmuls, weight_key

    rng = np.random.default_rng(5)
    ws = [rng.normal(0, 0.05, (32, 16)).astype(np.float32) for _ in range(4)]
    gamma = rng.uniform(0.5, 2.0, 32).astype(np.float32)
    nodes = [helper.make_node("Mul", [x, "gamma"], [f"n{i}"], name=f"norm{i}") for i, x in enumerate(["a", "b"])]
    nodes += [helper.make_node("MatMul", [f"n{i // 2}", f"W{i}"], [f"y{i}"], name=f"mm{i}") for i in range(4)]
    for n in nodes:
        n.metadata_props.add(key="namespace", value="model.lm.layers.0")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, 1, [8, 32]) for x in "ab"],
                          [helper.make_tensor_value_info(f"y{i}", 1, [8, 16]) for i in range(4)],
                          [numpy_helper.from_array(gamma, "gamma")] + [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(ws)])
    src = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    feeds = {x: rng.normal(0, 1, (8, 32)).astype(np.float32) for x in "ab"}
    feeds["a"][:, 3] *= 30
    plan = i8d.SmoothingPlan(0.5)
    plan.add_rows({weight_key(w): (feeds["a" if i < 2 else "b"] * gamma) for i, w in enumerate(ws)})
    gs = plan.for_graph(onnx.load(str(src)), ("decoder",), tmp_path)
    assert set(gs.norm_folds) == {"norm0", "norm1"}
    store = WeightsFile(tmp_path, "w.bin")
    rewrite_weight_matmuls(src, tmp_path / "q.onnx", ("decoder",),
                           lambda wm, node, w: i8d.dynamic_matmul_nodes(wm, node, w, 8, gs.by_node.get(wm.node)),
                           store, other_nodes=lambda m: gs.other_nodes(m, tmp_path))
    store.close()
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    q = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert not any(n.name.endswith("_smoothed_mul") for n in q.graph.node)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for i, (y, w) in enumerate(zip(got, ws)):
        ref = (feeds["a" if i < 2 else "b"] * gamma) @ w
        assert np.abs(y - ref).max() < 0.03 * np.abs(ref).max()
