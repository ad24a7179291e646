"""Fusions onnxruntime's own optimiser misses in the exported graphs, for its CPU kernels.

The exporter writes each RMSNorm as Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) ->
Mul(weight): seven nodes, 49 of them per decoder pass at the Qwen2.5-0.5B shape. onnxruntime fuses
RMSNorm only when it is written with Div (its SimplifiedLayerNormFusion pattern), so none of ours
are fused, and at batch 1 a decode pass is short enough that per-node dispatch is a real share of
it. `fuse_rms_norm` writes each as one `SimplifiedLayerNormalization` (an onnxruntime operator in
the ONNX domain; the one its own fusion and onnxruntime-genai's builder emit), and
`fuse_skip_rms_norm` folds the residual Add before it into a SkipSimplifiedLayerNormalization, which
onnxruntime's optimiser does not do for these graphs.

Graph-only: the weights (the norm scales included) stay where they are, so a folder's graphs can be
rewritten in place (`python -m echo_export.cpu_fusion ENGINE_DIR`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _const(model: onnx.ModelProto, name: str, producers: dict) -> Optional[np.ndarray]:
    """The value of `name` when it is an initializer stored inline or a Constant node's output."""
    for t in model.graph.initializer:
        if t.name == name:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(t)
    p = producers.get(name)
    if p is not None and p.op_type == "Constant":
        a = next((a for a in p.attribute if a.name == "value"), None)
        return numpy_helper.to_array(a.t) if a is not None else None
    return None


class _Graph:
    """Who produces and who reads each tensor of a graph: what matching a chain asks."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.producers = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.initializers = {t.name for t in g.initializer}

    def only(self, name: str, op: str):
        """The one node reading `name`, if it is an `op` and `name` is not a graph output."""
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in self.outputs else None

    def const(self, name: str) -> Optional[np.ndarray]:
        return _const(self.model, name, self.producers)


def _rms_chain(gr: _Graph, pow_) -> Optional[tuple[list, str, str, float]]:
    """(the 7 nodes, x, weight, epsilon) of the RMSNorm chain starting at this Pow, else None."""
    e = gr.const(pow_.input[1])
    if e is None or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
        return None
    x = pow_.input[0]
    mean = gr.only(pow_.output[0], "ReduceMean")
    if mean is None:
        return None
    keep = next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "keepdims"), 1)
    axes = gr.const(mean.input[1]) if len(mean.input) > 1 else \
        np.array(next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "axes"), []))
    if keep != 1 or axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) != -1:
        return None
    add = gr.only(mean.output[0], "Add")
    if add is None:
        return None
    eps = gr.const(add.input[1] if add.input[0] == mean.output[0] else add.input[0])
    sqrt = gr.only(add.output[0], "Sqrt")
    rec = sqrt and gr.only(sqrt.output[0], "Reciprocal")
    mul = rec and gr.only(rec.output[0], "Mul")
    if eps is None or eps.size != 1 or mul is None or set(mul.input) != {x, rec.output[0]}:
        return None
    scale_mul = gr.only(mul.output[0], "Mul")
    if scale_mul is None:
        return None
    w = scale_mul.input[0] if scale_mul.input[1] == mul.output[0] else scale_mul.input[1]
    if w not in gr.initializers:
        return None
    return [pow_, mean, add, sqrt, rec, mul, scale_mul], x, w, float(eps.reshape(-1)[0])


def fuse_rms_norm(model: onnx.ModelProto) -> int:
    """Each Pow(x, 2) -> ReduceMean(last axis, keepdims) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .)
    -> Mul(weight, .) chain -> SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps), in place.
    Only chains whose intermediate results nothing else reads; returns how many were fused."""
    g = model.graph
    gr = _Graph(model)
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    for pow_ in [n for n in g.node if n.op_type == "Pow"]:
        found = _rms_chain(gr, pow_)
        if found is None:
            continue
        chain, x, w, eps = found
        last = chain[-1]
        ids = [next(i for i, n in enumerate(g.node) if n is c) for c in chain]
        drop.update(ids[:-1])
        replace[ids[-1]] = helper.make_node("SimplifiedLayerNormalization", [x, w], list(last.output),
                                            name=f"{last.name or last.output[0]}_rmsnorm", axis=-1, epsilon=eps,
                                            stash_type=1)
    if replace:
        nodes = [replace.get(i, n) for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(nodes)
    return len(replace)


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Each residual Add(a, b) read by a SimplifiedLayerNormalization -> one
    com.microsoft.SkipSimplifiedLayerNormalization(a, b, weight), whose 4th output is the sum where
    anything else reads it (the residual stream). onnxruntime's own SkipLayerNormFusion leaves ours
    alone (it wants shapes its inference cannot give here), so without this every layer keeps two
    Adds outside the norms. Only Adds of two computed tensors (neither an initializer nor a graph
    input: a residual, not a bias); returns how many were fused."""
    g = model.graph
    gr = _Graph(model)
    fixed = gr.initializers | {i.name for i in g.input}
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    index = {id(n): i for i, n in enumerate(g.node)}
    for norm in [n for n in g.node if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]:
        add = gr.producers.get(norm.input[0])
        if add is None or add.op_type != "Add" or index[id(add)] in drop or set(add.input) & fixed:
            continue
        total = add.output[0]
        others = [c for c in gr.consumers.get(total, []) if c is not norm]
        attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
        outputs = [norm.output[0]] + (["", "", total] if others or total in gr.outputs else [])
        # the sum is written where the Add was, so every reader of it still comes after its producer
        replace[index[id(add)]] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]], outputs,
            name=f"{norm.name or norm.output[0]}_skip", domain="com.microsoft", epsilon=attrs.get("epsilon", 1e-5))
        drop.add(index[id(norm)])
    if replace:
        nodes = [replace.get(i, n) for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def _projection_key(gr: _Graph, node) -> Optional[tuple]:
    """What must agree for projections of one input to be packed into one: MatMulNBits of weights
    alone (no zero points, g_idx or bias inputs) with their K, bits, block size and accuracy level;
    or MatMul by a 2-D initializer (its K)."""
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.input) == 3 \
            and all(i in gr.initializers for i in node.input[1:]):
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        return ("nbits", a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0))
    if node.op_type == "MatMul" and node.input[1] in gr.initializers:
        t = next(t for t in gr.model.graph.initializer if t.name == node.input[1])
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            return ("matmul", t.dims[0])
    return None


