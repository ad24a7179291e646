"""int4 weight-only precision (echo_export/int4.py): packing against onnxruntime's kernel, RTN and
AWQ, the engine's tokens against fp32, and the TensorRT form against the MatMulNBits graph."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from onnx import helper, numpy_helper  # noqa: E402

from echo_export import int4  # noqa: E402
from echo_export.precision import PrecisionError  # noqa: E402


def _matmulnbits_graph(qw: int4.QuantizedWeight, level: int) -> onnx.ModelProto:
    wm = int4.WeightMatMul("mm", "W", False, "decoder")
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    nodes, inits = int4._matmulnbits_nodes(wm, node, qw, level)
    n = qw.q.shape[0]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [3, qw.k])],
                          [helper.make_tensor_value_info("y", 1, [3, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(int4.MS_DOMAIN, 1)])


@pytest.mark.parametrize("block", int4.BLOCK_SIZES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_packing_is_what_onnxruntime_computes(block, symmetric):
    """onnxruntime's MatMulNBits on our packed bytes (accuracy_level 1: fp32 arithmetic) computes
    x @ the weight we say we stored, for every block size, both zero-point forms, and a K that is
    not a multiple of the block (padding)."""
    rng = np.random.default_rng(block)
    k, n = 96, 40
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    qw = int4.quantize_blockwise(w, block, symmetric)
    deq = qw.dequantized()
    # round to nearest: every weight within half a step of its level (the symmetric clip at -7 only
    # adds nothing: |w| <= 7 * scale by construction)
    step = np.repeat(qw.scales.T, block, axis=0)[:k]
    assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-7)
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    sess = ort.InferenceSession(_matmulnbits_graph(qw, 1).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ deq, rtol=1e-4, atol=1e-4)
    assert np.array_equal(int4._unpack_nibbles(int4._pack_nibbles(qw.q), qw.q.shape[1]), qw.q)


def test_awq_beats_round_to_nearest_where_activations_have_outlier_channels():
    """AWQ's searched channel scaling (alpha 0 is RTN) lowers the output error on activations whose
    few large channels dominate x @ W, and never raises it."""
    rng = np.random.default_rng(0)
    k, n = 128, 64
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    x = rng.normal(0, 1, (256, k)).astype(np.float32)
    x[:, :4] *= 30.0  # outlier channels, as real LLM activations have
    rtn = int4.quantize_blockwise(w, 32, True)
    awq, alpha = int4.awq_quantize(w, x, 32, True)
    err = lambda q: float(np.linalg.norm(x @ q.dequantized() - x @ w) / np.linalg.norm(x @ w))  # noqa: E731
    print(f"\nrelative output error: RTN {err(rtn):.4f}, AWQ {err(awq):.4f} (alpha {alpha})")
    assert alpha > 0 and err(awq) < 0.8 * err(rtn)


def test_options_are_checked_and_named():
    assert int4.Int4Options.parse({"block_size": "64", "symmetric": "false", "method": "RTN"}) == \
        int4.Int4Options(block_size=64, symmetric=False, method="rtn")
    with pytest.raises(PrecisionError, match="block_size=48: choose from"):
        int4.Int4Options.parse({"block_size": "48"})
    with pytest.raises(PrecisionError, match="unknown int4 option.*blocksize.*known: block_size"):
        int4.Int4Options.parse({"blocksize": "64"})
    with pytest.raises(PrecisionError, match="method"):
        int4.Int4Options.parse({"method": "gptq"})
    with pytest.raises(PrecisionError, match="block_size='big': expected an integer"):
        int4.Int4Options.parse({"block_size": "big"})


def test_accuracy_level_follows_the_cpu():
    from runtime.cpu_features import CpuFeatures

    avx2 = CpuFeatures("x86_64", True, False, False, False, False)
    old = CpuFeatures("x86_64", False, False, False, False, False)
    arm = CpuFeatures("aarch64", False, False, False, False, False)
    assert (int4.choose_accuracy_level(avx2), int4.choose_accuracy_level(arm), int4.choose_accuracy_level(old)) == (4, 4, 1)


# ------------------------------------------------------------------ on a built engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """fp32 + int4 (AWQ, block 32, symmetric) of the varied test model (tests/varied_models.py)."""
    from tests.test_export import build_varied_engine

    return build_varied_engine(tmp_path_factory.mktemp("int4"), ["fp32", "int4"])


def test_int4_engine_tokens_agree_with_fp32(engine):
    """verify.json's per-pass agreement (the int4 block step on exactly fp32's inputs) meets the
    registry's tolerance; the runtime decodes the int4 folder and its reports match fp32's."""
    from runtime import precisions
    from runtime.engine import EchoRuntime

    out, data, logs = engine
    rep = json.loads((out / "verify.json").read_text())
    v = rep["variants"]["block.int4.b1"]
    print(f"\nint4 per-pass agreement {100 * v['per_pass_token_agreement']:.2f}%, free-running "
          f"{100 * v['token_agreement']:.2f}%, exact {100 * v['exact_match']:.2f}%")
    assert v["per_pass_token_agreement"] >= precisions.get("int4").tolerances.min_per_pass_agreement
    assert v["within_tolerance"]
    info = json.loads((out / "manifest.json").read_text())["precision_info"]["int4"]
    assert info["accuracy_level"] in (1, 4) and info["method"] == "awq" and info["block_size"] == 32
    images = sorted(str(p) for p in (data / "img").glob("test*.png"))
    got = [r.tokens for r in EchoRuntime(out, precision="int4").generate(images)]
    ref = [r.tokens for r in EchoRuntime(out, precision="fp32").generate(images)]
    same = sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r)) / max(sum(map(len, ref)), 1)
    print(f"runtime int4 vs fp32 tokens: {100 * same:.2f}% position-wise on {len(images)} images")
    assert same >= 0.9
    m = onnx.load(str(out / "block_step.int4.b1.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in m.graph.node) == 14  # 2 layers x 7 linear layers
    inits = {t.name for t in m.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in m.graph.node)  # no fp32 linear layer left


def test_int4_weights_are_stored_once(engine):
    """The prefill's decoder weights are the step's (same bytes, AWQ scales chosen once per weight):
    weights.int4.bin holds them once, and is about a quarter of the decoder's fp32 bytes."""
    out, _, _ = engine
    def offsets(name):
        m = onnx.load(str(out / name), load_external_data=False)
        return {dict((e.key, e.value) for e in t.external_data)["offset"] for t in m.graph.initializer
                if t.name.endswith("_int4_B")}
    pre, step = offsets("vision_prefill.int4.b1.onnx"), offsets("block_step.int4.b1.onnx")
    assert pre and pre <= step


