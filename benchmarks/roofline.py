"""The memory-bandwidth roofline of a decode pass: the bytes a pass must read / what this machine
can stream, beside the measured pass time.

A pass of a decoder reads every weight once (a 7B model: ~4 GB in int4) and the KV cache up to
the current position; at batch 1 and a few tokens per pass a CPU cannot do that faster than its
memory streams, so `bytes / bandwidth` is the fastest a pass can possibly be. How close t(pass)
comes to it says whether kernels or memory limit the engine; where a pass is far above it, the
arithmetic is the limit (a 2-core CPU on a 16-token pass is compute-bound long before that).

Bandwidth: STREAM's copy kernel (numpy, `threads` threads over slices of two arrays of
`mib` MiB each, several times the last-level cache), counted as STREAM counts it: bytes read +
bytes written. Weight bytes: the step graph's initializers as stored (external data lengths),
except a table only a Gather reads (the token embedding: a pass reads the rows of its tokens,
not the table).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np


def stream_copy_bandwidth(threads: int = 2, mib: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` STREAM copy bandwidth in bytes/s (read + write) with `threads` threads."""
    n = mib * (1 << 20) // 8
    src = np.ones(n, np.float64)
    dst = np.zeros(n, np.float64)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(lambda p: np.copyto(*p), parts))  # numpy releases the GIL for the copy
            best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def _initializer_bytes(t) -> int:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        return int(info["length"])
    return len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes


def pass_weight_bytes(graph: str | Path, tokens: int) -> dict:
    """Bytes of weights one run of `graph` reads: every initializer, except that a table read only
    by Gather nodes (the embedding) counts `tokens` rows of itself."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, set()).add(node.op_type)
    total = gathered = 0
    for t in model.graph.initializer:
        n = _initializer_bytes(t)
        if readers.get(t.name) == {"Gather"} and len(t.dims) == 2:
            row = n // max(1, t.dims[0])
            gathered += n
            n = min(n, tokens * row)
        total += n
    return {"bytes": int(total), "gather_tables_bytes": int(gathered)}


def kv_read_bytes(n_layers: int, n_kv_heads: int, head_dim: int, cache_len: int, itemsize: int = 4) -> int:
    """Keys and values a pass reads from a cache filled to `cache_len` (fp32 cache: 4 bytes)."""
    return 2 * n_layers * n_kv_heads * head_dim * cache_len * itemsize


def roofline(weight_bytes: int, kv_bytes: int, bandwidth: float, measured_s: Optional[float]) -> dict:
    """The roofline time of a pass and, with a measured time, how far above it the pass runs."""
    roof = (weight_bytes + kv_bytes) / bandwidth
    out = {"bytes_per_pass": int(weight_bytes + kv_bytes), "roofline_s": roof}
    if measured_s:
        out["measured_s"] = measured_s
        out["measured_over_roofline"] = measured_s / roof
    return out
