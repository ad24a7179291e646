"""onnxruntime sessions that share one copy of their weights, through onnxruntime's C API.

Why the C API: on the CPU, onnxruntime copies every constant MatMul weight into its own blocked
layout when a session starts ("prepacking"), so two sessions that read the same weights file each
hold a private packed copy (the decoder twice for vision_prefill + block_step). Turning prepacking
off keeps one copy but makes the block step much slower (docs/runtime.md). onnxruntime shares packed weights between
sessions only for initializers handed in with AddInitializer and a PrepackedWeightsContainer given
to CreateSessionWithPrepackedWeightsContainer; the Python bindings expose neither the container
nor that call, so this module calls the C library that ships inside the onnxruntime wheel
(capi/libonnxruntime.so*) with ctypes. Measured numbers: docs/runtime.md.

What is shared: each initializer of at least a page that the graph stores in
weights.<precision>.bin and that only MatMul / Gemm (as B), Gather (as the table) or
DequantizeLinear (an int8 weight) read. They are views of one read-only map of
the file (the same OrtValue for every session of the process), and their packed forms live in one
container. Initializers that other nodes read are left to onnxruntime (its graph optimisers may
rewrite them, and a shared initializer must stay as stored). After each session starts, the map's
pages are released (MADV_DONTNEED): packed weights are read from the container; rows of an
embedding table come back from the page cache when a Gather reads them.

The graph's initializer list is read from the ONNX file with a small protobuf reader below: the
runtime does not need the `onnx` package.
"""
from __future__ import annotations

import ctypes as C
import glob
import mmap
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import EchoRuntimeError

API_VERSION = 13  # the C API functions used here all exist since onnxruntime 1.10
SHARE_MIN_BYTES = 4096  # smaller initializers are left to onnxruntime (a page: nothing to share)
# (consumer op, input index) of a shareable initializer: a MatMul / Gemm weight, an embedding table, an
# int8 weight (its DequantizeLinear is fused into onnxruntime's int8 MatMul, which packs the weight)
SHAREABLE = {("MatMul", 1), ("Gemm", 1), ("Gather", 0), ("DequantizeLinear", 0),
             ("MatMulNBits", 1), ("MatMulNBits", 2), ("MatMulNBits", 3)}  # int4: packed weights, scales, zero points

# ---- a minimal ONNX protobuf reader: initializers and their consumers -------------------------
_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16}


