"""Wall time and peak resident memory of each build phase, for the build summary.

Real-size exports are bounded by memory as much as by time (a 0.5B model's fp32 weights are
2.3 GB, and each phase may hold several forms of them), so the summary says which phase peaked.
On Linux the peak is reset at the start of each phase (writing 5 to /proc/self/clear_refs
resets VmHWM), so each phase gets its own peak; elsewhere every phase reports the process peak
so far (`per_phase` is False).
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_peak_bytes() -> int:
    """The process's peak resident set since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@dataclass
class PhaseRecord:
    seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclass
class PhaseMeter:
    phases: dict[str, PhaseRecord] = field(default_factory=dict)
    per_phase: bool = True

    _open: Optional[tuple[str, float]] = None

    @property
    def current(self) -> Optional[str]:
        """The phase running now, if any."""
        return self._open[0] if self._open else None

    def start(self, name: str) -> None:
        self.per_phase = reset_peak_rss() and self.per_phase
        self._open = (name, time.perf_counter())

    def stop(self) -> None:
        """End the phase begun by `start`; a phase run twice adds up its time (peak: the larger)."""
        if self._open is None:
            return
        name, t = self._open
        self._open = None
        rec = self.phases.setdefault(name, PhaseRecord())
        rec.seconds += time.perf_counter() - t
        hwm = _status_kib("VmHWM") if self.per_phase else None
        rec.peak_rss_bytes = max(rec.peak_rss_bytes, hwm * 1024 if hwm is not None else process_peak_bytes())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block and record its peak RSS."""
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def lines(self, total_s: float) -> list[str]:
        gib = 1024 ** 3
        out = [f"  {'phase':<10} {'seconds':>8} {'peak RSS':>10}"]
        out += [f"  {k:<10} {r.seconds:8.1f} {r.peak_rss_bytes / gib:8.2f} GiB" for k, r in self.phases.items()]
        out.append(f"  {'total':<10} {total_s:8.1f} {self.peak_bytes() / gib:8.2f} GiB"
                   + ("" if self.per_phase else "  (peaks are the process peak so far)"))
        return out

    def peak_bytes(self) -> int:
        """The whole run's peak RSS: the largest phase peak (each phase resets the kernel's high-water
        mark, and ru_maxrss with it, so the process peak read at the end is only the last phase's)."""
        return max([process_peak_bytes(), *(r.peak_rss_bytes for r in self.phases.values())])

    def to_dict(self) -> dict:
        return {k: {"seconds": round(r.seconds, 2), "peak_rss_bytes": r.peak_rss_bytes} for k, r in self.phases.items()}
