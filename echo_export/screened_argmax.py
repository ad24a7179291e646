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


class _Writer:
    """New initializers of the rewrite: large ones into the weights store, small ones inline."""

    def __init__(self, g: onnx.GraphProto, store) -> None:
        self.g, self.store = g, store

    def stored(self, a: np.ndarray, name: str) -> str:
        from .external_weights import stored_initializer

        self.g.initializer.append(stored_initializer(self.store, np.ascontiguousarray(a), name))
        return name

    def const(self, a, name: str) -> str:
        self.g.initializer.append(numpy_helper.from_array(np.asarray(a), name))
        return name


P = "screen_"


def _quantised_input_nodes(w: _Writer, h: str, nb: int, bs: int) -> list:
    """hq: h on its int8 grid per block (MatMulNBits' own quantisation of hq is then exact)."""
    N = helper.make_node
    return [
        N("Shape", [h], [P + "h_shape"]),
        N("Slice", [P + "h_shape", w.const(np.array([0]), P + "i0"), w.const(np.array([-1]), P + "im1")], [P + "lead"]),
        N("Concat", [P + "lead", w.const(np.array([nb, bs]), P + "blocks")], [P + "hb_shape"], axis=0),
        N("Reshape", [h, P + "hb_shape"], [P + "hb"]),
        N("Abs", [P + "hb"], [P + "hb_abs"]),
        N("ReduceMax", [P + "hb_abs", w.const(np.array([-1]), P + "ax")], [P + "amax"], keepdims=1),
        N("Div", [P + "amax", w.const(np.float32(127.0), P + "q127")], [P + "hs"]),
        N("Equal", [P + "hs", w.const(np.float32(0.0), P + "zero")], [P + "hs_zero"]),
        N("Where", [P + "hs_zero", w.const(np.float32(1.0), P + "one"), P + "hs"], [P + "hs_safe"]),
        N("Div", [P + "hb", P + "hs_safe"], [P + "hk"]),
        N("Round", [P + "hk"], [P + "hk_round"]),
        N("Mul", [P + "hk_round", P + "hs_safe"], [P + "hqb"]),
        N("Reshape", [P + "hqb", P + "h_shape"], [P + "hq"]),
    ]


def _screen_nodes(w: _Writer, h: str, head: ScreenedHead, vocab: int, hidden: int, exclusion: str, k: int) -> list:
    """The bound, the 8-bit logits, lo / hi, and whether at most k rows can still win."""
    N = helper.make_node
    wn = w.stored(head.w_norm, P + "w_norm")
    en = w.stored(head.err_norm, P + "err_norm")
    return [
        # the bound's two norms of this pass
        N("Sub", [h, P + "hq"], [P + "dh"]),
        N("ReduceL2", [P + "dh", P + "ax"], [P + "dh_norm"], keepdims=1),
        N("ReduceL2", [P + "hq", P + "ax"], [P + "hq_norm"], keepdims=1),
        N("Mul", [P + "hq_norm", w.const(np.float32(ROUNDING_SLACK), P + "slack")], [P + "round_part"]),
        N("Add", [P + "dh_norm", P + "round_part"], [P + "a"]),  # x ||w_r||  (||w8_r|| <= ||w_r|| + err)
        N("Add", [P + "hq_norm", P + "round_part"], [P + "c"]),  # x err_r
        N("Mul", [P + "a", wn], [P + "bound_w"]),
        N("Mul", [P + "c", en], [P + "bound_e"]),
        N("Add", [P + "bound_w", P + "bound_e"], [P + "bound"]),
        N("MatMulNBits", [P + "hq", w.stored(head.q, P + "w8"), w.stored(head.scales, P + "w8_scales")], [P + "approx"],
          domain="com.microsoft", K=hidden, N=vocab, bits=8, block_size=head.block_size, accuracy_level=4),
        N("Sub", [P + "approx", P + "bound"], [P + "lo_all"]),
        N("Add", [P + "approx", P + "bound"], [P + "hi_all"]),
        N("Add", [P + "lo_all", exclusion], [P + "lo"]),
        N("Add", [P + "hi_all", exclusion], [P + "hi"]),
        N("ReduceMax", [P + "lo", P + "ax"], [P + "thr"], keepdims=1),
        N("GreaterOrEqual", [P + "hi", P + "thr"], [P + "may_win"]),
        N("Cast", [P + "may_win"], [P + "may_win_i"], to=TensorProto.INT64),
        N("ReduceSum", [P + "may_win_i", P + "ax"], [P + "n_may_win"], keepdims=0),
        N("ReduceMax", [P + "n_may_win"], [P + "most"], keepdims=0),
        N("LessOrEqual", [P + "most", w.const(np.int64(k), P + "k")], [P + "screen_holds"]),
    ]


