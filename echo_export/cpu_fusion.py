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


def fuse_rms_norm(model: onnx.ModelProto) -> int:
    """Each Pow(x, 2) -> ReduceMean(last axis, keepdims) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .)
    -> Mul(weight, .) chain -> SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps), in place.
    Only chains whose intermediate results nothing else reads; returns how many were fused."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def only(name: str, op: str):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in graph_outputs else None

    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    fused = 0
    for pow_ in g.node:
        if pow_.op_type != "Pow":
            continue
        e = _const(model, pow_.input[1], producers)
        if e is None or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
            continue
        x = pow_.input[0]
        mean = only(pow_.output[0], "ReduceMean")
        if mean is None:
            continue
        keep = next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "keepdims"), 1)
        axes = _const(model, mean.input[1], producers) if len(mean.input) > 1 else \
            np.array(next((helper.get_attribute_value(a) for a in mean.attribute if a.name == "axes"), []))
        if keep != 1 or axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) != -1:
            continue
        add = only(mean.output[0], "Add")
        if add is None:
            continue
        eps = _const(model, add.input[1] if add.input[0] == mean.output[0] else add.input[0], producers)
        sqrt = only(add.output[0], "Sqrt")
        rec = sqrt and only(sqrt.output[0], "Reciprocal")
        mul = rec and only(rec.output[0], "Mul")
        if eps is None or eps.size != 1 or mul is None or set(mul.input) != {x, rec.output[0]}:
            continue
        scale_mul = only(mul.output[0], "Mul")
        if scale_mul is None:
            continue
        w = scale_mul.input[0] if scale_mul.input[1] == mul.output[0] else scale_mul.input[1]
        if w not in {t.name for t in g.initializer}:
            continue
        chain = [pow_, mean, add, sqrt, rec, mul, scale_mul]
        ids = [next(i for i, n in enumerate(g.node) if n is c) for c in chain]
        sln = helper.make_node("SimplifiedLayerNormalization", [x, w], list(scale_mul.output),
                               name=f"{scale_mul.name or scale_mul.output[0]}_rmsnorm", axis=-1,
                               epsilon=float(eps.reshape(-1)[0]), stash_type=1)
        drop.update(ids[:-1])
        replace[ids[-1]] = sln
        fused += 1
    if fused:
        nodes = [replace.get(i, n) for i, n in enumerate(g.node) if i not in drop]
        del g.node[:]
        g.node.extend(nodes)
    return fused


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
