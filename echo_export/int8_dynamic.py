"""int8dyn: 8-bit weights with activations quantised on the fly, each pass, for the CPU's integer GEMM.

onnxruntime form (the engine's `*.int8dyn.*.onnx`): each decoder weight MatMul becomes
`com.microsoft.DynamicQuantizeMatMul`: the weight stored as int8 [K, N] with one fp32 scale per
output column (symmetric, round to nearest), the activation quantised to uint8 over the whole
tensor at run time (its own min/max every pass: no calibration, nothing to go stale), then MLAS's
u8 x s8 GEMM, the one onnxruntime's `quantize_dynamic` models run on.

Why a fourth integer form: a fused one-step pass multiplies 2B rows (16 at B=8) by every weight,
and there MLAS's integer GEMM is much faster than the blockwise MatMulNBits kernel int4/int8w use
(which is built for one row, where reading the weights is the cost). The numbers are in
benchmarks/results/peers/README.md (`python -m benchmarks.matmul_floor --kernel`). For one row (AR
steps) int4 stays the faster form.

The weights' width follows the build's `--int8-mode` (runtime/cpu_features.py): u8s8 (full 8-bit
weights, exact on CPUs with VNNI) or u8s7 (7-bit weights, onnxruntime's reduce_range: on AVX2
without VNNI the u8 x s8 pair sums cannot saturate). `auto` picks for the building CPU, and the
manifest records it (precision_info.int8dyn.chosen_for) so that the runtime can warn on a mismatch.
One activation range per tensor is this form's risk on LLMs: a few input channels carry values
far above the rest, set the range, and leave the others few levels. Smoothing (after SmoothQuant,
Xiao et al. 2023; `int8dyn.smooth=alpha`, default 0.5, 0 off) moves that range into the weights:
for each weight, input channel k gets s_k = max|x_k|^alpha / max_n|W_kn|^(1-alpha) from the
calibration activations (the same rows int4's AWQ reads), the weight's row k is multiplied by s_k
before it is quantised and the activation divided by it in a Mul before the matmul (exact in real
arithmetic). The build's per-pass agreement against fp32 (verify.json) is the check.

TensorRT: no form (DynamicQuantizeMatMul is an onnxruntime operator, and TensorRT's int8 path is
the calibrated int8 precision's QDQ).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .int4 import (MS_DOMAIN, WeightMatMul, calibration_rows, initializer_array, rewrite_weight_matmuls, weight_key,
                   weight_kn, weight_matmuls)
from .precision import PrecisionError

PRECISION = "int8dyn"


@dataclass(frozen=True)
class Int8DynOptions:
    """The converter's choices (`echo-export build --precision-opt int8dyn.<name>=<value>`)."""
    lm_head: bool = False  # also the output head (the embedding's tied copy)
    vision: bool = False  # also the vision tower and projector (they run once per image)
    smooth: float = 0.5  # SmoothQuant's alpha (module docstring); 0: no smoothing, no calibration
    calib_rows: int = 256  # activation rows kept per weight for the channel maxima
    max_feeds: int = 32  # calibration feeds run per graph

    @staticmethod
    def parse(opts: dict[str, str]) -> "Int8DynOptions":
        known = asdict(Int8DynOptions())
        bad = sorted(set(opts) - set(known))
        if bad:
            raise PrecisionError(f"unknown {PRECISION} option(s) {', '.join(bad)}; known: {', '.join(known)}")
        vals: dict = {}
        for k, v in opts.items():
            kind = type(known[k])
            try:
                if kind is bool:
                    if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError
                    vals[k] = v.lower() in ("1", "true", "yes")
                else:
                    vals[k] = kind(v)
            except ValueError:
                raise PrecisionError(f"{PRECISION}.{k}={v!r}: expected {'true or false' if kind is bool else 'a ' + kind.__name__}") from None
        o = Int8DynOptions(**vals)
        if not 0.0 <= o.smooth <= 1.0:
            raise PrecisionError(f"{PRECISION}.smooth={o.smooth}: alpha is in [0, 1] (0: off)")
        if o.calib_rows < 1 or o.max_feeds < 1:
            raise PrecisionError(f"{PRECISION}: calib_rows and max_feeds must be at least 1")
        return o

    def parts(self) -> tuple[str, ...]:
        return ("decoder",) + (("vision",) if self.vision else ()) + (("lm_head",) if self.lm_head else ())


