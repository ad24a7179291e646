"""TensorRT readiness without TensorRT: every graph's TensorRT form checked against the ONNX-TensorRT
parser's operator support matrix (data/onnx_trt_ops.json, with its source and TensorRT version).

No TensorRT wheel or GPU is reachable where the build usually runs, so a graph TensorRT would refuse
(an onnxruntime-only operator such as com.microsoft.MatMulNBits, an opset past the parser's, a type
the matrix does not list for an operator, a nonzero quantisation zero point) would only show when a
user builds plans on a GPU box. The build checks each precision's TensorRT form (the registry's
`tensorrt_form`, or the graph itself) here instead, and fails naming the node and the reason.

What is checked, per node: the domain (default ONNX only), the model's default-domain opset (the
matrix's range), that the operator is supported, the element type of the tensor the matrix's type
list is about (input 0, Where's X, Cast's target, a Constant's value), and the restrictions the
data file marks as `checks` (zero points of 0, axes / K as constants, LayerNormalization's single
output). The other restrictions are notes for a human; TensorRT's own parser has the last word.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

MATRIX = Path(__file__).with_name("data") / "onnx_trt_ops.json"
# ONNX element types by the matrix's names (TensorProto.DataType -> matrix name)
_TYPE_NAMES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
               onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT4: "INT4",
               onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.FLOAT4E2M1: "FP4"}
# which input's type the matrix's type list is about, where it is not input 0
_TYPED_INPUT = {"Where": 1}


class TensorRTNotReady(Exception):
    """A graph's TensorRT form has nodes TensorRT's ONNX parser does not take."""


@dataclass(frozen=True)
class Problem:
    node: str
    op_type: str
    reason: str
    source: str = ""  # the project line the exporter says the node came from, if it says

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op_type}): {self.reason}" + (f" [{self.source}]" if self.source else "")


def _source(node: onnx.NodeProto) -> str:
    """file:line of the innermost frame outside site-packages in the exporter's stack trace of a node:
    where in the model's code the refused operator comes from."""
    trace = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.stack_trace"), "")
    frames = [(f, n) for f, n in re.findall(r'File "([^"]+)", line (\d+)', trace) if "site-packages" not in f]
    return f"{Path(frames[-1][0]).name}:{frames[-1][1]}" if frames else ""


@lru_cache(maxsize=4)
def load_matrix(path: Path = MATRIX) -> dict:
    return json.loads(Path(path).read_text())


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can name (the weights need not be loaded)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    out = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    out.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            out.update({n.output[0]: a.t.data_type for a in n.attribute if a.name == "value"})
    return out


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    out.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"})
    return out


def _restriction(check: str, node: onnx.NodeProto, consts: dict, used: set[str], base_dir: str) -> Optional[str]:
    """Why `node` breaks one of the matrix's mechanical restrictions, or None."""
    if check == "zero_point_zero" and len(node.input) > 2 and node.input[2]:
        zp = consts.get(node.input[2])
        if zp is None:
            return "zero point is not a constant (TensorRT takes a zero point of 0 only)"
        if np.any(numpy_helper.to_array(zp, base_dir=base_dir) != 0):
            return "nonzero zero point (asymmetric); TensorRT takes a zero point of 0 only"
    if check == "axes_constant" and len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
        return f"axes input {node.input[1]!r} is not a constant"
    if check == "k_constant" and len(node.input) > 1 and node.input[1] not in consts:
        return f"K input {node.input[1]!r} is not a constant"
    if check == "only_first_output" and any(o and o in used for o in node.output[1:]):
        return "only the first output is supported, and another one is read"
    return None


def _node_type(node: onnx.NodeProto, types: dict[str, int]) -> Optional[int]:
    if node.op_type == "Cast":
        return next((a.i for a in node.attribute if a.name == "to"), None)
    if node.op_type in ("Constant", "ConstantOfShape"):
        return types.get(node.output[0])
    k = _TYPED_INPUT.get(node.op_type, 0)
    return types.get(node.input[k]) if len(node.input) > k and node.input[k] else None


