"""Fusions onnxruntime's own optimiser misses in the exported graphs, for its CPU kernels.

The exporter writes each RMSNorm as Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x) ->
Mul(weight): seven nodes, 49 of them per decoder pass at the Qwen2.5-0.5B shape. onnxruntime fuses
RMSNorm only when it is written with Div (its SimplifiedLayerNormFusion pattern), so none of ours
are fused, and at batch 1 a decode pass is short enough that per-node dispatch is a real share of
it. `fuse_rms_norm` writes each as one `SimplifiedLayerNormalization` (an onnxruntime operator in
the ONNX domain; the one its own fusion and onnxruntime-genai's builder emit), which onnxruntime's
optimiser then fuses further with the residual Add before it (SkipSimplifiedLayerNormalization).

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


def fuse_graph_file(path: Path) -> int:
    """Rewrite one .onnx file (its external weights untouched) through a new file, so that a
    hard-linked copy of a folder keeps the original."""
    model = onnx.load(str(path), load_external_data=False)
    n = fuse_rms_norm(model)
    if n:
        tmp = path.with_name(path.name + ".fusing")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
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
            print(f"{name}: {n} RMSNorm -> SimplifiedLayerNormalization")


if __name__ == "__main__":
    main()
