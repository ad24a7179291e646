"""Weights stored once per precision: every graph of one precision reads one external data file.

The exported graphs of one model repeat the same weights: vision_prefill and block_step both
carry the whole decoder, and every batch size carries it again. At real size (a 0.5B-7B
decoder) that multiplies the engine folder, and a runtime that opens two graphs reads the
weights twice. `share_weights` rewrites the graphs of one precision so that each distinct
tensor content (its bytes) is written once to `weights.<precision>.bin` and every graph
refers to it by offset (ONNX external data). Large tensors start on a page (ALIGN) so each
maps from the file on its own pages; small ones on 64 bytes (SIMD loads), so that padding stays
small for tiny models too.

The graphs are read without their external data (`load_external_data=False`) and the tensors
are streamed one at a time, so a graph bigger than protobuf's 2 GB limit passes through too. The
build keeps one WeightsFile per precision open and appends each graph as it is made; the exporter
writes its graphs' tensors straight into it (graphs.export_graph), and the fp16 conversion writes
converted tensors into its own one tensor at a time (precision.to_fp16).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

import onnx

ALIGN = 4096  # a page
SMALL_ALIGN = 64  # a cache line
PAGE_ALIGN_FROM = 1 << 16  # tensors of at least this many bytes start on a page
DEFAULT_MIN_BYTES = 1024  # smaller tensors stay inside the graph (norm scales, shapes, scalars)


def weights_filename(precision: str) -> str:
    return f"weights.{precision}.bin"


@dataclass
class SharedWeights:
    """What `share_weights` wrote: one data file, the graphs that read it, and the byte counts."""
    data_file: str
    graphs: list[str]
    tensors_referenced: int = 0  # over all graphs
    tensors_stored: int = 0  # distinct, in the data file
    bytes_referenced: int = 0
    bytes_stored: int = 0  # without alignment padding
    file_bytes: int = 0
    replaced_files: list[str] = field(default_factory=list)  # per-graph data files now gone

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def tensor_bytes(t: onnx.TensorProto, base: Path) -> bytes:
    """The raw little-endian bytes of an initializer, inline or external."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = _external_info(t)
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            n = int(info["length"]) if "length" in info else -1
            return f.read(n)
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()  # typed fields (float_data, ...): rare after export


class WeightsFile:
    """An append-only weights.<precision>.bin: `add` writes a tensor's bytes unless equal bytes are
    already there, and returns (offset, length). One per precision for a whole build, so every
    graph of that precision (each family, each batch size) goes in as it is made, without the file
    being rewritten: at real size the file is the weights (15 GB at 3.75B parameters in fp32)."""

    def __init__(self, folder: Path, name: str, staged: bool = False) -> None:
        """`staged`: write to `name`.tmp and move it over `name` at close, so that graphs still
        reading an older `name` stay readable until then."""
        self.folder, self.name = Path(folder), name
        self.path = self.folder / (name + ".tmp" if staged else name)
        self.path.unlink(missing_ok=True)
        self._f: BinaryIO = open(self.path, "wb")
        # sha256 of the bytes -> (offset, length): a tensor's type and shape live in the graph, so
        # equal bytes are stored once whatever they are viewed as
        self._stored: dict[str, tuple[int, int]] = {}
        self.tensors_stored = 0
        self.bytes_stored = 0

    def add(self, data: bytes | memoryview) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest()
        if key not in self._stored:
            n = len(data)
            pos = self._f.tell()
            gap = (-pos) % (ALIGN if n >= PAGE_ALIGN_FROM else SMALL_ALIGN)
            if gap:
                self._f.write(b"\0" * gap)
            self._f.write(data)
            self._stored[key] = (pos + gap, n)
            self.tensors_stored += 1
            self.bytes_stored += n
        return self._stored[key]

    def flush(self) -> None:
        """Make what was added readable by other readers of the file (graphs, sessions)."""
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        final = self.folder / self.name
        if self.path != final:
            self.path.replace(final)
            self.path = final

    def file_bytes(self) -> int:
        if not self._f.closed:
            self.flush()
        return self.path.stat().st_size