def smooth_rows_wanted(precisions, options: dict[str, dict[str, str]]) -> Optional[int]:
    """Calibration rows per layer int8dyn's smoothing wants, or None (not built, or smooth=0)."""
    if PRECISION not in precisions:
        return None
    o = Int8DynOptions.parse(options.get(PRECISION, {}))
    return o.calib_rows if o.smooth > 0 else None


def smoothing_scale(x_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s [K] = max|x_k|^alpha / max|W_k.|^(1-alpha) from the activation's and the weight rows' maxima;
    1 where a channel never carried a value or its weight row is zero (nothing to move)."""
    x, w = x_amax.astype(np.float64), w_amax.astype(np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(w)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s.astype(np.float32)


@dataclass
class Smoothing:
    """One weight MatMul's smoothing: its rows are multiplied by `scale` and it reads `reads`, the
    activation divided by `scale`: by a Mul that the first weight of the tensor writes, or already
    upstream (a fold: the norm's weight, or the previous matmul's columns, divided by it).
    `out_scale`: this weight's columns divided by it (the fold of the next matmul's scale)."""
    source: str
    scale: np.ndarray
    reads: str
    writes_mul: bool = False
    out_scale: Optional[np.ndarray] = None


@dataclass
class GraphSmoothing:
    """One graph's smoothing: per weight MatMul node, and the norm weights that absorb a scale
    ({Mul node: (its constant, 1/s)})."""
    by_node: dict
    norm_folds: dict

    def other_nodes(self, model: onnx.ModelProto, base, source=None):
        """The folded norms' Mul nodes, reading their constant times 1/s (rewrite_weight_matmuls)."""
        nodes = {n.name: n for n in model.graph.node}
        new, inits = {}, []
        for name, (const, inv) in self.norm_folds.items():
            values = initializer_array(model, const, base, source) * inv
            # named by the Mul: one weight may feed several norm Muls (one per call of the layer)
            inits.append(numpy_helper.from_array(values.astype(np.float32), f"{name}_{const}_{PRECISION}_smoothed"))
            n = copy.deepcopy(nodes[name])
            n.input[list(n.input).index(const)] = inits[-1].name
            new[name] = [n]
        return new, inits


