"""Timing that survives a busy machine: candidates timed round-robin, medians compared.

Used by `echo-export build` (int8 vs fp32 block step) and by the benchmark's ideal speed-up.
"""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, repeats: int, warmup: int = 5, timer=None) -> dict:
    """Median seconds of each fn, timed round-robin so that drift (other processes, clocks) hits all alike.

    `timer(fn)` returns the seconds of one call (default: wall time around it).
    """
    def wall(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    timer = timer or wall
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            ts[k].append(timer(fn))
    return {k: statistics.median(v) for k, v in ts.items()}