def _bias_add(gr: _Graph, node, width: int) -> Optional[tuple]:
    """(the Add, its bias initializer) when the projection's one reader adds a [width] fp32 bias."""
    add = gr.only(node.output[0], "Add")
    if add is None:
        return None
    bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    t = next((t for t in gr.model.graph.initializer if t.name == bias), None)
    if t is None or list(t.dims) != [width] or t.data_type != onnx.TensorProto.FLOAT:
        return None
    return add, bias


def _packed_projection(grp: list, name: str, inits: dict, array, stored) -> tuple:
    """(the one projection of grp's concatenated weights, the three widths, its new initializers)."""
    head = grp[0]
    if head.op_type == "MatMulNBits":
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        widths = [int(next(helper.get_attribute_value(a) for a in n.attribute if a.name == "N")) for n in grp]
        b = stored(np.concatenate([array(n.input[1]) for n in grp], 0), f"{name}_B")
        sc = np.concatenate([array(n.input[2]).reshape(w, -1) for n, w in zip(grp, widths)], 0)
        scales = stored(sc.reshape(-1) if len(inits[head.input[2]].dims) == 1 else sc, f"{name}_scales")
        packed = helper.make_node("MatMulNBits", [head.input[0], b.name, scales.name], [f"{name}_out"], name=name,
                                  domain="com.microsoft", **{**attrs, "N": sum(widths)})
        return packed, widths, [b, scales]
    ws = [array(n.input[1]) for n in grp]
    w = stored(np.concatenate(ws, 1), f"{name}_W")
    return helper.make_node("MatMul", [head.input[0], w.name], [f"{name}_out"], name=name), [x.shape[1] for x in ws], [w]


def _feed_packed_attention(gr: _Graph, qkv: list[str], packed: str) -> bool:
    """Where q, k and v are read only as inputs 0, 1 and 2 of one GroupQueryAttention (rotary inside
    it: inplace_steps.py), that node takes the packed tensor as its query and no key or value
    inputs, as onnxruntime-genai's graphs do: no Split. Returns whether it did."""
    gqa = gr.only(qkv[0], "GroupQueryAttention")
    if gqa is None or list(gqa.input[:3]) != qkv or any(gr.only(x, "GroupQueryAttention") is not gqa for x in qkv[1:]):
        return False
    gqa.input[0], gqa.input[1], gqa.input[2] = packed, "", ""
    return True