def _varint(b: memoryview, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _fields(b: memoryview, i: int = 0, end: Optional[int] = None):
    """(field number, wire type, value) of one message; value is (start, end) for bytes fields."""
    end = len(b) if end is None else end
    while i < end:
        key, i = _varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
            yield f, wt, v
        elif wt == 2:
            n, i = _varint(b, i)
            yield f, wt, (i, i + n)
            i += n
        elif wt in (1, 5):
            i += 8 if wt == 1 else 4
            yield f, wt, None
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


def _str(b: memoryview, span: tuple[int, int]) -> str:
    return bytes(b[span[0]:span[1]]).decode()


def external_initializers(path: str | Path) -> list[dict]:
    """The top-level graph's initializers stored outside the file: name, dtype, dims, location,
    offset, length, and the (op, input index) of every node that reads them."""
    b = memoryview(Path(path).read_bytes())
    inits, readers = [], {}
    for f, wt, graph in _fields(b):
        if f != 7 or wt != 2:  # ModelProto.graph
            continue
        for gf, gwt, span in _fields(b, *graph):
            if gf == 1 and gwt == 2:  # GraphProto.node
                op, ins = _node_inputs(b, span)
                for k, name in enumerate(ins):
                    readers.setdefault(name, set()).add((op, k))
            elif gf == 5 and gwt == 2:  # GraphProto.initializer (TensorProto)
                t = _tensor_proto(b, span)
                if t["location"] == 1:
                    inits.append(t)
    for t in inits:
        t["readers"] = readers.get(t.get("name", ""), set())
        t["offset"] = int(t["external"].get("offset", 0))
        t["length"] = int(t["external"].get("length", -1))
    return inits


def _node_inputs(b: memoryview, span: tuple[int, int]) -> tuple[str, list[str]]:
    """(op type, input names) of a NodeProto."""
    ins, op = [], ""
    for nf, _, nv in _fields(b, *span):
        if nf == 1:
            ins.append(_str(b, nv))
        elif nf == 4:
            op = _str(b, nv)
    return op, ins


def _tensor_proto(b: memoryview, span: tuple[int, int]) -> dict:
    """A TensorProto's dims, dtype, name, external_data entries and data_location (1: external)."""
    t = {"dims": [], "external": {}, "location": 0}
    for tf, twt, tv in _fields(b, *span):
        if tf == 1 and twt == 0:
            t["dims"].append(tv)
        elif tf == 1:  # packed dims
            j, e = tv
            while j < e:
                d, j = _varint(b, j)
                t["dims"].append(d)
        elif tf == 2:
            t["dtype"] = tv
        elif tf == 8:
            t["name"] = _str(b, tv)
        elif tf == 13:  # StringStringEntryProto
            kv = {ef: _str(b, ev) for ef, _, ev in _fields(b, *tv)}
            t["external"][kv.get(1, "")] = kv.get(2, "")
        elif tf == 14:
            t["location"] = tv
    return t


# ---- the C API through ctypes ----------------------------------------------------------------
_P, _S = C.c_void_p, C.c_size_t
_FUNCS = {  # name: (index in OrtApi, restype, argtypes); indices are fixed (the table only grows)
    "GetErrorMessage": (2, C.c_char_p, [_P]),
    "CreateEnv": (3, _P, [C.c_int, C.c_char_p, C.POINTER(_P)]),
    "Run": (9, _P, [_P, _P, C.POINTER(C.c_char_p), C.POINTER(_P), _S, C.POINTER(C.c_char_p), _S, C.POINTER(_P)]),
    "CreateSessionOptions": (10, _P, [C.POINTER(_P)]),
    "SetSessionLogSeverityLevel": (22, _P, [_P, C.c_int]),
    "SetSessionGraphOptimizationLevel": (23, _P, [_P, C.c_int]),
    "SetIntraOpNumThreads": (24, _P, [_P, C.c_int]),
    "SetInterOpNumThreads": (25, _P, [_P, C.c_int]),
    "SessionGetInputCount": (30, _P, [_P, C.POINTER(_S)]),
    "SessionGetOutputCount": (31, _P, [_P, C.POINTER(_S)]),
    "SessionGetInputTypeInfo": (33, _P, [_P, _S, C.POINTER(_P)]),
    "SessionGetOutputTypeInfo": (34, _P, [_P, _S, C.POINTER(_P)]),
    "SessionGetInputName": (36, _P, [_P, _S, _P, C.POINTER(_P)]),
    "SessionGetOutputName": (37, _P, [_P, _S, _P, C.POINTER(_P)]),
    "CreateTensorWithDataAsOrtValue": (49, _P, [_P, _P, _S, C.POINTER(C.c_int64), _S, C.c_int, C.POINTER(_P)]),
    "GetTensorMutableData": (51, _P, [_P, C.POINTER(_P)]),
    "CastTypeInfoToTensorInfo": (55, _P, [_P, C.POINTER(_P)]),
    "GetTensorElementType": (60, _P, [_P, C.POINTER(C.c_int)]),
    "GetDimensionsCount": (61, _P, [_P, C.POINTER(_S)]),
    "GetDimensions": (62, _P, [_P, C.POINTER(C.c_int64), _S]),
    "CreateCpuMemoryInfo": (69, _P, [C.c_int, C.c_int, C.POINTER(_P)]),
    "AllocatorFree": (76, _P, [_P, _P]),
    "GetAllocatorWithDefaultOptions": (78, _P, [C.POINTER(_P)]),
    "ReleaseStatus": (93, None, [_P]),
    "ReleaseSession": (95, None, [_P]),
    "ReleaseValue": (96, None, [_P]),
    "ReleaseTypeInfo": (98, None, [_P]),
    "ReleaseSessionOptions": (100, None, [_P]),
    "ReleasePrepackedWeightsContainer": (167, None, [_P]),
    "AddSessionConfigEntry": (130, _P, [_P, C.c_char_p, C.c_char_p]),
    "AddInitializer": (150, _P, [_P, C.c_char_p, _P]),
    "CreatePrepackedWeightsContainer": (166, _P, [C.POINTER(_P)]),
    "CreateSessionWithPrepackedWeightsContainer": (168, _P, [_P, C.c_char_p, _P, _P, C.POINTER(_P)]),
}
_NP_TO_ORT = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
              np.dtype(np.int64): 7, np.dtype(np.bool_): 9, np.dtype(np.float16): 10}
