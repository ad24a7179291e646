"""The fp32 AR step's argmax over the vocabulary without reading the whole fp32 lm_head: an exact
screen by an 8-bit copy, then fp32 logits for the few rows that can still win.

Why: at batch 1 an AR step is memory-bound, and at the Qwen2.5-0.5B shape the lm_head is 545 MB of
the ~2 GB an fp32 step reads (151936 x 896). The step only needs the argmax, so:

1. hq: the normed hidden state h quantised to int8 per block of `block_size` (absmax / 127), kept as
   floats on that grid. MatMulNBits at accuracy_level 4 quantises its input the same way, so on hq
   its own quantisation is lossless and it computes hq . w8_r (w8: the rows quantised to 8 bits per
   block) up to float rounding.
2. A bound per row on how far that is from the fp32 logit h . w_r:
   |h.w - hq.w8| <= ||h - hq|| ||w_r|| + ||hq|| ||w_r - w8_r|| (Cauchy-Schwarz on both parts), plus
   1e-4 ||hq|| ||w8_r|| for the kernels' float rounding (far above it). ||w_r|| and ||w_r - w8_r||
   are computed at build time in float64, ||h - hq|| and ||hq|| per pass.
3. lo = approx - bound, hi = approx + bound, each plus the exclusion row the original adds to its
   logits (MASK_VALUE at the mask token, 0 elsewhere: exact, being the same Add). No row whose hi is
   below max(lo) can be the argmax. The `candidates` rows with the highest hi are gathered from the
   fp32 weight and their exact logits decide, the lowest index among equals as ArgMax does. Where
   more than `candidates` rows have hi >= max(lo) (flat logits), an If runs the original full
   lm_head instead, so the token is always the fp32 argmax.

The graph rewrite replaces MatMul(h, Transpose(W) or W^T) -> Add(., exclusion) -> ArgMax (the tail
ArStepInPlaceGraph exports, backbone.exclude_token) and leaves any other graph alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCK_SIZES = (128, 64, 32, 16)
ROUNDING_SLACK = 1e-4


@dataclass
class ScreenedHead:
    """The build-time part of the screen for one lm_head weight W [V, H]."""

    q: np.ndarray  # uint8 [V, H / block, block]: MatMulNBits' 8-bit layout (value + 128)
    scales: np.ndarray  # float32 [V * H / block]
    w_norm: np.ndarray  # float32 [V]: ||w_r||, rounded up
    err_norm: np.ndarray  # float32 [V]: ||w_r - w8_r||, rounded up
    block_size: int


def block_size_for(hidden: int) -> Optional[int]:
    return next((b for b in BLOCK_SIZES if hidden % b == 0), None)


def quantise_head(w: np.ndarray, block_size: int) -> ScreenedHead:
    """W [V, H] fp32 -> its symmetric 8-bit form per block and the per-row norms of the bound."""
    v, h = w.shape
    wb = w.reshape(v, h // block_size, block_size).astype(np.float64)
    scale = np.abs(wb).max(-1) / 127.0
    scale32 = scale.astype(np.float32)
    safe = np.where(scale32 == 0, 1.0, scale32.astype(np.float64))
    k = np.clip(np.rint(wb / safe[..., None]), -127, 127)
    w8 = k * scale32.astype(np.float64)[..., None]  # what the kernel multiplies by
    up = lambda a: (a * (1 + 1e-6) + 1e-30).astype(np.float32)  # noqa: E731  float32, never below
    return ScreenedHead(q=(k + 128).astype(np.uint8), scales=scale32.reshape(-1),
                        w_norm=up(np.sqrt((wb ** 2).sum((1, 2)))),
                        err_norm=up(np.sqrt(((wb - w8) ** 2).sum((1, 2)))), block_size=block_size)


def _find_tail(g: onnx.GraphProto) -> Optional[dict]:
    """The MatMul -> Add(exclusion) -> ArgMax tail writing graph output `tokens`, with the [V, H] weight."""
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    argmax = producers.get("tokens")
    if argmax is None or argmax.op_type != "ArgMax":
        return None
    a = {x.name: helper.get_attribute_value(x) for x in argmax.attribute}
    if a.get("axis") != -1 or a.get("keepdims", 1) != 0 or a.get("select_last_index", 0) != 0:
        return None
    add = producers.get(argmax.input[0])
    if add is None or add.op_type != "Add" or consumers.get(add.output[0]) != 1:
        return None
    mm = next((producers[i] for i in add.input if i in producers and producers[i].op_type == "MatMul"), None)
    if mm is None or consumers.get(mm.output[0]) != 1:
        return None
    exclusion = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
    tr = producers.get(mm.input[1])
    if tr is not None and tr.op_type == "Transpose" and tr.input[0] in inits:
        perm = next((helper.get_attribute_value(x) for x in tr.attribute if x.name == "perm"), None)
        if list(perm or []) != [1, 0]:
            return None
        weight, transposed = tr.input[0], True
    elif mm.input[1] in inits:
        weight, transposed, tr = mm.input[1], False, None
    else:
        return None
    t = inits[weight]
    if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
        return None
    return {"argmax": argmax, "add": add, "exclusion": exclusion, "matmul": mm, "transpose": tr, "weight": weight,
            "transposed": transposed, "dims": list(t.dims)}


def screen_argmax(model: onnx.ModelProto, folder: Path, store, candidates: int = 64) -> bool:
    """Rewrite the tail in place (module docstring). The 8-bit head and the row norms go into
    `store` (the fp32 WeightsFile, open, in `folder`). Returns whether the graph had the tail."""
    from .external_weights import point_to, tensor_bytes

    g = model.graph
    tail = _find_tail(g)
    if tail is None:
        return False
    inits = {t.name: t for t in g.initializer}
    w = np.frombuffer(tensor_bytes(inits[tail["weight"]], folder), np.float32).reshape(tail["dims"])
    rows = w if tail["transposed"] else w.T  # [V, H]
    vocab, hidden = rows.shape
    bs = block_size_for(hidden)
    if bs is None:
        return False
    head = quantise_head(np.ascontiguousarray(rows), bs)
    k = min(candidates, vocab)

    def stored(a: np.ndarray, name: str) -> str:
        t = numpy_helper.from_array(np.ascontiguousarray(a), name)
        offset, length = store.add(t.raw_data)
        point_to(t, store.name, offset, length)
        g.initializer.append(t)
        return name

    def const(a, name: str) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    p = "screen_"
    w8 = stored(head.q, p + "w8")
    s8 = stored(head.scales, p + "w8_scales")
    wn = stored(head.w_norm, p + "w_norm")
    en = stored(head.err_norm, p + "err_norm")
    if tail["transposed"]:
        fp32_rows = tail["weight"]
    else:  # the weight is stored [H, V]: the gather needs rows, so a transposed copy
        fp32_rows = stored(np.ascontiguousarray(rows), p + "w_rows")
    h = tail["matmul"].input[0]
    exclusion = tail["exclusion"]
    nb = hidden // bs
    N = helper.make_node
    nodes = [
        # hq: h on its int8 grid per block (MatMulNBits' own quantisation of hq is then exact)
        N("Shape", [h], [p + "h_shape"]),
        N("Slice", [p + "h_shape", const(np.array([0]), p + "i0"), const(np.array([-1]), p + "im1")], [p + "lead"]),
        N("Concat", [p + "lead", const(np.array([nb, bs]), p + "blocks")], [p + "hb_shape"], axis=0),
        N("Reshape", [h, p + "hb_shape"], [p + "hb"]),
        N("Abs", [p + "hb"], [p + "hb_abs"]),
        N("ReduceMax", [p + "hb_abs", const(np.array([-1]), p + "ax")], [p + "amax"], keepdims=1),
        N("Div", [p + "amax", const(np.float32(127.0), p + "q127")], [p + "hs"]),
        N("Equal", [p + "hs", const(np.float32(0.0), p + "zero")], [p + "hs_zero"]),
        N("Where", [p + "hs_zero", const(np.float32(1.0), p + "one"), p + "hs"], [p + "hs_safe"]),
        N("Div", [p + "hb", p + "hs_safe"], [p + "hk"]),
        N("Round", [p + "hk"], [p + "hk_round"]),
        N("Mul", [p + "hk_round", p + "hs_safe"], [p + "hqb"]),
        N("Reshape", [p + "hqb", p + "h_shape"], [p + "hq"]),
        # the bound's two norms of this pass
        N("Sub", [h, p + "hq"], [p + "dh"]),
        N("ReduceL2", [p + "dh", p + "ax"], [p + "dh_norm"], keepdims=1),
        N("ReduceL2", [p + "hq", p + "ax"], [p + "hq_norm"], keepdims=1),
        N("Mul", [p + "hq_norm", const(np.float32(ROUNDING_SLACK), p + "slack")], [p + "round_part"]),
        N("Add", [p + "dh_norm", p + "round_part"], [p + "a"]),  # x ||w_r||  (||w8_r|| <= ||w_r|| + err)
        N("Add", [p + "hq_norm", p + "round_part"], [p + "c"]),  # x err_r
        N("Mul", [p + "a", wn], [p + "bound_w"]),
        N("Mul", [p + "c", en], [p + "bound_e"]),
        N("Add", [p + "bound_w", p + "bound_e"], [p + "bound"]),
        N("MatMulNBits", [p + "hq", w8, s8], [p + "approx"], domain="com.microsoft", K=hidden, N=vocab, bits=8,
          block_size=bs, accuracy_level=4),
        N("Sub", [p + "approx", p + "bound"], [p + "lo_all"]),
        N("Add", [p + "approx", p + "bound"], [p + "hi_all"]),
        N("Add", [p + "lo_all", exclusion], [p + "lo"]),
        N("Add", [p + "hi_all", exclusion], [p + "hi"]),
        N("ReduceMax", [p + "lo", p + "ax"], [p + "thr"], keepdims=1),
        N("GreaterOrEqual", [p + "hi", p + "thr"], [p + "may_win"]),
        N("Cast", [p + "may_win"], [p + "may_win_i"], to=TensorProto.INT64),
        N("ReduceSum", [p + "may_win_i", p + "ax"], [p + "n_may_win"], keepdims=0),
        N("ReduceMax", [p + "n_may_win"], [p + "most"], keepdims=0),
        N("LessOrEqual", [p + "most", const(np.int64(k), p + "k")], [p + "screen_holds"]),
    ]
    # then: the exact logits of the k rows with the highest hi
    then_nodes = [
        N("TopK", [p + "hi", const(np.array([k]), p + "k1")], [p + "top_hi", p + "top_i"], axis=-1, largest=1, sorted=0),
        N("Gather", [fp32_rows, p + "top_i"], [p + "top_rows"], axis=0),  # [.., k, H]
        N("Unsqueeze", [h, const(np.array([-1]), p + "axm1")], [p + "h_col"]),  # [.., H, 1]
        N("MatMul", [p + "top_rows", p + "h_col"], [p + "top_logit_col"]),
        N("Squeeze", [p + "top_logit_col", p + "axm1"], [p + "top_logit"]),
        # the exclusion row, as the original Add broadcasts it, at the k rows
        N("Shape", [p + "hi"], [p + "hi_shape"]),
        N("Expand", [exclusion, p + "hi_shape"], [p + "exclusion_all"]),
        N("GatherElements", [p + "exclusion_all", p + "top_i"], [p + "top_exclusion"], axis=-1),
        N("Add", [p + "top_logit", p + "top_exclusion"], [p + "top_exact"]),
        N("ReduceMax", [p + "top_exact", p + "ax"], [p + "best"], keepdims=1),
        N("Equal", [p + "top_exact", p + "best"], [p + "is_best"]),
        N("Where", [p + "is_best", p + "top_i", const(np.int64(np.iinfo(np.int64).max), p + "big")], [p + "best_i"]),
        N("ReduceMin", [p + "best_i", p + "ax"], [p + "screened_tokens"], keepdims=0),
    ]
    out_vi = helper.make_tensor_value_info("tokens_branch", TensorProto.INT64, None)
    then_g = helper.make_graph(then_nodes + [N("Identity", [p + "screened_tokens"], ["tokens_branch"])], "screened",
                               [], [out_vi])
    # else: the original tail, whole
    orig = [n for n in (tail["transpose"], tail["matmul"], tail["add"], tail["argmax"]) if n is not None]
    else_nodes = [onnx.NodeProto() for _ in orig]
    for dst, src in zip(else_nodes, orig):
        dst.CopyFrom(src)
    else_nodes[-1].output[0] = "full_tokens"
    else_g = helper.make_graph(else_nodes + [N("Identity", ["full_tokens"], ["tokens_branch"])], "full_lm_head", [],
                               [helper.make_tensor_value_info("tokens_branch", TensorProto.INT64, None)])
    nodes.append(N("If", [p + "screen_holds"], ["tokens"], then_branch=then_g, else_branch=else_g))
    drop = {id(n) for n in orig}
    pos = min(i for i, n in enumerate(g.node) if id(n) in drop)
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept[:pos] + nodes + kept[pos:])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    store.flush()
    return True
