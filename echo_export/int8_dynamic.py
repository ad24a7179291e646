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
Per-tensor activation ranges are the form's accuracy risk on models with outlier channels: the
build's per-pass agreement against fp32 (verify.json) is the check.

TensorRT: no form (DynamicQuantizeMatMul is an onnxruntime operator, and TensorRT's int8 path is
the calibrated int8 precision's QDQ).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .int4 import MS_DOMAIN, WeightMatMul, rewrite_weight_matmuls
from .precision import PrecisionError

PRECISION = "int8dyn"


@dataclass(frozen=True)
class Int8DynOptions:
    """The converter's choices (`echo-export build --precision-opt int8dyn.<name>=<value>`)."""
    lm_head: bool = False  # also the output head (the embedding's tied copy)
    vision: bool = False  # also the vision tower and projector (they run once per image)

    @staticmethod
    def parse(opts: dict[str, str]) -> "Int8DynOptions":
        known = asdict(Int8DynOptions())
        bad = sorted(set(opts) - set(known))
        if bad:
            raise PrecisionError(f"unknown {PRECISION} option(s) {', '.join(bad)}; known: {', '.join(known)}")
        vals = {}
        for k, v in opts.items():
            if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise PrecisionError(f"{PRECISION}.{k}={v!r}: expected true or false")
            vals[k] = v.lower() in ("1", "true", "yes")
        return Int8DynOptions(**vals)

    def parts(self) -> tuple[str, ...]:
        return ("decoder",) + (("vision",) if self.vision else ()) + (("lm_head",) if self.lm_head else ())


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


def dynamic_matmul_nodes(wm: WeightMatMul, node: onnx.NodeProto, w_kn: np.ndarray, bits: int):
    """(nodes, initializers) replacing `node` by one DynamicQuantizeMatMul of its quantised weight."""
    q, scale = quantize_per_column(w_kn, bits)
    base = f"{wm.node}_{PRECISION}"
    inits = [numpy_helper.from_array(q, f"{base}_B"), numpy_helper.from_array(scale, f"{base}_scale")]
    mm = helper.make_node("DynamicQuantizeMatMul", [node.input[0], inits[0].name, inits[1].name], list(node.output),
                          name=base, domain=MS_DOMAIN)
    return [mm], inits


def int8dyn_for_tensorrt(src, dst) -> dict:
    """No TensorRT form (module docstring): say so, naming what to build instead."""
    raise PrecisionError(f"{PRECISION} (onnxruntime's DynamicQuantizeMatMul) has no TensorRT form; build int8 "
                         "(calibrated QDQ) or int4 for TensorRT")


def build_int8dyn(b, calib_px: Optional[list[np.ndarray]] = None) -> None:
    """The registry's int8dyn converter: every fp32 graph of the build -> its int8dyn graph, the
    tensors in weights.int8dyn.bin. `b` is echo_export.build's _Build (no calibration is used)."""
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

    def make(wm: WeightMatMul, node: onnx.NodeProto, w: np.ndarray):
        return dynamic_matmul_nodes(wm, node, w, bits)

    for (role, _, bs), src in sources:
        name = gio.graph_filename(role, PRECISION, bs)
        info = rewrite_weight_matmuls(b.tmp / src, b.tmp / name, opts.parts(), make, b.store(PRECISION),
                                      b.opts.weights_min_bytes, staged)
        onnx.checker.check_model(str(b.tmp / name), full_check=True)
        b.log(f"  {name:<34} {file_size_text(b.tmp / name):>10}  {info['replaced']} DynamicQuantizeMatMul {info['by_part']}")
        b.add_graph((role, PRECISION, bs), name)
    b.precision_info[PRECISION] = {**asdict(opts), "weight_bits": bits, "mode": mode["mode"],
                                   "chosen_for": mode["chosen_for"], "quantized_parts": list(opts.parts()),
                                   "activations": "uint8, one range per tensor per pass", "tensorrt_form": None}
    b.meter.stop()