_ORT_TO_NP = {v: k.type for k, v in _NP_TO_ORT.items()}


class _Api:
    """The C library of the installed onnxruntime wheel, its function table, one env, CPU memory info."""

    def __init__(self) -> None:
        import onnxruntime

        libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
        if not libs:
            raise OSError("this onnxruntime wheel ships no libonnxruntime.so")
        lib = C.CDLL(libs[0])
        lib.OrtGetApiBase.restype = C.POINTER(C.c_void_p * 2)
        base = lib.OrtGetApiBase().contents
        version = C.CFUNCTYPE(C.c_char_p)(base[1])().decode()
        if version != onnxruntime.__version__:
            raise OSError(f"libonnxruntime {version} is not the Python package's {onnxruntime.__version__}")
        table = C.CFUNCTYPE(_P, C.c_uint32)(base[0])(API_VERSION)
        if not table:
            raise OSError(f"onnxruntime {version} does not offer C API version {API_VERSION}")
        ptrs = C.cast(table, C.POINTER(C.c_void_p * 200)).contents
        self.f = {n: C.CFUNCTYPE(r, *a)(ptrs[i]) for n, (i, r, a) in _FUNCS.items()}
        self.lib, self.version = lib, version  # the library stays loaded while its functions are used
        self.env, self.cpu, self.alloc = _P(), _P(), _P()
        self.check(self.f["CreateEnv"](3, b"echo", C.byref(self.env)))  # 3: errors only
        self.check(self.f["CreateCpuMemoryInfo"](0, 0, C.byref(self.cpu)))  # device allocator, default mem type
        self.check(self.f["GetAllocatorWithDefaultOptions"](C.byref(self.alloc)))

    def check(self, status) -> None:
        if status:
            msg = self.f["GetErrorMessage"](status).decode(errors="replace")
            self.f["ReleaseStatus"](status)
            raise EchoRuntimeError(f"onnxruntime: {msg}")

    def value(self, arr: np.ndarray):
        """An OrtValue over arr's memory (no copy); arr must outlive it."""
        if arr.dtype not in _NP_TO_ORT or not arr.flags.c_contiguous:
            raise EchoRuntimeError(f"cannot hand a {arr.dtype} array (contiguous: {arr.flags.c_contiguous}) to onnxruntime")
        shape = (C.c_int64 * max(arr.ndim, 1))(*arr.shape)
        v = _P()
        self.check(self.f["CreateTensorWithDataAsOrtValue"](self.cpu, C.c_void_p(arr.ctypes.data), arr.nbytes, shape,
                                                            arr.ndim, _NP_TO_ORT[arr.dtype], C.byref(v)))
        return v


_API: Optional[_Api] = None
_API_ERROR: Optional[str] = None


def api() -> Optional[_Api]:
    """The C API, or None (with `unavailable()` saying why) where this onnxruntime has no usable C library."""
    global _API, _API_ERROR
    if _API is None and _API_ERROR is None:
        try:
            _API = _Api()
        except (OSError, AttributeError, EchoRuntimeError) as e:
            _API_ERROR = str(e)
    return _API


