"""onnxruntime backend: one session per graph, IO bound once to persistent host buffers.

The engine owns every buffer (KV cache included) as a NumPy array. `bind` wraps each one in
an OrtValue that shares its memory (no copy), so a pass is `run_with_iobinding` and nothing
else: the engine updates ids / past_len / cache slots in place between passes and reads
outputs from the arrays the session wrote into.

Weights shared in memory (CPU): every graph of one precision reads weights.<precision>.bin. Given a
`SharedWeights` of that file (runtime/ort_capi.py), the session is made through onnxruntime's C
API so that all sessions of the precision borrow one map of the file and one set of packed MatMul
weights; without it each session holds its own packed copy (onnxruntime's default).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import EchoRuntimeError

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
           "tensor(int32)": np.int32}


def ort_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


class OrtGraph:
    """One ONNX graph with bound host buffers; `run()` returns the seconds spent inside the session."""

    def __init__(self, path: str | Path, threads: Optional[int] = None, providers: Optional[list[str]] = None,
                 shared_weights=None, spin: bool = True) -> None:
        """spin=False: the session's threads sleep as soon as a run ends (onnxruntime's default keeps
        them spinning a while for the next run): for a graph run once per report (a prefill), whose
        spinning threads would otherwise take the cores from the step graph that runs right after."""
        import onnxruntime as ort

        self.path = Path(path)
        self.providers = providers or ort_providers()
        self._binding = None
        self._keep: list = []
        self._capi = None
        if shared_weights is not None and self.providers == ["CPUExecutionProvider"]:
            from .ort_capi import CapiSession

            try:
                self._capi = CapiSession(self.path, shared_weights, threads, spin)
            except EchoRuntimeError as e:
                raise EchoRuntimeError(f"{self.path}: onnxruntime cannot load this graph ({e})") from None
            self.session = None
            self.inputs, self.outputs = self._capi.inputs, self._capi.outputs
            self._on_device = False
            return
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if not spin:
            from .ort_capi import NO_SPINNING

            so.add_session_config_entry(*NO_SPINNING)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=self.providers)
        except Exception as e:
            raise EchoRuntimeError(f"{self.path}: onnxruntime cannot load this graph ({type(e).__name__}: {e})") from None
        self.inputs = {i.name: (tuple(i.shape), ORT_DTYPES.get(i.type, None)) for i in self.session.get_inputs()}
        self.outputs = {o.name: (tuple(o.shape), ORT_DTYPES.get(o.type, None)) for o in self.session.get_outputs()}
        self._on_device = self.session.get_providers()[0] != "CPUExecutionProvider"

    def shape(self, name: str) -> tuple:
        return (self.inputs.get(name) or self.outputs[name])[0]

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Bind persistent C-contiguous host arrays; they must stay alive and keep their memory."""
        import onnxruntime as ort

        missing = (set(self.inputs) - set(inputs)) | (set(self.outputs) - set(outputs))
        if missing:
            raise EchoRuntimeError(f"{self.path}: graph expects tensors {sorted(missing)} that the runtime does not provide")
        io = self.session.io_binding() if self._capi is None else None
        keep, used = [], ({}, {})
        for k, (group, bind) in enumerate(((inputs, io and io.bind_ortvalue_input), (outputs, io and io.bind_ortvalue_output))):
            for name, arr in group.items():
                if name not in self.inputs and name not in self.outputs:
                    continue
                if not arr.flags.c_contiguous:
                    raise EchoRuntimeError(f"buffer {name} must be C-contiguous")
                shape, dtype = self.inputs.get(name) or self.outputs[name]
                fixed = all(isinstance(n, int) for n in shape)
                if (fixed and tuple(arr.shape) != shape) or (dtype is not None and arr.dtype != dtype):
                    # e.g. a manifest whose block size, batch or capacity is not the graph's
                    want = np.dtype(dtype).name if dtype is not None else ""
                    raise EchoRuntimeError(f"{self.path}: {name} is {want}{list(shape)} in the graph, "
                                           f"the runtime made {arr.dtype.name}{list(arr.shape)} from the manifest")
                used[k][name] = arr
                if io is not None:
                    ov = ort.OrtValue.ortvalue_from_numpy(arr)  # CPU: shares the array's memory
                    bind(name, ov)
                    keep.append((ov, arr))
        if self._capi is not None:
            self._capi.bind(*used)  # OrtValues over the same arrays
            keep = self._capi.kept
        self._binding, self._keep = io, keep
        self._arrays = {**inputs, **outputs}

    def bound(self, name: str) -> np.ndarray:
        """The host array bound to input or output `name` (bind)."""
        return self._arrays[name]

    def kv_store(self, cache_name: str, src: "OrtGraph", src_name: str, start: int) -> None:
        """Copy src's output [L,b,kvH,n,dh] into this graph's cache input at slots [start, start+n)."""
        s = src._arrays[src_name]
        self._arrays[cache_name][:, :, :, start : start + s.shape[3]] = s

    def run(self) -> float:
        t = time.perf_counter()
        if self._capi is not None:
            self._capi.run()
            return time.perf_counter() - t
        self.session.run_with_iobinding(self._binding)
        if self._on_device:
            self._binding.synchronize_outputs()
        return time.perf_counter() - t
