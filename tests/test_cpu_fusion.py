"""echo_export/cpu_fusion.py: every exported RMSNorm becomes one SimplifiedLayerNormalization, and
the rewritten graphs compute what the exported ones do (same tokens, outputs within float rounding)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from echo_export import cpu_fusion  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """An fp32 + int8w engine of the varied test model and a copy whose graphs are fused."""
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from tests.conftest import make_tokenizer
    from tests.test_export import write_varied_dataset
    from varied_models import as_stage, get_varied

    root = tmp_path_factory.mktemp("fusion")
    tok = make_tokenizer()
    model = as_stage(get_varied(tok, shifted=True, causal_context=True), "dcd", block_size=4)
    model.cfg.max_response_tokens = 24
    save_checkpoint(root / "ckpt", model, tok)
    data = write_varied_dataset(root / "data", 4, 3)
    out = build(BuildOptions(ckpt=root / "ckpt", out=root / "engine", precisions=["fp32", "int8w"], capacity=96,
                             calib_size=3, verify_n=2, data=data), log=lambda s: None)
    fused = root / "fused"
    shutil.copytree(out, fused)
    counts = cpu_fusion.fuse_engine_folder(fused)
    return out, fused, data, counts


def test_every_rmsnorm_is_fused(engines):
    from runtime import graph_io as gio

    out, fused, _, counts = engines
    for name, n in counts.items():
        m = onnx.load(str(fused / name), load_external_data=False)
        ops = [x.op_type for x in m.graph.node]
        assert "Reciprocal" not in ops and "Pow" not in ops  # no RMSNorm left unfused
        if name.split(".")[0] in gio.CPU_ONLY_ROLES:  # fused at build: nothing left for this pass
            assert n == 0 and ops.count("SkipSimplifiedLayerNormalization") >= 4
            continue
        if name.startswith(("block_step", "vision_prefill")):
            assert n >= 3  # two per decoder layer + the final norm (the vision tower's are LayerNorms)
        assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == n
        if name.startswith("block_step"):  # every norm after a residual Add took the Add in
            assert ops.count("SkipSimplifiedLayerNormalization") == n - 1, ops.count("SkipSimplifiedLayerNormalization")


def test_fused_graphs_decode_the_same_tokens(engines):
    from runtime.engine import EchoRuntime

    out, fused, data, _ = engines
    images = sorted(str(p) for p in (data / "img").glob("test*.png"))
    for prec in ("fp32", "int8w"):
        for mode in ("fused", "ar") if (out / f"ar_step.{prec}.b1.onnx").exists() else ("fused",):
            want = [r.tokens for r in EchoRuntime(out, precision=prec).generate(images, mode=mode)]
            got = [r.tokens for r in EchoRuntime(fused, precision=prec).generate(images, mode=mode)]
            assert got == want and sum(map(len, want)) > 0


def test_block_step_outputs_match_within_rounding(engines):
    """One block_step run on the same random feeds: confidences within float rounding."""
    out, fused, _, _ = engines

    def run(folder):
        s = ort.InferenceSession(str(folder / "block_step.fp32.b1.onnx"), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {}
        for i in s.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            if "int64" in i.type:
                hi = 8 if i.name == "past_len" else 50
                feeds[i.name] = rng.integers(0, hi, shape).astype(np.int64)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    a, b = run(out), run(fused)
    np.testing.assert_allclose(b["confidence"], a["confidence"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["present_key"], a["present_key"], rtol=1e-4, atol=1e-5)


def test_a_chain_read_elsewhere_is_left_alone():
    """An RMSNorm whose 1/rms is also read by another node is not fused (the chain must be private)."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    ys = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "r")]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1]), "ax"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"), numpy_helper.from_array(np.ones(8, np.float32), "w")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]), helper.make_node("ReduceMean", ["p", "ax"], ["m"], keepdims=1),
             helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["x", "r"], ["n"]),
             helper.make_node("Mul", ["w", "n"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], ys, inits), opset_imports=[helper.make_opsetid("", 18)])
    assert cpu_fusion.fuse_rms_norm(m) == 0  # "r" is a graph output
    m.graph.output.pop()
    assert cpu_fusion.fuse_rms_norm(m) == 1
    xv = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    np.testing.assert_allclose(got, xv / np.sqrt((xv ** 2).mean(-1, keepdims=True) + 1e-6), rtol=1e-5, atol=1e-6)


