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

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .int4 import (MS_DOMAIN, WeightMatMul, calibration_rows, rewrite_weight_matmuls, weight_key, weight_kn,
                   weight_matmuls)
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


class SmoothingPlan:
    """The smoothing of every weight MatMul: the channel maxima of each weight's activations (by
    weight key, over every graph's calibration rows), and per graph one scale per activation
    tensor, shared by the weights that read it (q/k/v, gate/up), so that one Mul divides it."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.x_amax: dict[str, np.ndarray] = {}

    def add_rows(self, rows: dict[str, np.ndarray]) -> None:
        for key, x in rows.items():
            m = np.abs(x.astype(np.float32, copy=False)).max(axis=0)
            self.x_amax[key] = np.maximum(self.x_amax[key], m) if key in self.x_amax else m

    def for_graph(self, model: onnx.ModelProto, parts: tuple[str, ...], base, source=None) -> dict[str, tuple]:
        """{MatMul node: (its activation tensor, s [K], whether it writes the shared Mul)}; weights
        without calibration rows are left out (not smoothed)."""
        from .precision import name_nodes

        name_nodes(model)  # the names rewrite_weight_matmuls will see
        nodes = {n.name: n for n in model.graph.node}
        groups: dict[str, list] = {}
        for wm in weight_matmuls(model, parts):
            w = weight_kn(model, wm, base, source)
            x = self.x_amax.get(weight_key(w))
            if x is not None:
                groups.setdefault(nodes[wm.node].input[0], []).append((wm.node, np.abs(w).max(axis=1), x))
            del w
        plan = {}
        for inp, members in groups.items():
            w_amax = np.max([m[1] for m in members], axis=0)
            x_amax = np.max([m[2] for m in members], axis=0)
            s = smoothing_scale(x_amax, w_amax, self.alpha)
            plan.update({node: (inp, s, i == 0) for i, (node, _, _) in enumerate(members)})
        return plan


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
                         smooth: Optional[tuple] = None):
    """(nodes, initializers) replacing `node`: DynamicQuantizeMatMul of the quantised weight; with
    `smooth` = (activation tensor, s, writes_mul) the weight's rows are multiplied by s and the
    matmul reads the activation divided by s, by a Mul that the first weight of the tensor writes."""
    base = f"{wm.node}_{PRECISION}"
    x, nodes, inits = node.input[0], [], []
    if smooth is not None:
        src, s, writes_mul = smooth
        w_kn = w_kn * s[:, None]
        x = f"{src}_{PRECISION}_smoothed"
        if writes_mul:
            inits.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}_inv_scale"))
            nodes.append(helper.make_node("Mul", [src, inits[-1].name], [x], name=f"{x}_mul"))
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

    from .build import resolve_int8_mode
    from .external_weights import file_size_text

    opts = Int8DynOptions.parse(b.opts.precision_options.get(PRECISION, {}))
    mode = resolve_int8_mode(b.opts.int8_mode)
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
    counts = {"smoothed": 0, "weights": 0}
    for (role, _, bs), src in sources:
        name = gio.graph_filename(role, PRECISION, bs)
        plan = {}
        if opts.smooth > 0:
            model = onnx.load(str(b.tmp / src), load_external_data=False)
            plan = smoothing.for_graph(model, opts.parts(), b.tmp, staged)
            del model

        def make(wm: WeightMatMul, node: onnx.NodeProto, w: np.ndarray, plan: dict = plan):
            counts["weights"] += 1
            counts["smoothed"] += wm.node in plan
            return dynamic_matmul_nodes(wm, node, w, bits, plan.get(wm.node))

        info = rewrite_weight_matmuls(b.tmp / src, b.tmp / name, opts.parts(), make, b.store(PRECISION),
                                      b.opts.weights_min_bytes, staged)
        onnx.checker.check_model(str(b.tmp / name), full_check=True)
        b.log(f"  {name:<34} {file_size_text(b.tmp / name):>10}  {info['replaced']} DynamicQuantizeMatMul {info['by_part']}")
        b.add_graph((role, PRECISION, bs), name)
    if opts.smooth > 0:
        b.log(f"  smoothed {counts['smoothed']} of {counts['weights']} weight MatMuls (alpha {opts.smooth}); the rest "
              "had no calibration rows")
    b.precision_info[PRECISION] = {**asdict(opts), "weight_bits": bits, "mode": mode["mode"], **counts,
                                   "chosen_for": mode["chosen_for"], "quantized_parts": list(opts.parts()),
                                   "activations": "uint8, one range per tensor per pass", "tensorrt_form": None}
    b.meter.stop()
