"""echo_export/screened_argmax.py: the fp32 AR step's argmax screened by an 8-bit lm_head is the
fp32 argmax, token for token, on peaked and on flat logits (where the screen gives way to the full
lm_head), with the excluded token never chosen."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from echo_export import screened_argmax  # noqa: E402
from echo_export.external_weights import WeightsFile  # noqa: E402

V, H, MASK, MASK_VALUE = 3000, 64, 7, -1e4
TIE_DIRECTION = np.random.default_rng(5).standard_normal(H).astype(np.float32) * 2


def head_graph(w: np.ndarray, transposed: bool) -> onnx.ModelProto:
    """h [b, 1, H] -> MatMul by W^T -> + MASK_VALUE at the mask token -> ArgMax: ArStepInPlaceGraph's tail."""
    inits = [numpy_helper.from_array(np.where(np.arange(V) == MASK, MASK_VALUE, 0).astype(np.float32), "exclusion")]
    nodes = []
    if transposed:
        inits.append(numpy_helper.from_array(w, "lm_head.weight"))
        nodes.append(helper.make_node("Transpose", ["lm_head.weight"], ["wt"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["h", "wt"], ["logits"]))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "lm_head.wt"))
        nodes.append(helper.make_node("MatMul", ["h", "lm_head.wt"], ["logits"]))
    nodes += [helper.make_node("Add", ["logits", "exclusion"], ["masked"]),
              helper.make_node("ArgMax", ["masked"], ["tokens"], axis=-1, keepdims=0, select_last_index=0)]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 1, H])],
                          [helper.make_tensor_value_info("tokens", TensorProto.INT64, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def hidden_states(w: np.ndarray, rng) -> np.ndarray:
    """Half peaked (near one row of W, as a trained model's next token), half flat: along
    TIE_DIRECTION, where rows 100-299 nearly tie (200 of them, more than the screen keeps)."""
    n = 120
    h = rng.standard_normal((n, H)).astype(np.float32)
    rows = rng.integers(300, V, n // 2)
    rows[:3] = 3  # where the excluded token (row MASK = 3 x row 3) would win
    h[: n // 2] = w[rows] * 40 + h[: n // 2] * 0.3
    h[n // 2:] = TIE_DIRECTION + h[n // 2:] * 1e-3
    return h


def run(path, h: np.ndarray, outputs=None) -> list:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(outputs, {"h": h})


@pytest.mark.parametrize("transposed,candidates", [(True, 16), (False, 16), (True, 1)])
def test_screened_argmax_is_the_fp32_argmax(tmp_path, transposed, candidates):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    w[MASK] = w[3] * 3  # the excluded token would win wherever row 3 does
    # rows 100-299: unrelated vectors whose logits along TIE_DIRECTION are all 5 (+-1e-4): their 8-bit
    # errors differ, so the 8-bit order of these near-ties is not the fp32 one
    d = TIE_DIRECTION.astype(np.float64)
    r = rng.standard_normal((200, H)) * 0.05
    r += (5 + rng.standard_normal((200, 1)) * 1e-4 - r @ d[:, None]) * d / (d @ d)
    w[100:300] = r.astype(np.float32)
    x = hidden_states(w, rng)
    model = head_graph(w, transposed)
    onnx.save(model, str(tmp_path / "full.onnx"))
    store = WeightsFile(tmp_path, "weights.bin")
    assert screened_argmax.screen_argmax(model, tmp_path, store, candidates=candidates)
    store.close()
    model.graph.output.append(helper.make_tensor_value_info("screen_screen_holds", TensorProto.BOOL, None))
    onnx.save(model, str(tmp_path / "screened.onnx"))
    want = np.concatenate([run(tmp_path / "full.onnx", x[i:i + 1, None])[0] for i in range(len(x))])
    got, held = [], []
    for i in range(len(x)):
        t, ok = run(tmp_path / "screened.onnx", x[i:i + 1, None])
        got.append(t)
        held.append(bool(ok))
    got = np.concatenate(got)
    ref = (x @ w.T + np.where(np.arange(V) == MASK, MASK_VALUE, 0)).argmax(-1)
    assert (want[:, 0] == ref).mean() > 0.95  # the fp32 graph is the fp32 argmax (float rounding aside)
    assert (got == want).all(), np.flatnonzero(got[:, 0] != want[:, 0])
    assert MASK not in got
    n_peaked = len(x) // 2
    assert all(held[:n_peaked]), "the screen gave way on peaked logits"
    assert not all(held[n_peaked:]), "flat logits never fell back to the full lm_head: the fallback is untested"
    # a batch of rows at once: the same tokens (the screen holds only if it holds for every row)
    batch = run(tmp_path / "screened.onnx", x[:8, None])[0]
    assert (batch == want[:8]).all()


def test_the_bound_covers_the_8bit_arithmetic():
    """Per row, |h.w - hq.w8| <= the bound the graph computes, h random and peaked."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((500, H)) * 0.05).astype(np.float32)
    head = screened_argmax.quantise_head(w, screened_argmax.block_size_for(H))
    bs = head.block_size
    w8 = (head.q.astype(np.float64) - 128) * head.scales.reshape(500, -1, 1)
    for h in rng.standard_normal((50, H)).astype(np.float32):
        hb = h.reshape(-1, bs).astype(np.float64)
        s = np.abs(hb).max(-1, keepdims=True) / 127
        hq = (np.rint(hb / s) * s).reshape(-1)
        approx = w8.reshape(500, -1) @ hq
        exact = w.astype(np.float64) @ h
        bound = np.linalg.norm(h - hq) * head.w_norm + np.linalg.norm(hq) * head.err_norm
        assert (np.abs(exact - approx) <= bound).all()
        assert np.median(bound) < 0.25 * exact.std()  # and tight enough to screen with
