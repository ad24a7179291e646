"""Safetensors files a piece at a time: read a tensor straight into a model's own storage, write
a file tensor by tensor (or byte chunk by byte chunk) without holding the whole state dict.

Why not the `safetensors` library here: `safe_open` maps the whole file, and every page a read
touches stays in the process's resident memory until the file is closed, so loading a model
through it peaks at the model plus the whole file (measured: ten 40 MB fp32 tensors read and
dropped one by one raise RSS by 390 MB); `load_file` / `load_model` hold a full second state dict;
`save_file` / `save_model` need every tensor in memory at once. Plain reads and writes keep the
peak at the model plus one chunk. Files written here are ordinary safetensors files (the library
reads them), and files the library wrote read here.

The format: an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} padded with
spaces to a multiple of 8, then the tensors' little-endian bytes, contiguous, in header order
(offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Optional

import torch

# safetensors' dtype names; byte order is little-endian, as torch's on every platform we run on
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 64 << 20  # one read / conversion / write at a time: the peak beyond the model itself
MAX_HEADER = 100 << 20  # the library's own limit; a larger "length" is a damaged file


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file (the message says what is wrong)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: its dtype, shape and absolute byte range in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise SafetensorsFormatError(f"dtype {dtype} has no safetensors name")
    return DTYPE_NAMES[dtype]


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """name -> TensorEntry of every tensor of `path`, in file order, from the header alone."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{p}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsFormatError(f"{p}: header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{p}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{p}: the header is not a JSON object")
    start = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{p}: tensor {name!r} has a malformed entry {info!r} ({e!r})") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or begin < 0 or start + end > size:
            raise SafetensorsFormatError(f"{p}: tensor {name!r} {info['dtype']}{list(shape)} has data_offsets "
                                         f"[{begin}, {end}] that do not fit it or the file ({size} bytes)")
        out[name] = TensorEntry(name, dtype, shape, start + begin, start + end)
    return out


def byte_view(t: torch.Tensor):
    """A writable NumPy uint8 view of a contiguous CPU tensor's storage (no copy)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def _read_exact(f: BinaryIO, buf, where: str) -> None:
    view = memoryview(buf)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise SafetensorsFormatError(f"{where}: the file ends early")
        got += n


def read_into(f: BinaryIO, entry: TensorEntry, out: torch.Tensor, where: str = "") -> None:
    """Fill `out` (the entry's shape, any dtype and device) from the open file `f`.

    Same dtype on the CPU: the bytes are read straight into `out`'s storage. Otherwise a chunk of
    the file's dtype at a time is read and converted into `out`, so a bf16 file fills fp32
    parameters with no full-size temporary."""
    where = where or entry.name
    if tuple(out.shape) != entry.shape:
        raise SafetensorsFormatError(f"{where}: shape {list(entry.shape)} in the file, {list(out.shape)} wanted")
    f.seek(entry.begin)
    if out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous():
        _read_exact(f, byte_view(out), where)
        return
    flat = out.detach().view(-1) if out.is_contiguous() else None
    item = entry.nbytes // max(entry.numel, 1)
    step = max(1, CHUNK_BYTES // max(item, 1))
    with torch.no_grad():
        if flat is None:  # never the case for parameters; one temporary of the whole tensor
            tmp = torch.empty(entry.shape, dtype=entry.dtype)
            _read_exact(f, byte_view(tmp), where)
            out.copy_(tmp)
            return
        for a in range(0, entry.numel, step):
            chunk = torch.empty(min(step, entry.numel - a), dtype=entry.dtype)
            _read_exact(f, byte_view(chunk), where)
            flat[a:a + chunk.numel()].copy_(chunk)


def read_rows(f: BinaryIO, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 (along the first axis) of the entry, as a new tensor of its dtype."""
    out = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
    f.seek(entry.begin + start * (entry.nbytes // max(entry.shape[0], 1)))
    _read_exact(f, byte_view(out), entry.name)
    return out


def copy_bytes(f: BinaryIO, entry: TensorEntry, chunk_bytes: int = CHUNK_BYTES) -> Iterable[bytes]:
    """The entry's raw bytes from the open file `f`, a chunk at a time."""
    f.seek(entry.begin)
    left = entry.nbytes
    while left:
        b = f.read(min(chunk_bytes, left))
        if not b:
            raise SafetensorsFormatError(f"{entry.name}: the file ends early")
        left -= len(b)
        yield b


@dataclass(frozen=True)
class TensorSpec:
    """What the writer will write for one tensor: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """Writes one safetensors file from a stream: the header from the specs first, then each
    tensor's data in the specs' order, whole (`write_tensor`) or in byte chunks (`start`, then
    `write_bytes`). `close` checks that every byte was given."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: Optional[dict[str, str]] = None) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: two tensors of one name")
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        pos = 0
        for s in specs:
            header[s.name] = {"dtype": dtype_name(s.dtype), "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
            pos += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
        self.path = Path(path)
        self.specs = list(specs)
        self.total = 8 + len(raw) + pos  # the file's size once complete
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0  # index of the next tensor to start
        self._left = 0  # bytes of the started tensor still to come

    def start(self, name: str) -> TensorSpec:
        """Begin tensor `name`: the next in the specs' order, the previous one complete."""
        if self._left:
            raise ValueError(f"{self.path}: {self.specs[self._next - 1].name} is {self._left} bytes short")
        want = self.specs[self._next].name if self._next < len(self.specs) else None
        if name != want:
            raise ValueError(f"{self.path}: {name} written out of order (expected {want or 'nothing more'})")
        spec = self.specs[self._next]
        self._next += 1
        self._left = spec.nbytes
        return spec

    def write_bytes(self, data) -> None:
        """Raw little-endian bytes of the started tensor (a part of it, never past its end)."""
        n = memoryview(data).nbytes
        if n > self._left:
            raise ValueError(f"{self.path}: {n} bytes given, {self._left} left of the tensor being written")
        self._f.write(data)
        self._left -= n

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        """The whole of tensor `name` (the next in the specs' order, with their dtype and shape)."""
        spec = self.start(name)
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ValueError(f"{self.path}: {name} is {t.dtype}{list(t.shape)}, declared {spec.dtype}{list(spec.shape)}")
        data = byte_view(t.detach().cpu().contiguous())
        for a in range(0, len(data), CHUNK_BYTES):
            self.write_bytes(data[a:a + CHUNK_BYTES])

    def close(self) -> None:
        self._f.close()
        if self._left or self._next < len(self.specs):
            short = self.specs[self._next - 1 if self._left else self._next].name
            raise ValueError(f"{self.path}: closed before {short} and the tensors after it were written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's error is the one to see; the half-written file is its cleanup's
            self._f.close()