def test_the_residual_add_folds_into_the_norm_and_still_feeds_the_stream():
    """Add(a, b) -> SimplifiedLayerNormalization, the sum also read by a later Add (the residual
    stream): one SkipSimplifiedLayerNormalization whose 4th output is the sum; same values. An Add
    of a bias (an initializer) is left alone."""
    from onnx import TensorProto, helper, numpy_helper

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8])  # noqa: E731
    w = np.linspace(0.5, 1.5, 8).astype(np.float32)
    nodes = [helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Neg", ["b"], ["nb"]),
             helper.make_node("Add", ["ra", "nb"], ["s"]),
             helper.make_node("SimplifiedLayerNormalization", ["s", "w"], ["n"], axis=-1, epsilon=1e-6),
             helper.make_node("Add", ["s", "n"], ["y"]),
             helper.make_node("Add", ["y", "bias"], ["yb"]),
             helper.make_node("SimplifiedLayerNormalization", ["yb", "w"], ["z"], axis=-1, epsilon=1e-6)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(8, 0.25, np.float32), "bias")]
    m = helper.make_model(helper.make_graph(nodes, "g", [vi("a"), vi("b")], [vi("z")], inits),
                          opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((1, 3, 8)).astype(np.float32), "b": rng.standard_normal((1, 3, 8)).astype(np.float32)}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert cpu_fusion.fuse_skip_rms_norm(m) == 1  # the first norm; the second reads a bias Add
    skip = [x for x in m.graph.node if x.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(skip) == 1 and list(skip[0].output) == ["n", "", "", "s"] and skip[0].domain == "com.microsoft"
    assert [x.op_type for x in m.graph.node].count("Add") == 2
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["nbits", "matmul"])
def test_qkv_packing_computes_each_projection_as_before(tmp_path, kind):
    """Three projections of one input (widths 16, 8, 8: k and v alike, so a swap would not show in
    the shapes), each with a bias Add -> one packed projection + one bias Add + Split, its weights
    in the store; every output as before.
    A fourth projection of another input and a pair of one input are left alone."""
    from onnx import TensorProto, helper, numpy_helper

    from echo_export.external_weights import WeightsFile

    rng = np.random.default_rng(1)
    K, widths, bs = 32, (16, 8, 8), 16
    inits, nodes = [], []

    def proj(src, out, n):
        if kind == "nbits":
            b = rng.integers(0, 256, (n, K // bs, bs // 2), dtype=np.uint8)
            s = (rng.random(n * (K // bs)) * 0.1 + 0.01).astype(np.float32)
            inits.extend([numpy_helper.from_array(b, f"{out}_B"), numpy_helper.from_array(s, f"{out}_S")])
            nodes.append(helper.make_node("MatMulNBits", [src, f"{out}_B", f"{out}_S"], [out], name=out,
                                          domain="com.microsoft", K=K, N=n, bits=4, block_size=bs, accuracy_level=0))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((K, n)).astype(np.float32), f"{out}_W"))
            nodes.append(helper.make_node("MatMul", [src, f"{out}_W"], [out], name=out))

    nodes.append(helper.make_node("Relu", ["x"], ["h"]))
    for out, n in zip(("q", "k", "v"), widths):  # each with its bias, as Qwen2's
        proj("h", out + "_nobias", n)
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"{out}_bias"))
        nodes.append(helper.make_node("Add", [out + "_nobias", f"{out}_bias"], [out]))
    proj("x", "other", 8)
    proj("x", "pair", 8)  # two of "x" (other, pair): not a q/k/v triple
    outs = ["q", "k", "v", "other", "pair"]
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, K])],
                                            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits),
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = {"x": rng.standard_normal((1, 2, K)).astype(np.float32)}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, x)
    store = WeightsFile(tmp_path, "weights.bin")
    assert cpu_fusion.pack_qkv_projections(m, tmp_path, store) == 1
    store.close()
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Split") == 1 and len(ops) == 1 + 3 + 2  # Relu, packed + bias Add + Split, the other two
    names = {t.name for t in m.graph.initializer}
    assert names >= {"other_W" if kind == "matmul" else "other_B"}
    assert not {"q_nobias_W", "q_nobias_B", "k_nobias_W", "k_nobias_B", "q_bias"} & names  # the separate ones are gone
    onnx.save(m, str(tmp_path / "packed.onnx"))
    got = ort.InferenceSession(str(tmp_path / "packed.onnx"), providers=["CPUExecutionProvider"]).run(outs, x)
    for o, a, b in zip(outs, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=o)


def test_the_mask_exclusion_becomes_an_add_with_the_same_tokens_and_confidences(tmp_path):
    """Where(Equal(arange(V), token), Expand(-30000), logits) -> Add(logits, row): the same argmax
    and softmax maximum (the token's probability is 0 either way), the Equal and Expand gone; a
    Where over two tokens is not the exclusion and stays."""
    from onnx import TensorProto, helper, numpy_helper

    V = 50
    inits = [numpy_helper.from_array(np.arange(V, dtype=np.int64), "ids"), numpy_helper.from_array(np.int64(7), "tok"),
             numpy_helper.from_array(np.array(-30000.0, np.float32), "fill"),
             numpy_helper.from_array(np.isin(np.arange(V), [3, 4]), "two")]
    nodes = [helper.make_node("Shape", ["logits"], ["shape"]), helper.make_node("Expand", ["fill", "shape"], ["full"]),
             helper.make_node("Equal", ["ids", "tok"], ["eq"]),
             helper.make_node("Where", ["eq", "full", "logits"], ["masked"]),
             helper.make_node("Where", ["two", "full", "logits"], ["masked_two"]),
             helper.make_node("ArgMax", ["masked"], ["tokens"], axis=-1, keepdims=0),
             helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
             helper.make_node("ReduceMax", ["p", "ax"], ["confidence"], keepdims=0)]
    inits.append(numpy_helper.from_array(np.array([-1]), "ax"))
    outs = ["tokens", "confidence", "masked_two"]
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, V])],
                                            [helper.make_tensor_value_info(o, TensorProto.FLOAT if o != "tokens" else TensorProto.INT64, None)
                                             for o in outs], inits), opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 3, V)) * 3).astype(np.float32)
    logits[0, 0, 7] = 50  # the excluded token would win this row
    feeds = {"logits": logits}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, feeds)
    assert cpu_fusion.additive_exclusion(m, tmp_path) == 1
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Where") == 1 and "Equal" not in ops and ops.count("Add") == 1
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, feeds)
    assert (got[0] == want[0]).all() and 7 not in got[0]
    np.testing.assert_array_equal(got[1], want[1])  # exp(-30000 + ...) is 0 in both
    np.testing.assert_array_equal(got[2], want[2])