class SmoothingPlan:
    """The smoothing of every weight MatMul: the channel maxima of each weight's activations (by
    weight key, over every graph's calibration rows), and per graph one scale per activation
    tensor, shared by the weights that read it (q/k/v, gate/up).

    The division by s costs nothing where it folds upstream (exact in real arithmetic): into the
    norm's weight when the tensor is `Mul(normed, weight)` read by these matmuls only (the inputs
    of q/k/v and gate/up), or into up's columns when it is `silu(gate) * up` (down's input; the
    per-column quantisation of up is unchanged by it). Elsewhere (o_proj's input) one Mul divides."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.x_amax: dict[str, np.ndarray] = {}

    def add_rows(self, rows: dict[str, np.ndarray]) -> None:
        for key, x in rows.items():
            m = np.abs(x.astype(np.float32, copy=False)).max(axis=0)
            self.x_amax[key] = np.maximum(self.x_amax[key], m) if key in self.x_amax else m

    def for_graph(self, model: onnx.ModelProto, parts: tuple[str, ...], base, source=None) -> GraphSmoothing:
        """Each weight MatMul's Smoothing (weights without calibration rows are left out)."""
        from .precision import name_nodes

        name_nodes(model)  # the names rewrite_weight_matmuls will see
        g = model.graph
        nodes = {n.name: n for n in g.node}
        prod = {o: n for n in g.node for o in n.output}
        readers: dict[str, set] = {}
        for n in g.node:
            for i in n.input:
                readers.setdefault(i, set()).add(n.name)
        consts = {t.name for t in g.initializer}
        groups: dict[str, list] = {}
        weight_nodes = set()
        for wm in weight_matmuls(model, parts):
            weight_nodes.add(wm.node)
            w = weight_kn(model, wm, base, source)
            x = self.x_amax.get(weight_key(w))
            if x is not None:
                groups.setdefault(nodes[wm.node].input[0], []).append((wm.node, np.abs(w).max(axis=1), x))
            del w
        by_node, norm_folds, up_folds = {}, {}, {}
        for inp, members in groups.items():
            s = smoothing_scale(np.max([m[2] for m in members], axis=0), np.max([m[1] for m in members], axis=0),
                                self.alpha)
            p = prod.get(inp)
            fold = p is not None and p.op_type == "Mul" and readers.get(inp, set()) == {m[0] for m in members}
            const = [i for i in p.input if i in consts] if fold else []
            ups = [prod[i] for i in p.input if i in prod] if fold and not const else []
            ups = [u for u in ups if u.name in weight_nodes and readers.get(u.output[0]) == {p.name}]
            if len(const) == 1 and tuple(next(t for t in g.initializer if t.name == const[0]).dims) == s.shape:
                norm_folds[p.name] = (const[0], 1.0 / s)  # Mul(normed, weight): the weight / s
            elif len(ups) == 1:
                up_folds[ups[0].name] = s  # silu(gate) * up: up's columns / s
            else:
                fold = False
            for i, (node, _, _) in enumerate(members):
                by_node[node] = Smoothing(inp, s, inp if fold else f"{inp}_{PRECISION}_smoothed", not fold and i == 0)
        for name, s in up_folds.items():
            x = nodes[name].input[0]
            by_node.setdefault(name, Smoothing(x, None, x)).out_scale = s  # up itself may have no rows
        return GraphSmoothing(by_node, norm_folds)


def check_options(opts: dict[str, str]) -> None:
    """The build's early check of --precision-opt int8dyn.* (before any export)."""
    Int8DynOptions.parse(opts)


def quantize_per_column(w_kn: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> (q int8 [K, N] in +-(2^(bits-1) - 1), scale fp32 [N]) with W ~ q * scale; a
    column of zeros gets scale 1 (its q is 0 either way)."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w_kn).max(axis=0).astype(np.float32)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w_kn / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def weight_bits_for_mode(mode: str) -> int:
    """The weights' width for an int8 mode (runtime/cpu_features.py): 7 where the CPU without VNNI
    would saturate 8-bit ones; s8s8 (symmetric activations) is not this form's."""
    if mode == "s8s8":
        raise PrecisionError(f"{PRECISION} quantises activations to uint8 (DynamicQuantizeMatMul): --int8-mode s8s8 "
                             "does not apply; use auto, u8s8 or u8s7")
    return 7 if mode == "u8s7" else 8


def dynamic_matmul_nodes(wm: WeightMatMul, node: onnx.NodeProto, w_kn: np.ndarray, bits: int,
                         smooth: Optional[Smoothing] = None):
    """(nodes, initializers) replacing `node`: DynamicQuantizeMatMul of the quantised weight, with
    its Smoothing: rows times s, columns divided by out_scale, reading the divided activation
    (writing the shared Mul where it is the tensor's first weight and nothing folded upstream)."""
    base = f"{wm.node}_{PRECISION}"
    x, nodes, inits = node.input[0], [], []
    if smooth is not None:
        if smooth.scale is not None:
            w_kn = w_kn * smooth.scale[:, None]
        if smooth.out_scale is not None:
            w_kn = w_kn / smooth.out_scale[None, :]
        x = smooth.reads
        if smooth.writes_mul:
            inits.append(numpy_helper.from_array((1.0 / smooth.scale).astype(np.float32), f"{x}_inv_scale"))
            nodes.append(helper.make_node("Mul", [smooth.source, inits[-1].name], [x], name=f"{x}_mul"))
    q, scale = quantize_per_column(w_kn, bits)
    inits += [numpy_helper.from_array(q, f"{base}_B"), numpy_helper.from_array(scale, f"{base}_scale")]
    nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"{base}_B", f"{base}_scale"], list(node.output),
                                  name=base, domain=MS_DOMAIN))
    return nodes, inits