def _screened_branch(w: _Writer, h: str, fp32_rows: str, exclusion: str, k: int) -> onnx.GraphProto:
    """The If's then-branch: the exact logits of the k rows with the highest hi, lowest index among equals."""
    N = helper.make_node
    nodes = [
        N("TopK", [P + "hi", w.const(np.array([k]), P + "k1")], [P + "top_hi", P + "top_i"], axis=-1, largest=1, sorted=0),
        N("Gather", [fp32_rows, P + "top_i"], [P + "top_rows"], axis=0),  # [.., k, H]
        N("Unsqueeze", [h, w.const(np.array([-1]), P + "axm1")], [P + "h_col"]),  # [.., H, 1]
        N("MatMul", [P + "top_rows", P + "h_col"], [P + "top_logit_col"]),
        N("Squeeze", [P + "top_logit_col", P + "axm1"], [P + "top_logit"]),
        # the exclusion row, as the original Add broadcasts it, at the k rows
        N("Shape", [P + "hi"], [P + "hi_shape"]),
        N("Expand", [exclusion, P + "hi_shape"], [P + "exclusion_all"]),
        N("GatherElements", [P + "exclusion_all", P + "top_i"], [P + "top_exclusion"], axis=-1),
        N("Add", [P + "top_logit", P + "top_exclusion"], [P + "top_exact"]),
        N("ReduceMax", [P + "top_exact", P + "ax"], [P + "best"], keepdims=1),
        N("Equal", [P + "top_exact", P + "best"], [P + "is_best"]),
        N("Where", [P + "is_best", P + "top_i", w.const(np.int64(np.iinfo(np.int64).max), P + "big")], [P + "best_i"]),
        N("ReduceMin", [P + "best_i", P + "ax"], [P + "screened_tokens"], keepdims=0),
        N("Identity", [P + "screened_tokens"], ["tokens_branch"]),
    ]
    return helper.make_graph(nodes, "screened", [], [helper.make_tensor_value_info("tokens_branch", TensorProto.INT64, None)])


def _full_head_branch(orig: list) -> onnx.GraphProto:
    """The If's else-branch: the original tail, whole."""
    nodes = [onnx.NodeProto() for _ in orig]
    for dst, src in zip(nodes, orig):
        dst.CopyFrom(src)
    nodes[-1].output[0] = "full_tokens"
    nodes.append(helper.make_node("Identity", ["full_tokens"], ["tokens_branch"]))
    return helper.make_graph(nodes, "full_lm_head", [], [helper.make_tensor_value_info("tokens_branch", TensorProto.INT64, None)])


def screen_argmax(model: onnx.ModelProto, folder: Path, store, candidates: int = 64) -> bool:
    """Rewrite the tail in place (module docstring). The 8-bit head and the row norms go into
    `store` (the fp32 WeightsFile, open, in `folder`). Returns whether the graph had the tail."""
    from .external_weights import tensor_bytes

    g = model.graph
    tail = _find_tail(g)
    if tail is None:
        return False
    inits = {t.name: t for t in g.initializer}
    weight = np.frombuffer(tensor_bytes(inits[tail["weight"]], folder), np.float32).reshape(tail["dims"])
    rows = weight if tail["transposed"] else weight.T  # [V, H]
    vocab, hidden = rows.shape
    bs = block_size_for(hidden)
    if bs is None:
        return False
    head = quantise_head(np.ascontiguousarray(rows), bs)
    k = min(candidates, vocab)
    w = _Writer(g, store)
    # the gather needs rows: a weight stored [H, V] gets a transposed copy
    fp32_rows = tail["weight"] if tail["transposed"] else w.stored(np.ascontiguousarray(rows), P + "w_rows")
    h, exclusion = tail["matmul"].input[0], tail["exclusion"]
    nodes = _quantised_input_nodes(w, h, hidden // bs, bs) + _screen_nodes(w, h, head, vocab, hidden, exclusion, k)
    orig = [n for n in (tail["transpose"], tail["matmul"], tail["add"], tail["argmax"]) if n is not None]
    nodes.append(helper.make_node("If", [P + "screen_holds"], ["tokens"],
                                  then_branch=_screened_branch(w, h, fp32_rows, exclusion, k),
                                  else_branch=_full_head_branch(orig)))
    drop = {id(n) for n in orig}
    pos = min(i for i, n in enumerate(g.node) if id(n) in drop)
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept[:pos] + nodes + kept[pos:])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    store.flush()
    return True