def point_to(t: onnx.TensorProto, data_file: str, offset: int, length: int) -> None:
    """Make initializer `t` read its bytes from `data_file` at offset."""
    t.ClearField("raw_data")
    for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(typed)
    del t.external_data[:]
    for k, v in (("location", data_file), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


def stored_initializer(store: WeightsFile, array, name: str) -> onnx.TensorProto:
    """A new initializer `name` holding `array`, its bytes appended to `store` (deduplicated)."""
    from onnx import numpy_helper

    t = numpy_helper.from_array(array, name)
    point_to(t, store.name, *store.add(t.raw_data))
    return t


def store_initializers(model, store: WeightsFile, min_bytes: int = DEFAULT_MIN_BYTES) -> int:
    """Move the initializers of an in-memory graph (an onnx_ir Model, as the exporter returns it)
    of at least `min_bytes` into `store`, one tensor at a time, and make them read it. Returns the
    bytes referenced. The exporter's tensors wrap the PyTorch parameters (or views of them), so
    the only copy is one tensor's bytes in flight."""
    import onnx_ir as ir

    referenced = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None or t.nbytes < min_bytes or isinstance(t, ir.StringTensor):
            continue
        if isinstance(t, ir.ExternalTensor) and str(t.location) == store.name:
            referenced += t.nbytes
            continue
        offset, length = store.add(t.tobytes())
        value.const_value = ir.ExternalTensor(store.name, offset, length, t.dtype, shape=t.shape, name=value.name,
                                              base_dir=str(store.folder))
        referenced += length
    store.flush()
    return referenced


def share_weights(folder: Path, graph_files: Iterable[str], data_file: str | WeightsFile,
                  min_bytes: int = DEFAULT_MIN_BYTES) -> SharedWeights:
    """Move every initializer of at least `min_bytes` of `graph_files` (in `folder`) into one
    data file, each distinct tensor once, and rewrite the graphs to read it. `data_file`: a file
    name (written anew) or an open WeightsFile (appended to: the graphs already in it stay valid).
    Per-graph external data files that no graph refers to any more are deleted."""
    folder = Path(folder)
    graph_files = list(graph_files)
    own = not isinstance(data_file, WeightsFile)
    store = WeightsFile(folder, data_file, staged=True) if own else data_file
    res = SharedWeights(data_file=store.name, graphs=graph_files)
    before = (store.tensors_stored, store.bytes_stored)
    old_files: set[str] = set()
    models: list[tuple[str, onnx.ModelProto]] = []
    for name in graph_files:
        model = onnx.load(str(folder / name), load_external_data=False)
        old_files |= _move_initializers(model, folder, store, own, min_bytes, res)
        models.append((name, model))
    if own:
        store.close()
    else:
        store.flush()
    for name, model in models:  # the graphs change only once their data is in the file
        onnx.save(model, str(folder / name))
    for f in sorted(old_files - {store.name}):
        (folder / f).unlink(missing_ok=True)
        res.replaced_files.append(f)
    res.tensors_stored = store.tensors_stored - before[0]
    res.bytes_stored = store.bytes_stored - before[1]
    res.file_bytes = store.file_bytes()
    return res


def _move_initializers(model: onnx.ModelProto, folder: Path, store: WeightsFile, own: bool, min_bytes: int,
                       res: SharedWeights) -> set[str]:
    """share_weights for one graph: its initializers of at least `min_bytes` into `store` (counted
    in `res`), smaller external ones back inline; returns the data files it read from."""
    old_files: set[str] = set()
    for t in model.graph.initializer:
        ext = t.data_location == onnx.TensorProto.EXTERNAL
        if ext:
            location = _external_info(t)["location"]
            if location == store.name and not own:  # already in the store (exported straight into it)
                res.tensors_referenced += 1
                res.bytes_referenced += int(_external_info(t)["length"])
                continue
            old_files.add(location)
        data = tensor_bytes(t, folder)
        if len(data) < min_bytes:
            if ext:  # a small tensor the exporter put outside: bring it back inline
                t.raw_data = data
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
            continue
        offset, length = store.add(data)
        point_to(t, store.name, offset, length)
        res.tensors_referenced += 1
        res.bytes_referenced += length
    return old_files


def external_data_files(model_path: Path) -> set[str]:
    """The external data files a graph refers to (names relative to its folder)."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {_external_info(t)["location"] for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def file_size_text(p: Path, data: bool = False) -> str:
    """A file's size for a log line; `data`: with the `<file>.data` external data beside it, if any."""
    n = p.stat().st_size
    if data and p.with_name(p.name + ".data").is_file():
        n += p.with_name(p.name + ".data").stat().st_size
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