def int8dyn_for_tensorrt(src, dst) -> dict:
    """No TensorRT form (module docstring): say so, naming what to build instead."""
    raise PrecisionError(f"{PRECISION} (onnxruntime's DynamicQuantizeMatMul) has no TensorRT form; build int8 "
                         "(calibrated QDQ) or int4 for TensorRT")


def build_int8dyn(b, calib_px: Optional[list[np.ndarray]] = None) -> None:
    """The registry's int8dyn converter: every fp32 graph of the build -> its int8dyn graph, the
    tensors in weights.int8dyn.bin. `b` is echo_export.build's _Build; its calibration feeds (or
    the PyTorch decodes' rows) give the smoothing's activation maxima."""
    from runtime import graph_io as gio

    from .external_weights import file_size_text

    opts = Int8DynOptions.parse(b.opts.precision_options.get(PRECISION, {}))
    mode = b.int8_info  # the build's --int8-mode, resolved for this CPU (build.resolve_int8_mode)
    bits = weight_bits_for_mode(mode["mode"])
    b.meter.start(PRECISION)
    b.log(f"[{PRECISION}] {bits}-bit weights per column, uint8 activations per pass (mode {mode['mode']}, for CPUs "
          f"of kind {mode['chosen_for']}); quantised: {', '.join(opts.parts())}")
    sources = sorted((k, v) for k, v in b.files.items() if k[1] == "fp32")
    if not sources:
        raise PrecisionError(f"{PRECISION} converts the fp32 graphs, and this build has none")
    staged = b.deferred if b.stream else None
    smoothing = SmoothingPlan(opts.smooth)
    if opts.smooth > 0:
        calibration_rows(b, opts.parts(), opts.max_feeds, opts.calib_rows, smoothing.add_rows)
    counts = {"smoothed": 0, "weights": 0, "mul_free": 0}
    for (role, _, bs), src in sources:
        name = gio.graph_filename(role, PRECISION, bs)
        plan = GraphSmoothing({}, {})
        if opts.smooth > 0:
            plan = smoothing.for_graph(onnx.load(str(b.tmp / src), load_external_data=False), opts.parts(), b.tmp, staged)

        def make(wm: WeightMatMul, node: onnx.NodeProto, w: np.ndarray, plan: GraphSmoothing = plan):
            smooth = plan.by_node.get(wm.node)
            counts["weights"] += 1
            counts["smoothed"] += smooth is not None and smooth.scale is not None
            counts["mul_free"] += smooth is not None and smooth.scale is not None and smooth.reads == smooth.source
            return dynamic_matmul_nodes(wm, node, w, bits, smooth)

        def other_nodes(model: onnx.ModelProto, plan: GraphSmoothing = plan):
            return plan.other_nodes(model, b.tmp, staged)

        info = rewrite_weight_matmuls(b.tmp / src, b.tmp / name, opts.parts(), make, b.store(PRECISION),
                                      b.opts.weights_min_bytes, staged, other_nodes)
        onnx.checker.check_model(str(b.tmp / name), full_check=True)
        b.log(f"  {name:<34} {file_size_text(b.tmp / name):>10}  {info['replaced']} DynamicQuantizeMatMul {info['by_part']}")
        b.add_graph((role, PRECISION, bs), name)
    if opts.smooth > 0:
        b.log(f"  smoothed {counts['smoothed']} of {counts['weights']} weight MatMuls (alpha {opts.smooth}; the rest had "
              f"no calibration rows), {counts['mul_free']} of them folded upstream (a norm's weight, up's columns)")
    b.precision_info[PRECISION] = {**asdict(opts), "weight_bits": bits, "mode": mode["mode"], **counts,
                                   "chosen_for": mode["chosen_for"], "quantized_parts": list(opts.parts()),
                                   "activations": "uint8, one range per tensor per pass", "tensorrt_form": None}
    b.meter.stop()
