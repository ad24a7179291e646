"""What machine and libraries a benchmark ran on, and peak memory without psutil (/proc)."""
from __future__ import annotations

import os
import platform
import resource
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Optional

from echo_export.phase_meter import reset_peak_rss  # noqa: F401  (one implementation, used and re-exported here)

LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "transformers", "numpy", "tokenizers", "onnx", "tensorrt")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def gpu_info() -> Optional[dict]:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                    "count": torch.cuda.device_count()}
    except Exception:
        pass
    return None


def machine_info() -> dict:
    from runtime.cpu_features import detect_cpu_features

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        # which int8 kernels onnxruntime runs here (VNNI or saturating AVX2): int8 results depend on it
        "cpu_features": detect_cpu_features().to_dict(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "gpu": gpu_info(),
        "libraries": library_versions(),
    }


# ----------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) since the last reset, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB, lifetime peak


class PeakMemory:
    """Peak RSS (and CUDA max_memory_allocated) over a `with` block."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.rss_mb: Optional[float] = None
        self.cuda_mb: Optional[float] = None
        self.rss_scope = "cell"

    def __enter__(self) -> "PeakMemory":
        if not reset_peak_rss():
            self.rss_scope = "process"  # could not reset: lifetime peak so far
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        self.rss_mb = round(peak_rss_mb(), 1)
        if self.cuda:
            import torch

            self.cuda_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def status_mb(key: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM, ...) in MiB; NaN where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