def check_model(model: onnx.ModelProto, base_dir: str = "", matrix: Optional[dict] = None) -> list[Problem]:
    """Every reason TensorRT's ONNX parser would refuse `model`, per the matrix; empty when none.
    The model may be loaded without its external data (`base_dir` is where zero points are read)."""
    m = matrix or load_matrix()
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not m["opset_min"] <= opset <= m["opset_max"]:
        problems.append(Problem("(model)", "-", f"opset {opset} outside TensorRT {m['tensorrt_version']}'s "
                                                f"{m['opset_min']}-{m['opset_max']}"))
    types, consts = _tensor_types(model), _constants(model)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for n in model.graph.node:
        if n.domain not in m["domains"]:
            problems.append(Problem(n.name, n.op_type, f"domain {n.domain!r} is not TensorRT's (onnxruntime-only "
                                                       "operator); use the precision's TensorRT form"))
            continue
        spec = m["operators"].get(n.op_type)
        if spec is None or not spec["supported"]:
            problems.append(Problem(n.name, n.op_type, f"not supported by TensorRT {m['tensorrt_version']}'s ONNX parser",
                                    _source(n)))
            continue
        t = _node_type(n, types)
        name = _TYPE_NAMES.get(t) if t else None
        if name is not None and name not in spec["types"]:
            problems.append(Problem(n.name, n.op_type, f"type {name} not in TensorRT's {', '.join(spec['types'])}",
                                    _source(n)))
        for check in spec.get("checks", []):
            why = _restriction(check, n, consts, used, base_dir)
            if why:
                problems.append(Problem(n.name, n.op_type, why, _source(n)))
    return problems


def check_file(path: str | Path) -> list[Problem]:
    path = Path(path)
    return check_model(onnx.load(str(path), load_external_data=False), str(path.parent))


def _form_problems(folder: Path, name: str, convert: Optional[Callable]) -> list[Problem]:
    """The problems of one graph's TensorRT form, made beside it under a temporary name and removed
    (the int8 form refers to the folder's weights file; the int4 form writes its INT4 weights)."""
    if convert is None:
        return check_file(folder / name)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".trtcheck.", suffix=".onnx") as f:
        tmp = Path(f.name)
    try:
        convert(folder / name, tmp)
        return check_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)


def check_engine_folder(folder: Path, files: dict[tuple[str, str, int], str],
                        log: Callable[[str], None] = print, strict: bool = True) -> dict[str, dict]:
    """Check the TensorRT form of every graph of a build (`files`: (role, precision, batch) ->
    name); returns per precision {"tensorrt_ready", "tensorrt_checked_against", ...}. A precision
    without a TensorRT form (asymmetric int4) is reported not ready with the reason; a form with
    nodes TensorRT refuses raises TensorRTNotReady naming each graph, node and reason (`strict`),
    or marks its precision not ready with the problems (a build for onnxruntime only)."""
    from .precision import PrecisionError
    from .tensorrt_build import tensorrt_form_converter

    m = load_matrix()
    against = f"ONNX-TensorRT operator matrix, TensorRT {m['tensorrt_version']} (echo_export/data/{MATRIX.name})"
    out: dict[str, dict] = {}
    failed = []
    for (role, prec, bs), name in sorted(files.items()):
        info = out.setdefault(prec, {"tensorrt_ready": True, "tensorrt_checked_against": against, "tensorrt_graphs": 0})
        try:
            problems = _form_problems(Path(folder), name, tensorrt_form_converter(prec))
        except PrecisionError as e:  # no TensorRT form for this build's choice
            info.update(tensorrt_ready=False, tensorrt_reason=str(e))
            continue
        info["tensorrt_graphs"] += 1
        failed += [f"{name}: {p}" for p in problems]
        if problems:
            info.update(tensorrt_ready=False, tensorrt_reason=f"{len(problems)} node(s) TensorRT would refuse")
            info.setdefault("tensorrt_problems", []).extend(f"{name}: {p}" for p in problems[:10])
    for prec, info in out.items():
        log(f"  {prec}: " + (f"{info['tensorrt_graphs']} TensorRT form(s) pass" if info["tensorrt_ready"]
                             else f"NOT TensorRT-ready ({info['tensorrt_reason']})"))
    if failed and not strict:
        log("  warning: " + "\n  warning: ".join(failed[:20]))
    elif failed:
        raise TensorRTNotReady(f"{len(failed)} node(s) TensorRT {m['tensorrt_version']} would refuse:\n  "
                               + "\n  ".join(failed[:20]))
    return out