def _step_feeds(out):
    """Real block-step inputs: the fp32 graphs' own decode of a test image."""
    from echo_export.decode_loop import LoopSettings, decode, ort_runner, prefill_feeds
    from runtime.decode_mode import DecodeMode

    man = json.loads((out / "manifest.json").read_text())
    lm = man["model_config"]["lm"]
    px = np.random.default_rng(1).uniform(-1, 1, (1, 1, 32, 32)).astype(np.float32)
    prefix = _prefix(out, man)
    settings = LoopSettings(man["capacity"], lm["num_hidden_layers"], lm["num_key_value_heads"], lm["head_dim"],
                            man["mask_id"], man["eos_id"], max_new_tokens=12)
    feeds: list = []
    decode(DecodeMode.of("fused", prefix.shape[1], man["block_size"]), ort_runner(out / "vision_prefill.fp32.b1.onnx"),
           ort_runner(out / "block_step.fp32.b1.onnx"), prefix, prefill_feeds(px, prefix), settings,
           on_step=lambda f: feeds.append({k: v.copy() for k, v in f.items()}))
    return px, feeds


def _prefix(out, man):
    from runtime.text import ReportTokenizer

    tok = ReportTokenizer.from_file(out / "tokenizer.json")
    n_img = (man["image_size"] // man["model_config"]["vision"]["patch_size"]) ** 2
    return np.array([tok.prefix_ids(n_img)], np.int64)


def test_tensorrt_form_computes_what_matmulnbits_computes(engine, tmp_path):
    """The TensorRT form (INT4 DequantizeLinear with block_size + MatMul, opset 21, no com.microsoft
    op) holds the MatMulNBits graph's integers and scales: run on onnxruntime, fused back into
    MatMulNBits (its default) or unfused (optimisations off: DequantizeLinear then an fp32 MatMul),
    it gives the same tokens and outputs within float rounding."""
    import shutil

    from echo_export.decode_loop import ort_runner

    out, _, _ = engine
    d = tmp_path / "e"
    shutil.copytree(out, d)
    px, feeds = _step_feeds(d)
    info = int4.int4_dq_for_tensorrt(d / "block_step.int4.b1.onnx", d / "block_step.int4.b1.tensorrt.onnx")
    assert info["dequantize_linear_int4"] == 14
    trt = d / "block_step.int4.b1.tensorrt.onnx"
    onnx.checker.check_model(str(trt), full_check=True)
    m = onnx.load(str(trt), load_external_data=False)
    assert {o.domain: o.version for o in m.opset_import} == {"": 21}
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) == 14
    nbits, fused = ort_runner(d / "block_step.int4.b1.onnx"), ort_runner(trt)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(trt), so, providers=["CPUExecutionProvider"])
    worst = {"fused": 0.0, "unfused": 0.0}
    for f in feeds:
        a = nbits(f)
        for kind, b in (("fused", fused(f)), ("unfused", plain.run(None, {i.name: f[i.name] for i in plain.get_inputs()}))):
            assert np.array_equal(a[0], b[0]), kind  # tokens
            worst[kind] = max(worst[kind], *(float(np.abs(x - y).max()) for x, y in zip(a[1:], b[1:])))
    print(f"\nMatMulNBits vs TensorRT form on {len(feeds)} passes: max |diff| of confidence/KV "
          f"{worst['fused']:.2e} (onnxruntime fuses it back), {worst['unfused']:.2e} (unfused)")
    assert worst["fused"] < 1e-4 and worst["unfused"] < 5e-2