def pack_qkv_projections(model: onnx.ModelProto, folder: Path, store) -> int:
    """Each three projections of one tensor (a layer's q, k and v of its normed input) -> one
    projection by the concatenated weights (their bias Adds, where each has one, one Add of the
    concatenated biases) and a Split into the three outputs (or straight into the layer's
    GroupQueryAttention as its packed query: _feed_packed_attention), as onnxruntime-genai writes them: one
    dispatch and, for MatMulNBits at accuracy_level 4, one int8 quantisation of the input instead
    of three (the k and v projections are narrow: 2 x 64 columns at the 0.5B shape). The packed
    weights are added to `store` (the precision's WeightsFile, open, in `folder`); the separate
    ones stay for the graphs that share them (block_step). Returns the groups packed."""
    from .external_weights import stored_initializer

    g = model.graph
    gr = _Graph(model)
    inits = {t.name: t for t in g.initializer}
    by_input: dict[tuple, list] = {}
    for n in g.node:
        key = _projection_key(gr, n)
        if key is not None:
            by_input.setdefault((n.input[0], key), []).append(n)
    groups = [v for v in by_input.values() if len(v) == 3]

    stored = lambda a, name: stored_initializer(store, np.ascontiguousarray(a), name)  # noqa: E731
    array = lambda name: _constant_value(gr, name, folder)  # noqa: E731
    first: dict[int, list] = {}
    drop: set[int] = set()
    index = {id(n): i for i, n in enumerate(g.node)}
    for grp in groups:
        name = f"{grp[0].name or grp[0].output[0]}_qkv"
        packed, widths, new_inits = _packed_projection(grp, name, inits, array, stored)
        biases = [_bias_add(gr, n, w) for n, w in zip(grp, widths)]
        outs, made = [n.output[0] for n in grp], [packed]
        if all(b is not None for b in biases):  # q/k/v biases: one Add, which onnxruntime folds into the matmul
            bias = stored(np.concatenate([array(bias_name) for _, bias_name in biases]), f"{name}_bias")
            new_inits.append(bias)
            made.append(helper.make_node("Add", [packed.output[0], bias.name], [f"{name}_biased"], name=f"{name}_bias"))
            outs = [add.output[0] for add, _ in biases]
            drop.update(index[id(add)] for add, _ in biases)
        if not _feed_packed_attention(gr, outs, made[-1].output[0]):
            split_sizes = numpy_helper.from_array(np.array(widths, np.int64), f"{name}_split_sizes")
            new_inits.append(split_sizes)
            made.append(helper.make_node("Split", [made[-1].output[0], split_sizes.name], outs, name=f"{name}_split",
                                         axis=-1))
        g.initializer.extend(new_inits)
        ids = sorted(index[id(n)] for n in grp)
        first[ids[0]] = made  # where the first of the three was: before any reader of the three
        drop.update(ids)
    if groups:
        nodes = []
        for i, n in enumerate(g.node):
            nodes += first.get(i, []) if i in drop else [n]
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input}
        kept = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(kept)
        store.flush()
    return len(groups)


