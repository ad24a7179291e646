"""The precision registry: everything the build, verification, runtime, server and CLIs know
about a precision, in one entry per precision.

A precision is how the weights (and some arithmetic) of the exported graphs are stored: fp32,
fp16, int8 (static QDQ), int4 and int8w (weight-only 4- and 8-bit MatMulNBits, echo_export/int4.py),
int8dyn (8-bit weights, activations quantised each pass: echo_export/int8_dynamic.py). Every layer asks this module
instead of spelling the list out: `echo-export build --precision`, `echo-report --precision`,
`echo-serve --precision`, `echo-bench`'s engine names, the runtime's shared-weights choice and
its CPU memory check, verification's tolerances and the TensorRT form a plan is built from.
Adding a precision is an entry here plus its converter (named by `converter`, a
"module:function" the build imports: the runtime never imports echo_export).

Torch-free and onnx-free: the runtime (bottom layer) reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .errors import EchoRuntimeError


class UnknownPrecision(EchoRuntimeError, ValueError):
    """A precision name that is not in the registry."""


@dataclass(frozen=True)
class Tolerances:
    """What verification expects of a precision against fp32 / the PyTorch reference.

    `min_per_pass_agreement`: share of block tokens equal to fp32's when the block step is fed
    exactly the fp32 run's inputs (verify.py `_per_pass_agreement`); below it verify.json marks
    the variant out of tolerance and the build says so. fp32 itself must be identical to the
    PyTorch reference (`must_be_identical`), or the build fails."""
    min_per_pass_agreement: float = 0.0
    must_be_identical: bool = False


@dataclass(frozen=True)
class Precision:
    """One precision's entry. Fields are data (no callables): the runtime reads them without
    importing the build, and the build resolves `converter` itself. No entry needs onnxruntime
    session options of its own: int4's kernel choice (accuracy_level) is a node attribute the
    converter sets for the serving CPU, and the session-level choices (threads, optimisation
    level, shared weights) are the same for every precision."""
    name: str
    summary: str
    # "module:function" that writes this precision's graphs from the fp32 ones, called by
    # echo_export.build as function(build, calibration_pixels); None: the fp32 export itself
    converter: Optional[str]
    # onnxruntime CPU: the graphs of one precision borrow one map of weights.<precision>.bin and
    # one set of packed weights (runtime/ort_capi.py). False: each session holds its own copy
    # (fp16: onnxruntime casts each fp16 weight to fp32 at load, so there is nothing to share)
    shares_weights: bool = True
    # bytes one onnxruntime CPU session holds per byte of weights.<precision>.bin (fp16: a folded
    # fp32 copy, 2x); with shares_weights the graphs hold it once, else once per session
    cpu_memory_factor: float = 1.0
    tolerances: Tolerances = Tolerances()
    # the build records real training-image feeds for it (calibration)
    needs_calibration: bool = False
    # its converter reads the weights of graphs staged from the checkpoint's own dtype (no fp32
    # weights written or held): a build asking only for such precisions never widens the model
    converts_from_stored_dtype: bool = False
    # its integer GEMM follows the build's --int8-mode (u8s8 / u8s7 for the CPU kind: cpu_features.py)
    follows_int8_mode: bool = False
    # its graphs keep the mask token's exclusion as the exporter wrote it (a Where), not the CPU
    # fusions' Add (echo_export/cpu_fusion.additive_exclusion): static int8 (made from an exported
    # Add, its graphs lost every token; not traced) and fp16 (GPU graphs)
    exclusion_as_where: bool = False
    # "module:function(src, dst) -> dict" that rewrites an onnxruntime graph of this precision into
    # the form TensorRT parses (written beside it as <graph>.tensorrt.onnx); None: parsed as it is
    tensorrt_form: Optional[str] = None

    def cpu_session_bytes(self, weights_bytes: int, sessions: int = 1) -> int:
        """About what `sessions` onnxruntime CPU sessions of this precision hold for its weights."""
        n = 1 if self.shares_weights else sessions
        return int(n * self.cpu_memory_factor * weights_bytes)


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(
        "fp32", "float32: the verified base every other precision derives from", converter=None,
        tolerances=Tolerances(min_per_pass_agreement=1.0, must_be_identical=True)),
    "fp16": Precision(
        "fp16", "float16 weights and arithmetic, IO fp32, norm/rotary/attention-score/head islands fp32 (GPUs)",
        converter="echo_export.build:_convert_fp16", shares_weights=False, cpu_memory_factor=2.0,
        converts_from_stored_dtype=True, exclusion_as_where=True,
        tolerances=Tolerances(min_per_pass_agreement=0.98)),
    "int8": Precision(
        "int8", "static QDQ of the weight MatMuls, calibrated on training images (CPU int8 kernels)",
        converter="echo_export.build:_quantise_int8", needs_calibration=True, follows_int8_mode=True,
        exclusion_as_where=True,
        tolerances=Tolerances(min_per_pass_agreement=0.95), tensorrt_form="echo_export.precision:int8_qdq_for_tensorrt"),
    "int4": Precision(
        "int4", "weight-only 4-bit MatMulNBits of the decoder's linear layers (blocks of 32/64/128, RTN or AWQ)",
        converter="echo_export.int4:build_int4", needs_calibration=True,  # AWQ's activation statistics
        converts_from_stored_dtype=True,
        tolerances=Tolerances(min_per_pass_agreement=0.90), tensorrt_form="echo_export.int4:int4_dq_for_tensorrt"),
    "int8w": Precision(
        "int8w", "weight-only 8-bit MatMulNBits of the decoder's linear layers (blocks of 32/64/128, RTN), activations fp32",
        converter="echo_export.int4:build_int8w", converts_from_stored_dtype=True,
        tolerances=Tolerances(min_per_pass_agreement=0.95), tensorrt_form="echo_export.int4:int8w_for_tensorrt"),
    "int8dyn": Precision(
        "int8dyn", "8-bit weights per column, activations quantised each pass (DynamicQuantizeMatMul): the fast "
        "CPU form for a fused one-step pass's 2B rows; SmoothQuant-style channel scaling from calibration images",
        converter="echo_export.int8_dynamic:build_int8dyn", converts_from_stored_dtype=True,
        needs_calibration=True,  # the smoothing's activation maxima (int8dyn.smooth=0: none read)
        follows_int8_mode=True,
        tolerances=Tolerances(min_per_pass_agreement=0.95), tensorrt_form="echo_export.int8_dynamic:int8dyn_for_tensorrt"),
}

NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get(name: str) -> Precision:
    """The entry of `name`; UnknownPrecision naming the choices otherwise."""
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise UnknownPrecision(f"unknown precision {name or '(none)'}; choose from {', '.join(NAMES)}") from None


def parse_list(text: str | Iterable[str]) -> list[str]:
    """'fp32,int4' (or a list) -> registry names in registry order, each once; fp32 is always
    included (every other precision is converted from the fp32 graphs)."""
    items = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not items:
        raise UnknownPrecision(f"no precision given; choose from {', '.join(NAMES)}")
    for p in items:
        get(p)
    return [p for p in NAMES if p in set(items) | {"fp32"}]


def stored_dtype_names() -> tuple[str, ...]:
    """Precisions a build can make from the checkpoint's own dtype, with no fp32 graphs."""
    return tuple(p.name for p in PRECISIONS.values() if p.converts_from_stored_dtype)


def shared_names() -> tuple[str, ...]:
    """Precisions whose graphs share one copy of their weights on onnxruntime CPU."""
    return tuple(p.name for p in PRECISIONS.values() if p.shares_weights)