def unavailable() -> Optional[str]:
    api()
    return _API_ERROR


class _Container:
    """The packed-weights container and the OrtValues lent to sessions, released once both the
    SharedWeights that made them and every session that uses them are gone (onnxruntime requires
    the container to outlive its sessions; finalizers of objects collected together run in any order)."""

    def __init__(self, a: _Api) -> None:
        self.a, self.p, self.values = a, _P(), []
        a.check(a.f["CreatePrepackedWeightsContainer"](C.byref(self.p)))
        self.sessions, self.owner = 0, True

    def session_gone(self) -> None:
        self.sessions -= 1
        self._release_if_done()

    def owner_gone(self) -> None:
        self.owner = False
        self._release_if_done()

    def _release_if_done(self) -> None:
        if self.sessions <= 0 and not self.owner and self.p:
            for v in self.values:
                self.a.f["ReleaseValue"](v)
            self.values = []
            self.a.f["ReleasePrepackedWeightsContainer"](self.p)
            self.p = None


class SharedWeights:
    """One precision's weights file, mapped once, with the OrtValues and the packed-weights
    container that every session of that precision shares. Sessions keep it alive."""

    def __init__(self, path: str | Path) -> None:
        a = api()
        if a is None:
            raise EchoRuntimeError(f"onnxruntime's C API is not usable here: {_API_ERROR}")
        self.path = Path(path)
        try:
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise EchoRuntimeError(f"{path}: cannot map the weights file ({e})") from None
        self._container = _Container(a)
        self.container = self._container.p
        self._values: dict[tuple, tuple] = {}  # (offset, length, dtype, dims) -> (OrtValue, view)

    def __del__(self) -> None:
        c = getattr(self, "_container", None)
        if c is not None:
            c.owner_gone()

    def value(self, offset: int, length: int, dtype: int, dims: list[int]):
        key = (offset, length, dtype, tuple(dims))
        if key not in self._values:
            np_dtype = _ORT_TO_NP.get(dtype)
            if np_dtype is None or offset < 0 or offset + length > self.map.size:
                return None
            view = self.map[offset:offset + length].view(np_dtype).reshape(dims)
            v = api().value(view)
            self._container.values.append(v)
            self._values[key] = (v, view)
        return self._values[key][0]

    def release_pages(self) -> None:
        """Drop the map's pages from this process (they stay in the page cache; a read faults them back)."""
        try:
            self.map._mmap.madvise(mmap.MADV_DONTNEED)  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            pass


class _BoundValue:
    """What the runtime keeps of a bound C OrtValue: `data_ptr()`, the address onnxruntime reads and writes."""

    def __init__(self, a: _Api, v) -> None:
        self._a, self._v = a, v

    def data_ptr(self) -> int:
        p = _P()
        self._a.check(self._a.f["GetTensorMutableData"](self._v, C.byref(p)))
        return int(p.value or 0)


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc): a session start allocates each
    packed weight before it finds the container's copy and frees it, which leaves free heap behind."""
    try:
        C.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# onnxruntime's session config entry that puts the intra-op threads to sleep right after a run
NO_SPINNING = ("session.intra_op.allow_spinning", "0")


