"""Which int8 kernels onnxruntime's CPU provider (MLAS) will pick on this CPU.

An int8 MatMul of uint8 activations and int8 weights runs on x86 as:
- VNNI (AVX512-VNNI or AVX-VNNI): `vpdpbusd` multiplies u8 x s8 and adds four products into
  int32 — exact.
- AVX2 without VNNI: `vpmaddubsw` adds PAIRS of u8 x s8 products into int16 and saturates at
  32767. Two products of 255 x 127 reach 64770, so full-range 8-bit weights overflow and the
  result is wrong (this is why onnxruntime's quantiser has `reduce_range`: 7-bit weights keep
  255 x 63 x 2 = 32130 below the limit).
So an int8 graph is chosen for a CPU kind, and an engine built for VNNI is less accurate on a
CPU without it. `echo-export build` records the kind in manifest.json; the runtime warns on a
mismatch.

Detection reads the CPUID bits through numpy's runtime dispatcher (the same instruction MLAS
executes, so it is right under an emulator as well); AVX-VNNI (the 256-bit form on hybrid Intel
cores) is not in numpy's table and is read from /proc/cpuinfo.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

VNNI = "vnni"  # exact u8 x s8 dot products
AVX2_NO_VNNI = "avx2-no-vnni"  # saturating 16-bit pair sums
OTHER = "other"  # no AVX2 (or not x86): MLAS runs its portable kernels
INT8_CPU_KINDS = (VNNI, AVX2_NO_VNNI, OTHER)

# int8 quantisation modes of `echo-export build`, named <activations><weights>:
#   u8s8: uint8 asymmetric activations x 8-bit weights: exact on VNNI, saturates without it.
#   u8s7: the same with 7-bit weights (onnxruntime's reduce_range): cannot saturate on AVX2,
#         and computes the same numbers on both kinds of CPU.
#   s8s8: symmetric int8 activations x 8-bit weights, the form TensorRT takes natively. On x86
#         onnxruntime runs s8 activations as u8 shifted by 128 (session option
#         session.qdqisint8allowed off), so it saturates on AVX2 just like u8s8.
INT8_MODES = ("u8s8", "u8s7", "s8s8")
INT8_AUTO = "auto"
INT8_MODE_FOR_KIND = {VNNI: "u8s8", AVX2_NO_VNNI: "u8s7", OTHER: "u8s8"}


def int8_mode_target(mode: str) -> str:
    """The CPU kind an int8 mode is made for: only u8s7 is safe without VNNI."""
    return AVX2_NO_VNNI if mode == "u8s7" else VNNI


@dataclass(frozen=True)
class CpuFeatures:
    machine: str
    avx2: bool
    avx512f: bool
    avx512_vnni: bool
    avx_vnni: bool
    avx512_bf16: bool

    @property
    def int8_kind(self) -> str:
        if self.avx512_vnni or self.avx_vnni:
            return VNNI
        if self.avx2:
            return AVX2_NO_VNNI
        return OTHER

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "int8_kind": self.int8_kind}


def _proc_cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_cpu_features() -> CpuFeatures:
    """The int8-relevant instruction sets of the CPU this process runs on."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    avx2 = bool(feats.get("AVX2"))
    return CpuFeatures(
        machine=platform.machine(),
        avx2=avx2,
        avx512f=bool(feats.get("AVX512F")),
        avx512_vnni=bool(feats.get("AVX512VNNI")),
        # only trust the kernel's flag where CPUID agrees the AVX2 family is there
        avx_vnni=avx2 and "avx_vnni" in _proc_cpuinfo_flags(),
        avx512_bf16=bool(feats.get("AVX512BF16")),
    )


def int8_cpu_mismatch(built_for: Optional[str], here: Optional[CpuFeatures] = None) -> Optional[str]:
    """A warning when an int8 engine chosen for one CPU kind runs on another; None when they fit."""
    if not built_for:
        return None
    kind = (here or detect_cpu_features()).int8_kind
    if built_for == kind or OTHER in (built_for, kind):
        return None
    if built_for == VNNI:
        return ("this int8 engine was quantised for a CPU with VNNI (8-bit weights); this CPU has AVX2 without "
                "VNNI, where onnxruntime's int8 kernels saturate and the output drifts from fp32. Rebuild it here "
                "(echo-export build --int8-mode auto) or use the fp32 engine.")
    return ("this int8 engine was quantised for a CPU without VNNI; this CPU has VNNI, so an engine rebuilt here "
            "(echo-export build --int8-mode auto) would use full 8-bit weights and be closer to fp32.")
