"""What a build will hold in memory, estimated from the checkpoint's header before anything heavy.

A 7B checkpoint (8.29B parameters, 16.6 GB in bf16) built through fp32 needs 33 GB for the model
alone; on a 24 GB machine the kernel killed that build during its input checks with no message
(issue 30; docs/results.md, "Measured in code's stead"). So the build reads the safetensors header
(parameter count, stored dtype, the largest tensor), estimates each phase's peak, compares it with
MemAvailable, and refuses with the table and what would fit. The figures are estimates (about 10%
above what a 0.5B-3B build measured for the weights; activations and KV caches are small beside
them at batch 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from runtime import precisions as precision_registry

GB = 1e9
# bytes per parameter of each precision's weights file (int8/int4: about, with the embedding and
# the layers they keep wider: measured 0.5B folders, echo_export/precision.py and int4.py)
WEIGHT_BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.3, "int4": 0.75, "int8w": 1.3, "int8dyn": 1.3}
HEADROOM = 1.0 * GB  # left for the interpreter, onnxruntime's arenas and the page cache's working set


def mem_available() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class MemoryPlan:
    """Each phase's estimated peak (bytes), and which precisions' verification sessions fit."""
    n_params: int
    stored_bytes: int
    stored_dtype: str
    largest: int = 0  # parameters of the largest tensor (the embedding, at real size)
    phases: dict[str, int] = field(default_factory=dict)
    verify: list[str] = field(default_factory=list)
    not_verified: dict[str, str] = field(default_factory=dict)
    available: Optional[int] = None
    # the weights a build from the stored dtype maps rather than copies: page cache, not in `phases`
    mapped_bytes: int = 0

    def peak(self) -> int:
        return max(self.phases.values(), default=0)

    def lines(self) -> list[str]:
        out = [f"  {name:<10} {b / GB:6.1f} GB" for name, b in self.phases.items()]
        if self.mapped_bytes:
            out.append(f"  mapped     {self.mapped_bytes / GB:6.1f} GB of weights: file pages, read when used and "
                       "dropped by the kernel when memory is short (not counted above)")
            heavy = max((v for k, v in self.phases.items() if not k.startswith("verify")), default=0)
            room = None if self.available is None else self.available - HEADROOM - heavy
            if room is not None and room < self.mapped_bytes:
                out.append(f"             only {max(room, 0) / GB:.1f} GB of them stay cached beside the phases: "
                           "the rest is read from disk again as each pass needs it (slower, not failing)")
        if self.available is not None:
            out.append(f"  available  {self.available / GB:6.1f} GB (MemAvailable; {HEADROOM / GB:.0f} GB of it kept as headroom)")
        return out

    def to_dict(self) -> dict:
        return {"n_params": self.n_params, "stored_bytes": self.stored_bytes, "stored_dtype": self.stored_dtype,
                "phases_bytes": dict(self.phases), "peak_bytes": self.peak(), "available_bytes": self.available,
                "mapped_bytes": self.mapped_bytes,
                "verify": list(self.verify), "not_verified": dict(self.not_verified)}


INT4_BYTES_PER_PARAM = 0.5 + 4 / 32  # a nibble and, per block of 32, one fp32 scale (the default)


def int4_weight_bytes(ckpt: Path) -> int:
    """About weights.int4.bin with the default options: the decoder's linear layers in int4, the
    rest (embedding, output head, norms, the vision tower) fp32 as the int4 graphs keep them."""
    from echo_train.model.safetensors_stream import read_header

    total = 0.0
    for name, e in read_header(Path(ckpt) / "model.safetensors").items():
        decoder_linear = name.startswith("lm.model.layers.") and len(e.shape) == 2
        total += e.numel * (INT4_BYTES_PER_PARAM if decoder_linear else 4.0)
    return int(total)


def _header_facts(ckpt: Path) -> tuple[int, int, str, int]:
    """(parameters, stored bytes, stored dtype, largest tensor's parameters) of model.safetensors."""
    from echo_train.model.checkpoint import checkpoint_dtype
    from echo_train.model.safetensors_stream import read_header

    entries = read_header(Path(ckpt) / "model.safetensors").values()
    n = sum(e.numel for e in entries)
    return n, sum(e.nbytes for e in entries), str(checkpoint_dtype(ckpt)).replace("torch.", ""), \
        max((e.numel for e in entries), default=0)


def plan_build(ckpt: Path, precisions: list[str], stream: bool, verify: bool) -> MemoryPlan:
    """The phases' peaks: the model as loaded (fp32, or when `stream` its stored dtype, mapped from
    the file: `mapped_bytes`, page cache outside the phases), the export (the model + one tensor
    widened to fp32 + its fp16 copy), the reference decodes (the model + one module widened), and
    verification: each precision's onnxruntime sessions (the registry's cpu_session_bytes, two
    sessions) with no PyTorch model left."""
    n, stored, dtype, largest = _header_facts(ckpt)
    plan = MemoryPlan(n, stored, dtype, largest, available=mem_available(), mapped_bytes=stored if stream else 0)
    model = 0 if stream else 4 * n
    if stream:  # what is not mapped: buffers, the exporter's graph, the interpreter's own
        plan.phases["load"] = int(0.05 * stored)
    one = 2 * largest + 4 * min(largest, 1 << 20)  # a tensor's fp16 conversion, widened a chunk at a time
    base = int(model * 1.05) if not stream else plan.phases["load"]
    plan.phases["load"] = base
    plan.phases["export"] = base + one
    # the reference widens one module at a time, the largest being the lm_head (4 bytes a parameter);
    # not counted: activations (a long native prefill at 7B widths adds GBs: docs/results.md)
    plan.phases["reference"] = base + 4 * largest
    room = None if plan.available is None else plan.available - HEADROOM
    if stream and "int4" in precisions:
        # the fp32 tables int4 keeps (embedding, head) widened whole, the one being stored, AWQ's
        # activation rows and the allocator's fragments of a graph's quantised weights: about four
        # times the largest table widened, from the anonymous memory of the 1.5B and 3B (AWQ) and 7B
        # (RTN) int4 builds (benchmarks/results/scale/int4/, qwen2.5-vl-7b/ar/)
        plan.phases["int4"] = base + 4 * 4 * largest
    for p in precisions:
        weights = int4_weight_bytes(ckpt) if p == "int4" else int(WEIGHT_BYTES_PER_PARAM[p] * n)
        need = precision_registry.get(p).cpu_session_bytes(weights, sessions=2)
        if not verify:
            continue
        if room is not None and need > room:
            plan.not_verified[p] = (f"its onnxruntime CPU sessions need about {need / GB:.1f} GB, "
                                    f"{room / GB:.1f} GB available")
        else:
            plan.verify.append(p)
            plan.phases[f"verify {p}"] = need
    return plan


def refusal(plan: MemoryPlan, precisions: list[str], stream: bool) -> Optional[str]:
    """Why the build cannot fit (with the estimate and what would), or None when it fits."""
    if plan.available is None:
        return None
    room = plan.available - HEADROOM
    heavy = {k: v for k, v in plan.phases.items() if not k.startswith("verify")}
    if max(heavy.values()) <= room:
        return None
    fits = []
    if not stream:  # from the stored dtype: the weights mapped, one tensor widened at a time
        need = int(plan.stored_bytes * 0.05 + 2 * plan.largest)
        if need <= room:
            fits.append(f"--precision fp16 (built from the {plan.stored_dtype} weights, mapped, without fp32: "
                        f"about {need / GB:.1f} GB besides the page cache)")
            if int(plan.stored_bytes * 0.05 + 4 * plan.largest) <= room:
                fits.append("--precision fp16,int4 or int4 (the same, int4 verifiable on this CPU)")
    if not fits:
        fits.append(f"nothing on this machine now: free memory first (the model alone is "
                    f"{plan.stored_bytes / GB:.1f} GB in {plan.stored_dtype})")
    return (f"this build needs about {max(heavy.values()) / GB:.1f} GB ({plan.n_params / 1e9:.2f}B parameters, "
            f"stored {plan.stored_dtype}; precisions {','.join(precisions)}), and "
            f"{room / GB:.1f} GB is available:\n" + "\n".join(plan.lines()) + "\nwhat would fit: " + "; ".join(fits))