class CapiSession:
    """A CPU session made through the C API, its shareable initializers borrowed from `weights`."""

    def __init__(self, path: str | Path, weights: SharedWeights, threads: Optional[int] = None,
                 spin: bool = True) -> None:
        a = api()
        self._a = a
        so = _P()
        a.check(a.f["CreateSessionOptions"](C.byref(so)))
        self.shared_bytes = 0
        try:
            a.check(a.f["SetSessionGraphOptimizationLevel"](so, 99))  # ORT_ENABLE_ALL
            a.check(a.f["SetSessionLogSeverityLevel"](so, 3))
            if threads:
                a.check(a.f["SetIntraOpNumThreads"](so, int(threads)))
                a.check(a.f["SetInterOpNumThreads"](so, 1))
            if not spin:  # ort_backend.OrtGraph's spin
                a.check(a.f["AddSessionConfigEntry"](so, NO_SPINNING[0].encode(), NO_SPINNING[1].encode()))
            try:
                inits = external_initializers(path)
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise EchoRuntimeError(f"unreadable ONNX file ({type(e).__name__}: {e})") from None
            for t in inits:
                if (t["external"].get("location") != weights.path.name or t["length"] < SHARE_MIN_BYTES
                        or not t["readers"] or not t["readers"] <= SHAREABLE):
                    continue
                v = weights.value(t["offset"], t["length"], t.get("dtype", 0), t["dims"])
                if v is not None:
                    a.check(a.f["AddInitializer"](so, t["name"].encode(), v))
                    self.shared_bytes += t["length"]
            self.session = _P()
            a.check(a.f["CreateSessionWithPrepackedWeightsContainer"](a.env, str(path).encode(), so, weights.container,
                                                                       C.byref(self.session)))
            self._container = weights._container
            self._container.sessions += 1
        finally:
            a.f["ReleaseSessionOptions"](so)
        weights.release_pages()
        _trim_heap()
        self.weights = weights
        self.inputs = self._io("Input")
        self.outputs = self._io("Output")
        self._bound: list = []

    def _io(self, kind: str) -> dict[str, tuple[tuple, Optional[type]]]:
        a, f = self._a, self._a.f
        n = _S()
        a.check(f[f"SessionGet{kind}Count"](self.session, C.byref(n)))
        out = {}
        for i in range(n.value):
            p = _P()
            a.check(f[f"SessionGet{kind}Name"](self.session, i, a.alloc, C.byref(p)))
            name = C.string_at(p.value).decode()
            a.check(f["AllocatorFree"](a.alloc, p))
            ti, tt, et, nd = _P(), _P(), C.c_int(), _S()
            a.check(f[f"SessionGet{kind}TypeInfo"](self.session, i, C.byref(ti)))
            try:
                a.check(f["CastTypeInfoToTensorInfo"](ti, C.byref(tt)))
                a.check(f["GetTensorElementType"](tt, C.byref(et)))
                a.check(f["GetDimensionsCount"](tt, C.byref(nd)))
                dims = (C.c_int64 * max(nd.value, 1))()
                a.check(f["GetDimensions"](tt, dims, nd.value))
            finally:
                f["ReleaseTypeInfo"](ti)
            out[name] = (tuple(int(d) if d >= 0 else None for d in dims[: nd.value]), _ORT_TO_NP.get(et.value))
        return out

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Inputs and pre-allocated outputs as OrtValues over the arrays (no copies)."""
        self._release_bound()
        a = self._a
        vin = [a.value(x) for x in inputs.values()]
        vout = [a.value(x) for x in outputs.values()]
        self._bound = vin + vout
        self.kept = [(_BoundValue(a, v), x) for v, x in zip(vin + vout, [*inputs.values(), *outputs.values()])]
        self._run_args = ((C.c_char_p * len(inputs))(*[k.encode() for k in inputs]), (_P * len(vin))(*vin), len(vin),
                          (C.c_char_p * len(outputs))(*[k.encode() for k in outputs]), len(vout), (_P * len(vout))(*vout))
        self._keep = (inputs, outputs)

    def run(self) -> None:
        n_in, v_in, k, n_out, m, v_out = self._run_args
        self._a.check(self._a.f["Run"](self.session, None, n_in, v_in, k, n_out, m, v_out))

    def _release_bound(self) -> None:
        for v in self._bound:
            self._a.f["ReleaseValue"](v)
        self._bound = []

    def __del__(self) -> None:
        try:
            self._release_bound()
            if getattr(self, "session", None):
                self._a.f["ReleaseSession"](self.session)
                self.session = None
                self._container.session_gone()
        except Exception:
            pass
