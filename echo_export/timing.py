"""Timing that survives a busy machine and matches how decode loops call a graph.

Used by `echo-export build` (int8 vs fp32 block step) and by the benchmark's ideal speed-up.

A decode loop calls ONE graph many times in a row (AR: ar_step per token; one-step: block_step
per block), so its weights and buffers stay in the CPU caches. Timing candidates strictly one
call each in turn evicts them between calls and slows the smaller graph most, by more than the
AR loop's own wall time per step on the demo model (docs/results.md, "Measured in code's stead").
So each candidate is timed in runs
of `run_length` consecutive calls, and the runs alternate between candidates (the order
flipping every round) so that drift (other processes, clock changes) still hits all alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional


def alternating_run_medians(fns: dict, repeats: int, warmup: int = 5, timer: Optional[Callable] = None,
                            run_length: int = 25) -> dict:
    """Median seconds of one call of each fn over `repeats` timed calls per fn.

    Calls come in runs of `run_length` back-to-back calls of one fn, each run after `warmup`
    untimed calls of it; the runs alternate between fns, round after round. `run_length=1`
    is plain round-robin. `timer(fn)` returns the seconds of one call (default: wall time).
    """
    def wall(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    timer = timer or wall
    run_length = max(1, min(run_length, repeats))
    keys = list(fns)
    ts: dict = {k: [] for k in keys}
    rnd = 0
    while any(len(v) < repeats for v in ts.values()):
        for k in (keys if rnd % 2 == 0 else keys[::-1]):
            fn = fns[k]
            for _ in range(warmup):
                fn()
            n = min(run_length, repeats - len(ts[k]))
            ts[k].extend(timer(fn) for _ in range(n))
        rnd += 1
    return {k: statistics.median(v) for k, v in ts.items()}