def test_asymmetric_int4_has_no_tensorrt_form(engine, tmp_path):
    """TensorRT's DequantizeLinear takes a zero point of 0 only: an asymmetric graph is refused by name."""
    from echo_export.external_weights import WeightsFile

    out, _, _ = engine
    plan = int4.WeightPlan(int4.Int4Options(symmetric=False, method="rtn"))
    import shutil

    d = tmp_path / "e"
    shutil.copytree(out, d)
    store = WeightsFile(d, "weights.asym.bin")
    int4.to_int4(d / "block_step.fp32.b1.onnx", d / "block_step.asym.onnx", plan, 1, store)
    store.close()
    with pytest.raises(PrecisionError, match="asymmetric int4.*zero point of 0"):
        int4.int4_dq_for_tensorrt(d / "block_step.asym.onnx", d / "block_step.asym.tensorrt.onnx")


def test_int4_sessions_share_one_copy_of_the_weights(engine):
    """runtime/ort_capi.py lends MatMulNBits' packed weights and scales from one map of
    weights.int4.bin to both sessions, and they decode exactly like sessions with their own."""
    from runtime.engine import EchoRuntime

    out, data, _ = engine
    images = sorted(str(p) for p in (data / "img").glob("test*.png"))
    shared = EchoRuntime(out, precision="int4")
    own = EchoRuntime(out, precision="int4", share_weights=False)
    assert [r.tokens for r in shared.generate(images)] == [r.tokens for r in own.generate(images)]
    assert all(g._capi is not None and g._capi.shared_bytes > 0 for g in shared._graphs.values())
    lent = shared._weights_map["weights.int4.bin"]._values.values()
    assert any(view.dtype == np.uint8 for _, view in lent)  # the packed 4-bit weights


def test_echo_report_takes_int4_and_build_options_are_checked(engine):
    """`echo-report --precision int4` reads the folder through the registry; --precision-opt is parsed
    per precision and an unknown precision or malformed option is refused with the way to write it."""
    from click.testing import CliRunner

    from echo_export.build import BuildError, parse_precision_options
    from runtime.cli import main as report

    out, data, _ = engine
    img = str(sorted((data / "img").glob("test*.png"))[0])
    r = CliRunner().invoke(report, ["--engine-dir", str(out), "--precision", "int4", "--format", "json", img])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[0])["text"]
    assert parse_precision_options(["int4.block_size=64", "int4.method=rtn"]) == \
        {"int4": {"block_size": "64", "method": "rtn"}}
    with pytest.raises(BuildError, match="unknown precision int5"):
        parse_precision_options(["int5.block_size=64"])
    with pytest.raises(BuildError, match="PRECISION.OPTION=VALUE"):
        parse_precision_options(["block_size=64"])
    # a bad converter option is refused before any work (nothing is exported, no folder written)
    from echo_export.build import BuildOptions, build

    for opt, why in ((["int4.block_size=48"], "block_size=48: choose from"), (["int4.method=rtn"], "int4 is not built")):
        with pytest.raises(BuildError, match=why):
            build(BuildOptions(ckpt=out.parent / "ckpt", out=out.parent / "never", data=data,
                               precisions=["fp32", "int4"] if "48" in opt[0] else ["fp32"],
                               precision_options=parse_precision_options(opt)), log=lambda s: None)
        assert not (out.parent / "never").exists()
