"""TensorRT backend: a `.plan` engine next to each ONNX graph, run with execute_async_v3.

Imported lazily: only `backend="trt"` touches tensorrt and cuda-python (the [trt] extra).
Same interface as OrtGraph: bind persistent host buffers once, `run()` copies the small
inputs to the device, executes, copies `tokens`/`confidence` back and returns the seconds
spent in that. The KV cache stays on the device: `past_key`/`past_value` are never copied
from the host after `bind` zeroes them, `present_*` never come back, and `kv_store` moves
a graph's present KV into the cache slots with one strided device-to-device copy.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EchoRuntimeError

RESIDENT_INPUTS = ("past_key", "past_value")  # live on the device; the host arrays are not read
DEVICE_OUTPUTS = ("present_key", "present_value")  # only ever copied device-to-device
_EXTRA = "the TensorRT backend needs the [trt] extra (pip install 'echo-cxr[trt]': tensorrt, cuda-python) and an NVIDIA GPU"


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cudart), or an EchoRuntimeError naming the [trt] extra."""
    try:
        import tensorrt as trt
    except Exception as e:
        raise EchoRuntimeError(f"{_EXTRA}; tensorrt is not importable ({type(e).__name__}: {e})") from None
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
    except Exception as e:
        raise EchoRuntimeError(f"{_EXTRA}; cuda-python is not importable ({type(e).__name__}: {e})") from None
    return trt, cudart


def trt_available() -> tuple[bool, str]:
    """(True, "") when the TensorRT backend can run here, else (False, why)."""
    try:
        _, cudart = import_tensorrt()
        err, n = cudart.cudaGetDeviceCount()
        if int(err) != 0 or n < 1:
            return False, "no CUDA device"
        return True, ""
    except EchoRuntimeError as e:
        return False, str(e)


def _check(ret):
    err = ret[0] if isinstance(ret, tuple) else ret
    if int(err) != 0:
        raise EchoRuntimeError(f"CUDA call failed: {err}")
    return ret[1] if isinstance(ret, tuple) and len(ret) == 2 else ret


def plan_path(onnx_path: str | Path) -> Path:
    p = Path(onnx_path)
    return p.with_suffix(".plan")


def plan_source(onnx_path: str | Path) -> Path:
    """The ONNX graph a plan was built from: an int8 graph's TensorRT form
    (block_step.int8.b1.tensorrt.onnx) when there is one, else the graph itself."""
    p = Path(onnx_path)
    trt_form = p.with_name(p.stem + ".tensorrt.onnx")
    return trt_form if trt_form.is_file() else p


def load_engine(trt, logger, plan: Path, onnx_source: Path) -> tuple:
    """Deserialize a plan; a weight-stripped (refittable) one is refitted from the ONNX graph it
    was built from, whose weights live in the folder's weights.<precision>.bin. Returns
    (engine, runtime)."""
    rt = trt.Runtime(logger)
    engine = rt.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise EchoRuntimeError(f"{plan}: TensorRT could not deserialize the engine (built with another version or GPU?)")
    if getattr(engine, "refittable", False):
        refitter = trt.Refitter(engine, logger)
        parser = trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx_source)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EchoRuntimeError(f"{plan}: cannot refit its weights from {onnx_source.name}: {errors[:3]}")
        if not refitter.refit_cuda_engine():
            missing = refitter.get_missing_weights()
            raise EchoRuntimeError(f"{plan}: refit from {onnx_source.name} left weights missing: {list(missing)[:5]}")
    return engine, rt  # the caller keeps the runtime alive as long as the engine


class TrtGraph:
    def __init__(self, onnx_path: str | Path, threads=None, providers=None) -> None:
        self.trt, self.cudart = import_tensorrt()
        trt, cudart = self.trt, self.cudart
        self.path = plan_path(onnx_path)
        if not self.path.is_file():
            raise EchoRuntimeError(f"{self.path}: no TensorRT engine; build it with echo-export on this GPU")
        self._logger = trt.Logger(trt.Logger.ERROR)
        self.engine, self._rt = load_engine(trt, self._logger, self.path, plan_source(onnx_path))
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.inputs, self.outputs = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            is_in = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_in else self.outputs)[name] = (shape, dtype)
        self._dev: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}

    def shape(self, name: str) -> tuple:
        return (self.inputs.get(name) or self.outputs[name])[0]

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        cudart = self.cudart
        for ptr in self._dev.values():
            cudart.cudaFree(ptr)
        self._dev, self._host = {}, {}
        for name in list(self.inputs) + list(self.outputs):
            group = inputs if name in self.inputs else outputs
            if name not in group:
                raise EchoRuntimeError(f"{self.path}: engine expects tensor {name!r} that the runtime does not provide")
            arr = group[name]
            shape, dtype = (self.inputs.get(name) or self.outputs[name])
            fixed = all(isinstance(n, int) and n >= 0 for n in shape)
            if (fixed and tuple(arr.shape) != shape) or arr.dtype != dtype or not arr.flags.c_contiguous:
                raise EchoRuntimeError(f"{self.path}: {name} is {dtype.name}{list(shape)} in the engine, the runtime "
                                       f"made {arr.dtype.name}{list(arr.shape)} (C-contiguous: {arr.flags.c_contiguous})")
            ptr = _check(cudart.cudaMalloc(max(arr.nbytes, 1)))
            self._dev[name], self._host[name] = ptr, arr
            if name in RESIDENT_INPUTS:  # masked slots are multiplied by zero weights: keep them finite
                _check(cudart.cudaMemset(ptr, 0, arr.nbytes))
            if name in self.inputs:
                self.context.set_input_shape(name, arr.shape)
            self.context.set_tensor_address(name, int(ptr))

    def run(self) -> float:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        t = time.perf_counter()
        for name in self.inputs:
            if name in RESIDENT_INPUTS:
                continue
            a = self._host[name]
            _check(cudart.cudaMemcpyAsync(self._dev[name], a.ctypes.data, a.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise EchoRuntimeError(f"{self.path}: TensorRT execution failed")
        for name in self.outputs:
            if name in DEVICE_OUTPUTS:
                continue
            a = self._host[name]
            _check(cudart.cudaMemcpyAsync(a.ctypes.data, self._dev[name], a.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return time.perf_counter() - t

    def kv_store(self, cache_name: str, src: "TrtGraph", src_name: str, start: int) -> None:
        """Copy src's device output [L,b,kvH,n,dh] into this graph's device cache at slots [start, start+n)."""
        cudart = self.cudart
        dst, s = self._host[cache_name], src._host[src_name]
        L, b, h, cap, dh = dst.shape
        n, item = s.shape[3], dst.itemsize
        _check(cudart.cudaMemcpy2DAsync(
            self._dev[cache_name] + start * dh * item, cap * dh * item,  # dst, its row pitch
            src._dev[src_name], n * dh * item,  # src, its row pitch
            n * dh * item, L * b * h,  # bytes per row, rows
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))  # ordered before the next run()

    def __del__(self) -> None:
        try:
            for ptr in self._dev.values():
                self.cudart.cudaFree(ptr)
            self.cudart.cudaStreamDestroy(self.stream)
        except Exception:
            pass
