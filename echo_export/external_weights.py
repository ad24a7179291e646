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
are streamed one at a time, so a graph bigger than protobuf's 2 GB limit passes through too.
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


def _tensor_bytes(t: onnx.TensorProto, base: Path) -> bytes:
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


def _pad(f: BinaryIO, n_bytes: int) -> int:
    pos = f.tell()
    gap = (-pos) % (ALIGN if n_bytes >= PAGE_ALIGN_FROM else SMALL_ALIGN)
    if gap:
        f.write(b"\0" * gap)
    return pos + gap


def share_weights(folder: Path, graph_files: Iterable[str], data_file: str,
                  min_bytes: int = DEFAULT_MIN_BYTES) -> SharedWeights:
    """Move every initializer of at least `min_bytes` of `graph_files` (in `folder`) into one
    data file, each distinct tensor once, and rewrite the graphs to read it. Per-graph external
    data files that no graph refers to any more are deleted. Returns what was written."""
    folder = Path(folder)
    graph_files = list(graph_files)
    res = SharedWeights(data_file=data_file, graphs=graph_files)
    # sha256 of the bytes -> (offset, length): a tensor's type and shape live in the graph, so equal
    # bytes are stored once whatever they are viewed as
    stored: dict[str, tuple[int, int]] = {}
    old_files: set[str] = set()
    tmp = folder / (data_file + ".tmp")
    models: list[tuple[str, onnx.ModelProto]] = []
    with open(tmp, "wb") as out:
        for name in graph_files:
            model = onnx.load(str(folder / name), load_external_data=False)
            for t in model.graph.initializer:
                ext = t.data_location == onnx.TensorProto.EXTERNAL
                if ext:
                    old_files.add(_external_info(t)["location"])
                data = _tensor_bytes(t, folder)
                if len(data) < min_bytes:
                    if ext:  # a small tensor the exporter put outside: bring it back inline
                        t.raw_data = data
                        del t.external_data[:]
                        t.data_location = onnx.TensorProto.DEFAULT
                    continue
                key = hashlib.sha256(data).hexdigest()
                if key not in stored:
                    offset = _pad(out, len(data))
                    out.write(data)
                    stored[key] = (offset, len(data))
                    res.tensors_stored += 1
                    res.bytes_stored += len(data)
                offset, length = stored[key]
                t.ClearField("raw_data")
                for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                    t.ClearField(typed)
                del t.external_data[:]
                for k, v in (("location", data_file), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                t.data_location = onnx.TensorProto.EXTERNAL
                res.tensors_referenced += 1
                res.bytes_referenced += length
            models.append((name, model))
    tmp.replace(folder / data_file)
    for name, model in models:  # the graphs change only once the data file is complete
        onnx.save(model, str(folder / name))
    for f in sorted(old_files - {data_file}):
        (folder / f).unlink(missing_ok=True)
        res.replaced_files.append(f)
    res.file_bytes = (folder / data_file).stat().st_size
    return res


def external_data_files(model_path: Path) -> set[str]:
    """The external data files a graph refers to (names relative to its folder)."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {_external_info(t)["location"] for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}