def _constant_value(gr: _Graph, name: str, folder: Path) -> Optional[np.ndarray]:
    """The value of a constant tensor: an initializer (inline or external), a Constant node's
    output, or Expand of such a value (full_like as the exporter writes it)."""
    from .external_weights import tensor_bytes

    t = next((t for t in gr.model.graph.initializer if t.name == name), None)
    if t is not None:
        return np.frombuffer(tensor_bytes(t, folder), helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(list(t.dims))
    p = gr.producers.get(name)
    if p is not None and p.op_type == "Constant":
        return gr.const(name)
    if p is not None and p.op_type == "Expand":
        return _constant_value(gr, p.input[0], folder)  # its values; the shape is the logits'
    return None


def additive_exclusion(model: onnx.ModelProto, folder: Path) -> int:
    """Each Where(Equal(ids, token) or its folded constant, fill, logits) with constant ids, token
    and fill (the mask token's exclusion, backbone.exclude_token) -> Add(logits, row), row = the fill value at the
    token, 0 elsewhere. onnxruntime's CPU Where broadcasts the [V] condition over [b, t, V] logits
    on a slow path: 1.2 ms of a 29 ms int8dyn block step at the Qwen2.5-0.5B shape, for 8 rows of
    151936 logits. The token's logit becomes logit + fill (-30000 + a few) instead of fill: softmax
    gives it exp(.) = 0 either way and argmax never picks it. Returns the Wheres rewritten."""
    g = model.graph
    gr = _Graph(model)
    replace: dict[int, onnx.NodeProto] = {}
    for i, n in enumerate(g.node):
        if n.op_type != "Where":
            continue
        eq = gr.producers.get(n.input[0])
        if eq is not None and eq.op_type == "Equal":
            a, b = (_constant_value(gr, x, folder) for x in eq.input)
            cond = None if a is None or b is None else np.equal(a, b)
        else:  # small vocabularies: the exporter folded the comparison into a constant
            cond = _constant_value(gr, n.input[0], folder)
        fill = _constant_value(gr, n.input[1], folder)
        if cond is None or cond.dtype != np.bool_ or fill is None or fill.size == 0 \
                or not np.all(fill == fill.reshape(-1)[0]):
            continue
        if cond.ndim != 1 or cond.sum() != 1:
            continue  # one token of a [V] row: anything else is not the exclusion
        row = numpy_helper.from_array(np.where(cond, np.float32(fill.reshape(-1)[0]), np.float32(0)), f"{n.name or n.output[0]}_row")
        g.initializer.append(row)
        replace[i] = helper.make_node("Add", [n.input[2], row.name], list(n.output), name=f"{n.name or n.output[0]}_additive")
    if replace:
        nodes = [replace.get(i, n) for i, n in enumerate(g.node)]
        del g.node[:]
        g.node.extend(nodes)
        _drop_dead_nodes(model)
    return len(replace)


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs anything reads (the Equal and Expand a rewrite orphaned)."""
    g = model.graph
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in g.node:  # subgraphs (If branches) read outer names too
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    read |= {i for m in a.g.node for i in m.input}
        live = [n for n in g.node if any(o in read for o in n.output if o)]
        if len(live) == len(g.node):
            return
        del g.node[:]
        g.node.extend(live)


def rewrite_graph_file(path: Path, rewrite) -> int:
    """`rewrite(model, folder) -> count` on one .onnx file (external weights untouched), saved
    through a new file where it changed anything."""
    model = onnx.load(str(path), load_external_data=False)
    n = rewrite(model, path.parent)
    if n:
        _save_through_new_file(model, path)
    return n


def _save_through_new_file(model: onnx.ModelProto, path: Path) -> None:
    """Write beside and move over: a hard-linked copy of the folder keeps the original."""
    tmp = path.with_name(path.name + ".rewriting")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def fuse_graph_file(path: Path, store=None) -> int:
    """Rewrite one .onnx file (its external weights untouched) through a new file, so that a
    hard-linked copy of a folder keeps the original. Returns the RMSNorms fused. With `store` (the
    graph's precision's WeightsFile, open), its q/k/v projections are packed too (their packed
    weights appended to it)."""
    model = onnx.load(str(path), load_external_data=False)
    n = fuse_rms_norm(model)
    changed = n + fuse_skip_rms_norm(model)
    if store is not None:
        changed += pack_qkv_projections(model, path.parent, store)
    if changed:
        _save_through_new_file(model, path)
    return n


def fuse_engine_folder(folder: Path) -> dict[str, int]:
    """Every graph of an engine folder, its manifest re-hashed (graphs changed, weights not)."""
    from runtime.manifest import load_manifest, write_manifest

    m = load_manifest(folder)
    counts = {name: fuse_graph_file(folder / name) for name in sorted(m.files) if name.endswith(".onnx")}
    write_manifest(folder, m, list(m.files))
    return counts


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m echo_export.cpu_fusion ENGINE_DIR... (rewritten in place, manifest re-hashed)")
    for a in argv:
        for name, n in fuse_engine_folder(Path(a)).items():
            print(f"{name}: {n} RMSNorm -> (Skip)SimplifiedLayerNormalization")


if __name__ == "__main__":
    main()
