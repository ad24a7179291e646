"""Precision variants of an exported fp32 graph: fp16 (IO kept fp32) and int8 (QDQ, calibrated).

fp16: `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)` with
  - op types kept fp32: Softmax, ReduceMean, Pow (norm statistics), ArgMax/ReduceMax (the
    final decision), plus the converter's default block list;
  - nodes kept fp32: the RMSNorm statistics chain (ReduceMean -> Add eps -> Sqrt ->
    Reciprocal), and everything upstream of the rotary Cos/Sin (position_ids -> ... ->
    position * inv_freq, or the constant angle tables the exporter folded for the prefill):
    an angle near 270 rad is off by up to 0.06 rad in fp16.
  - nodes kept fp32: the output head, lm_head MatMul -> ArgMax (`output_head_nodes`): an
    argmax over fp16 logits flips near-ties.
  - nodes kept fp32: the attention scores, q.k -> scale -> mask -> softmax -> p.v
    (`attention_score_nodes`), fp32 accumulations of fp16 q, k, v as fused attention kernels
    compute them.
  The converter runs a blocked node between casts from and back to fp16, so a chain of fp32
  nodes still rounds every tensor between them to fp16; `remove_fp16_round_trips` takes those
  Cast pairs out, which is what makes the islands fp32 (its effect on agreement: README).
  The attention mask value is MASK_VALUE = -30000 (finite in fp16, max 65504); the mask-token
  exclusion uses the same value. `check_fp16_constants` refuses any constant that would
  overflow to inf in fp16. On onnxruntime CPU, fp16 nodes without an fp16 kernel are run in
  fp32 by onnxruntime's InsertCastTransformer (it inserts the casts at session creation):
  the graph runs, but the CPU gains no speed from fp16; fp16 is for GPUs / TensorRT.

int8: static QDQ (`quantize_static`, QuantFormat.QDQ) of the MatMuls whose second input is
  a weight (the linear layers and lm_head). Activation x activation MatMuls (q.k, p.v) stay
  fp32: their calibration ranges are input-dependent and quantising them costs accuracy
  for little speed. Weights per-channel symmetric, calibrated with MinMax on real
  training-image activations. The mode (runtime/cpu_features.py INT8_MODES) follows the CPU
  that will serve: u8s8 (uint8 asymmetric activations, 8-bit weights) where VNNI makes the
  u8 x s8 dot product exact; u8s7 (7-bit weights) on AVX2 without VNNI, whose kernels add
  pairs of products in saturating 16-bit arithmetic that full-range weights overflow.
  The MLP down projections stay fp32 by default (`skip_input_dims` = the decoder's intermediate
  size): their input is the SwiGLU product, whose heavy tails one per-tensor uint8 range
  cannot hold. The measured agreement of each choice is in the README.

int8 for TensorRT: TensorRT takes int8 Q/DQ with a zero point of 0 only, and no int32 bias
  DequantizeLinear, while onnxruntime CPU wants uint8 activations (u8 x s8 is the VNNI
  instruction). So the int8 graph is made for onnxruntime, and `int8_qdq_for_tensorrt`
  derives the TensorRT form from it: each uint8 range [min, max] becomes the symmetric int8
  range max(|min|, |max|), and the int32 biases are folded back to float.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

FP16_OP_BLOCK = ["Softmax", "ReduceMean", "Pow", "ArgMax", "ReduceMax", "Cos", "Sin", "Range", "Less"]
FP16_MAX = 65504.0


class PrecisionError(Exception):
    """A precision variant could not be produced safely."""


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every initializer and Constant-node value, by the tensor name the graph reads."""
    out = {i.name: i for i in model.graph.initializer}
    out.update({o: a.t for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR
                for o in n.output})
    return out


def _upstream_nodes(g: onnx.GraphProto, tensors: list[str], stop_ops: tuple[str, ...] = ()) -> set[str]:
    """Names of the nodes that produce `tensors`, transitively (not past a node of `stop_ops`)."""
    prod = _producers(g)
    out: set[str] = set()
    stack, seen = list(tensors), set()
    while stack:
        t = stack.pop()
        if t in seen or t not in prod:
            continue
        seen.add(t)
        p = prod[t]
        out.add(p.name)
        if p.op_type not in stop_ops:
            stack.extend(p.input)
    return out


def name_nodes(model: onnx.ModelProto) -> None:
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def fp32_islands(model: onnx.ModelProto) -> list[str]:
    """Node names kept fp32 in the fp16 graph: norm statistics chains and the rotary angles."""
    g = model.graph
    cons = _consumers(g)
    keep: set[str] = set()
    # RMSNorm: ReduceMean -> Add(eps) -> Sqrt -> Reciprocal (or Div)
    for n in g.node:
        if n.op_type != "ReduceMean":
            continue
        keep.add(n.name)
        cur = n
        for _ in range(4):
            nxt = cons.get(cur.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Add", "Sqrt", "Reciprocal", "Div"):
                break
            cur = nxt[0]
            keep.add(cur.name)
    # rotary: everything the Cos/Sin angles are computed from. Where the exporter folded the
    # positions (the prefill's fixed ones), that is constant angle tables (up to ~70 rad, off by
    # up to 0.03 rad in fp16) and the Concat/Expand that batch them; elsewhere position_ids ->
    # ... -> position * inv_freq. Only integer position arithmetic and those tables feed them.
    keep |= _upstream_nodes(g, [i for n in g.node if n.op_type in ("Cos", "Sin") for i in n.input])
    keep |= {n.name for n in g.node if n.op_type in ("Cos", "Sin")}
    return sorted(keep)


def output_head_nodes(model: onnx.ModelProto) -> list[str]:
    """Node names from the lm_head MatMul to the ArgMax: kept fp32 in the fp16 graph.

    The token decision is an argmax over logits; computed in fp16 (about 3 significant digits)
    near-ties flip, and one flipped token changes the rest of the report. One fp32 MatMul per
    pass costs little on a GPU and keeps the decision as stable as the hidden states allow.
    """
    g = model.graph
    # stop at the head's own MatMul: its input is the final hidden state
    return sorted(_upstream_nodes(g, [i for n in g.node if n.op_type == "ArgMax" for i in n.input],
                                  stop_ops=("MatMul", "Gemm")))


def attention_score_nodes(model: onnx.ModelProto) -> list[str]:
    """Node names from each attention product q.k to its softmax, and the p.v product after it.

    Kept fp32 in the fp16 graph: the scores are fp32 accumulations of fp16 q and k, as fused
    attention kernels keep them; rounded to fp16 (about 0.01 at a score of 20) they move the
    softmax weights by up to 1%, enough to flip the model's near-ties.
    """
    g = model.graph
    cons = _consumers(g)
    keep: set[str] = set()
    for n in g.node:
        if n.op_type != "Softmax":
            continue
        keep |= _upstream_nodes(g, list(n.input), stop_ops=("MatMul",))
        keep.add(n.name)
        keep |= {c.name for c in cons.get(n.output[0], []) if c.op_type == "MatMul"}
    return sorted(keep)


def check_fp16_constants(model: onnx.ModelProto) -> list[str]:
    """Names of float constants/initializers whose values would overflow (or are inf/nan) in fp16."""
    bad = []
    for name, t in _constant_tensors(model).items():
        # external initializers are the weights: to_fp16 checks them as it converts them
        if t.data_type != onnx.TensorProto.FLOAT or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        a = numpy_helper.to_array(t)
        if a.size and (not np.isfinite(a).all() or np.abs(a).max() > FP16_MAX):
            bad.append(name)
    return bad


def topo_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes topologically (the fp16 converter appends its IO casts at the end)."""
    avail = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    done: list[onnx.NodeProto] = []
    pending = nodes
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                done.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise PrecisionError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(done)


def clamp_mask_fill_constants(model: onnx.ModelProto, fill: float = -30000.0) -> list[str]:
    """Make float32-min mask fills fp16-safe.

    `transformers` vision towers build additive attention masks as Where(keep, 0, float32.min);
    the value only has to drive softmax weights to zero, which a finite fp16 value does too.
    Only scalar constants whose every consumer is a Where node are rewritten.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    def safe_to_clamp(t: onnx.TensorProto, name: str) -> bool:
        if t.data_type != onnx.TensorProto.FLOAT:
            return False
        arr = numpy_helper.to_array(t)
        uses = consumers.get(name, [])
        return arr.size == 1 and float(arr.reshape(-1)[0]) < -FP16_MAX and bool(uses) and all(u.op_type == "Where" for u in uses)

    def clamped(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, fill, dtype=np.float32), t.name)

    fixed = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and safe_to_clamp(t, t.name):
            t.CopyFrom(clamped(t))
            fixed.append(t.name)
    for n in model.graph.node:
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and safe_to_clamp(a.t, n.output[0]):
                a.t.CopyFrom(clamped(a.t))
                fixed.append(n.output[0])
    return fixed


def _casts_to(node: Optional[onnx.NodeProto], dtype: int) -> bool:
    return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)


def remove_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Drop Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pairs; returns how many consumers were rewired.

    `convert_float_to_float16` runs a blocked node in fp32 between a Cast to fp32 on each input
    and a Cast to fp16 on each output, so two blocked nodes in a row still pass their tensor
    through fp16: the fp32 islands were fp32 arithmetic on fp16-rounded values. The rotary angle
    position * inv_freq (~270 rad at the end of a report) rounded to fp16 is off by up to 0.06
    rad, which made cos/sin 0.3-0.5% wrong and the fp16 keys of every layer with them.
    """
    prod = _producers(graph)
    outputs = {o.name for o in graph.output}
    rewired = 0
    alias: dict[str, str] = {}
    for n in graph.node:
        up = prod.get(n.input[0]) if _casts_to(n, onnx.TensorProto.FLOAT) else None
        if not _casts_to(up, onnx.TensorProto.FLOAT16):
            continue
        src = up.input[0]
        # only undo a round trip of an fp32 tensor (an fp16 -> fp16 cast would not be one)
        if _casts_to(prod.get(src), onnx.TensorProto.FLOAT16):
            continue
        if n.output[0] in outputs:  # keep the graph output's name: the cast becomes fp32 -> fp32
            n.input[0] = src
            rewired += 1
            continue
        alias[n.output[0]] = src
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
                rewired += 1
    # drop the now unused casts (the to-fp32 ones, and to-fp16 ones nobody reads any more)
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    return rewired


def has_external_data(path: str | Path) -> bool:
    """Whether a graph file keeps (some of) its initializers in external data files."""
    m = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)


def save_graph(model: onnx.ModelProto, dst: str | Path, external: bool) -> None:
    """Save a graph; `external`: its initializers of at least 1 KiB go to `<dst>.data`, as the
    exporter does for big models. Protobuf cannot serialise a model over 2 GB in one piece, and
    the build's weight sharing moves them into weights.<precision>.bin afterwards anyway."""
    dst = Path(dst)
    if not external:
        onnx.save(model, str(dst))
        return
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024, convert_attribute=False)


def external_location(t: onnx.TensorProto) -> Optional[tuple[str, int, int]]:
    """(file, offset, length) of an initializer kept in an external data file, else None."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


FP16_CHUNK = 1 << 20  # elements converted at a time: the clamping's temporaries stay ~20 MB


def _fp16_bytes(src: Path, offset: int, length: int) -> memoryview:
    """fp32 bytes of an external tensor as fp16 bytes, clamped as the converter clamps its
    inline tensors (convert_np_to_float16), read and converted a chunk at a time."""
    out = np.empty(length // 4, np.float16)
    with open(src, "rb") as f:
        f.seek(offset)
        for i in range(0, out.size, FP16_CHUNK):
            part = np.fromfile(f, np.float32, count=min(FP16_CHUNK, out.size - i))
            _fp16_chunk(part, out[i : i + part.size], f"{src}: weights at offset {offset}")
    return memoryview(out.view(np.uint8))


def _fp16_chunk(part: np.ndarray, out: np.ndarray, where: str) -> None:
    from onnxruntime.transformers.float16 import convert_np_to_float16

    if not np.isfinite(part).all() or np.abs(part).max(initial=0.0) > FP16_MAX:
        raise PrecisionError(f"{where} overflow fp16 (inf/nan or |x| > {FP16_MAX})")
    out[:] = convert_np_to_float16(part)


def _raw_bytes(src: Path, offset: int, length: int) -> bytes:
    with open(src, "rb") as f:
        f.seek(offset)
        return f.read(length)


@contextmanager
def _shapes_from_dims() -> Iterator[None]:
    """The converter reads each converted initializer's whole data only to learn its shape
    (`make_value_info_from_tensor`: numpy_helper.to_array(t).shape), which for an external tensor
    not loaded means reading it from disk, relative to the working directory. The shape is the
    tensor's dims: use them while the converter runs."""
    from onnx import helper
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def to_fp16(src: str | Path, dst: str | Path, weights=None, source=None) -> dict:
    """Convert an fp32 graph to fp16 with fp32 IO. Returns what was kept fp32.

    Works on graphs of any size: shape inference runs on the file (`infer_shapes_path`; the
    in-memory form serialises the whole model, which fails past protobuf's 2 GB), the graph is
    converted without its external weights, and those are converted afterwards one tensor at a
    time into `weights` (an external_weights.WeightsFile; default: `<dst>.data`). At 3.75B
    parameters the fp32 weights are 15 GB, which a converter holding the whole model cannot take.

    `source` (a stream_export.DeferredWeights): the fp32 graph's weights that point into its
    (never written) file are taken from it, one tensor at a time: an fp16 build with no fp32 one."""
    from .external_weights import WeightsFile

    src, dst = Path(src), Path(dst)
    model = _shape_inferred(src, src.with_name(dst.stem + ".shapes.onnx"))  # beside src: its data paths hold
    # the converter only retypes an external initializer (its bytes are not loaded): remember where
    # each one's fp32 bytes are and what type it had
    outside = {t.name: (external_location(t), t.data_type) for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
    out, kept, rewired = _fp16_graph(model, src)
    if outside:
        store = weights if weights is not None else WeightsFile(dst.parent, dst.name + ".data")
        _fp16_external_weights(out, outside, src.parent, store, source)
        if weights is None:
            store.close()
        else:
            store.flush()
    onnx.save(out, str(dst))
    return {"op_block_list": FP16_OP_BLOCK, "fp32_nodes": kept, "fp16_round_trips_removed": rewired}


def _shape_inferred(src: Path, inferred: Path) -> onnx.ModelProto:
    """`src` with inferred shapes, loaded without its external data (inferred on the file: `inferred`,
    removed again)."""
    try:
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        return onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)


def _fp16_graph(model: onnx.ModelProto, src: Path) -> tuple[onnx.ModelProto, int, int]:
    """The fp16 form of a graph whose external weights are not loaded: (graph, nodes kept fp32,
    fp16 round trips removed). Norm statistics, rotary angles, attention scores and the output
    head stay fp32; constants that would overflow fp16 are refused (PrecisionError)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    name_nodes(model)
    clamp_mask_fill_constants(model)
    bad = check_fp16_constants(model)
    if bad:
        raise PrecisionError(f"{src}: constants overflow fp16 (inf/-inf or |x| > {FP16_MAX}): {bad[:5]}")
    keep_nodes = sorted(set(fp32_islands(model)) | set(output_head_nodes(model)) | set(attention_score_nodes(model)))
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_OP_BLOCK))
    with _shapes_from_dims():
        out = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=op_block, node_block_list=keep_nodes, disable_shape_infer=True
        )
    rewired = remove_fp16_round_trips(out.graph)
    topo_sort(out.graph)
    del out.graph.value_info[:]  # stale fp32 annotations; onnxruntime and the checker re-infer them
    return out, len(keep_nodes), rewired


def _fp16_external_weights(out: onnx.ModelProto, outside: dict, folder: Path, store, source=None) -> None:
    """Every external initializer of the converted graph into `store`, one tensor at a time: fp16
    where the converter retyped it (clamped as it clamps inline tensors), else its bytes as they
    were; `outside`: name -> ((file, offset, length) in the fp32 graph's `folder`, fp32 type)."""
    for t in out.graph.initializer:
        if t.name not in outside:
            continue
        (location, offset, length), was = outside[t.name]
        path = folder / location
        retyped = was == onnx.TensorProto.FLOAT and t.data_type == onnx.TensorProto.FLOAT16
        if source is not None and location == source.name:
            convert = lambda a, o, n=t.name: _fp16_chunk(a, o, n)  # noqa: E731
            data = memoryview(source.fp16(offset, convert).reshape(-1).view(np.uint8)) if retyped else source.raw(offset)
        else:
            data = _fp16_bytes(path, offset, length) if retyped else _raw_bytes(path, offset, length)
        new_offset, new_length = store.add(data)
        del data
        del t.external_data[:]
        for k, v in (("location", store.name), ("offset", str(new_offset)), ("length", str(new_length))):
            e = t.external_data.add()
            e.key, e.value = k, v


# ---------------------------------------------------------------- int8


def weight_matmuls(model: onnx.ModelProto, min_weight_elements: int = 0, skip_input_dims: Iterable[int] = ()) -> list[str]:
    """MatMul/Gemm nodes (quant_pre_process fuses MatMul+bias into Gemm) whose second input is a
    constant weight (directly or through a Transpose) of at least `min_weight_elements` values,
    leaving out weights whose input dimension (K of x[.., K] @ W) is in `skip_input_dims`."""
    g = model.graph
    dims = {name: list(t.dims) for name, t in _constant_tensors(model).items()}
    prod = _producers(g)
    skip = set(skip_input_dims)
    out = []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        w = n.input[1]
        p = prod.get(w)
        transposed = p is not None and p.op_type == "Transpose"
        src = p.input[0] if transposed else w
        if src not in dims or len(dims[src]) != 2 or int(np.prod(dims[src])) < min_weight_elements:
            continue
        trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
        k = dims[src][1] if transposed != trans_b else dims[src][0]
        if k not in skip:
            out.append(n.name)
    return out


class ListDataReader:
    """An onnxruntime CalibrationDataReader over recorded feeds (name -> array dicts), taken one at a
    time from any iterable: a FeedStore's lazily read feeds are never all in memory."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], input_names: list[str]) -> None:
        self._feeds = feeds
        self._names = input_names
        self._it: Optional[Iterator] = None
        self.rewind()

    def get_next(self):
        f = next(self._it, None)
        return None if f is None else {k: f[k] for k in self._names}

    def rewind(self) -> None:
        self._it = iter(self._feeds)


class FeedStore:
    """Recorded graph feeds in a folder, one .npz file per feed, read back one at a time.

    int8 calibration records every prefill and step feed of a decode, each with the whole KV
    cache: at 0.5B with batch 8 that is 63 AR step feeds of 56 MB. Kept on disk, the calibrator
    holds one feed at a time, and the PyTorch model that recorded them can go before the
    quantiser runs (echo_export/build.py)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._n = len(list(self.folder.glob("feed-*.npz")))

    def append(self, feed: dict[str, np.ndarray]) -> None:
        np.savez(self.folder / f"feed-{self._n:06d}.npz", **feed)
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        with np.load(self.folder / f"feed-{i:06d}.npz") as z:
            return {k: z[k] for k in z.files}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(self._n))


def calibration_indices(n: int, max_feeds: int) -> list[int]:
    """Which of `n` recorded feeds calibrate: all, or `max_feeds` evenly spaced (every image and
    every block position stays represented)."""
    if n <= max_feeds:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, max_feeds).round().astype(int)]


def minmax_ranges(model_path: str | Path, feeds: Sequence[dict[str, np.ndarray]], indices: list[int],
                  input_names: list[str], *, external: bool, workdir: Path, chunk: int = 16):
    """MinMax calibration ranges of every MatMul/Gemm tensor, as `quantize_static` computes them
    (same calibrator, same tensors, same options), fed `chunk` feeds per `collect_data` call.

    onnxruntime 1.32's MinMaxCalibrater reduces each feed's tensors to one min and one max in the
    graph, and `collect_data` merges its call's ranges into the running ones (min of mins, max of
    maxes; calibrate.py `merge_range`), so chunked calls give exactly the all-at-once ranges while
    only a chunk's feeds are read. The calibrator's own copy of the model (it loads the weights to
    augment the graph) is dropped once the augmented graph is saved and its session made."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator

    with tempfile.TemporaryDirectory(prefix="calib.", dir=workdir) as d:
        cal = create_calibrator(Path(model_path), ["MatMul", "Gemm"],
                                augmented_model_path=str(Path(d) / "augmented_model.onnx"),
                                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
                                providers=None, extra_options={})
        cal.model = None  # read by augment_graph only (done); collect/compute use the session
        for start in range(0, len(indices), chunk):
            cal.collect_data(ListDataReader((feeds[i] for i in indices[start : start + chunk]), input_names))
        ranges = cal.compute_data()
        if not isinstance(ranges, TensorsData):
            raise PrecisionError(f"{model_path}: the calibrator returned no ranges")
        del cal
    return ranges


def to_int8(src: str | Path, dst: str | Path, feeds: Sequence[dict[str, np.ndarray]], *, per_channel: bool = True,
            mode: str = "u8s8", workdir: Optional[Path] = None, max_feeds: int = 256,
            min_weight_elements: int = 0, skip_input_dims: Iterable[int] = (), calib_chunk: int = 16) -> dict:
    """Static QDQ quantisation of the weight MatMuls in `mode` (runtime.cpu_features.INT8_MODES),
    calibrated on `feeds` (a list, or a FeedStore read one feed at a time).

    Calibration and quantisation run one after the other, not nested: `minmax_ranges` computes
    the ranges (the calibrator's session holds the weights once), then `quantize_static` reads them
    from a calibration cache file and loads its own copy of the model only after that session has
    gone. Ranges and graph are those of one `quantize_static` call over all the feeds (tested)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    _check_int8_inputs(mode, feeds)
    dst = Path(dst)
    work = Path(workdir) if workdir else dst.parent
    pre, cache = work / (dst.stem + ".pre.onnx"), work / (dst.stem + ".calib.json")
    # big graphs keep their weights external at every step (protobuf's 2 GB limit)
    external = has_external_data(src)
    nodes, names = _int8_preprocessed(src, pre, external, min_weight_elements, skip_input_dims)
    idx = calibration_indices(len(feeds), max_feeds)
    try:
        ranges = minmax_ranges(pre, feeds, idx, names, external=external, workdir=work, chunk=calib_chunk)
        cache.unlink(missing_ok=True)
        save_tensors_data(ranges, cache)
        del ranges
        _quantize_with_cache(pre, dst, cache, nodes, mode, per_channel, external)
    finally:
        cache.unlink(missing_ok=True)
        pre.unlink(missing_ok=True)
        pre.with_name(pre.name + ".data").unlink(missing_ok=True)
    if mode == "u8s7":
        bad = check_int8_avx2_safe(onnx.load(str(dst)))
        if bad:
            raise PrecisionError(f"{dst}: int8 weights that saturate on AVX2 without VNNI: {bad[:3]}")
    return {"quantized_matmuls": len(nodes), "calib_samples": len(idx), "per_channel": per_channel,
            "mode": mode, "min_weight_elements": min_weight_elements,
            "fp32_input_dims": sorted(skip_input_dims)}


def _check_int8_inputs(mode: str, feeds: Sequence[dict[str, np.ndarray]]) -> None:
    from runtime.cpu_features import INT8_MODES

    if mode not in INT8_MODES:
        raise PrecisionError(f"unknown int8 mode {mode!r}; choose from {', '.join(INT8_MODES)}")
    if not len(feeds):
        raise PrecisionError("int8 needs calibration data: no block inputs were recorded")


def _int8_preprocessed(src: str | Path, pre: Path, external: bool, min_weight_elements: int,
                       skip_input_dims: Iterable[int]) -> tuple[list[str], list[str]]:
    """onnxruntime's quantisation pre-processing of `src` into `pre`, its nodes named; returns (the
    weight MatMuls to quantise, the graph's input names). PrecisionError when there is none."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the optimiser inside quant_pre_process reads src's external data from src's own folder
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    model = onnx.load(str(pre), load_external_data=False)  # names and shapes are all this step needs
    name_nodes(model)
    onnx.save(model, str(pre))
    nodes = weight_matmuls(model, min_weight_elements, skip_input_dims)
    if not nodes:
        raise PrecisionError(f"{src}: no weight MatMul of at least {min_weight_elements} values "
                             f"(input dimension not in {sorted(skip_input_dims)}) found to quantise")
    return nodes, [i.name for i in model.graph.input]


def _quantize_with_cache(pre: Path, dst: Path, cache: Path, nodes: list[str], mode: str, per_channel: bool,
                         external: bool) -> None:
    """quantize_static of `nodes` with the ranges of the calibration cache file (no calibration of its own)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    signed_act = mode == "s8s8"
    quantize_static(
        str(pre),
        str(dst),
        None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=nodes,
        per_channel=per_channel,
        reduce_range=mode == "u8s7",
        activation_type=QuantType.QInt8 if signed_act else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        calibration_cache_path=str(cache),
        extra_options={"ActivationSymmetric": signed_act, "WeightSymmetric": True},
    )


# vpmaddubsw (AVX2 without VNNI) adds two u8 x s8 products in int16: 255 * |q| * 2 must fit
AVX2_INT16_MAX = 32767


def check_int8_avx2_safe(model: onnx.ModelProto) -> list[str]:
    """int8 weights that can overflow AVX2's saturating pair sums (2 * 255 * |q| > 32767, i.e.
    |q| > 64) under uint8 activations. Returns '<weight>: max |q| = N' strings; empty when safe."""
    consts = _constant_tensors(model)
    bad = []
    for n in model.graph.node:
        t = consts.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if t is None or t.data_type != onnx.TensorProto.INT8:
            continue
        q = int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max(initial=0))
        if 2 * 255 * q > AVX2_INT16_MAX:
            bad.append(f"{n.input[0]}: max |q| = {q}")
    return bad


def check_int8_qdq_for_tensorrt(model: onnx.ModelProto, base_dir: str = "") -> list[str]:
    """Q/DQ nodes TensorRT would refuse: it takes int8 with a zero point of 0 (symmetric) only.
    Returns '<node>: <why>' strings; empty when every Q/DQ node is fine. `base_dir`: the graph's
    folder, where a model loaded without its external data finds it."""
    consts = _constant_tensors(model)
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            bad.append(f"{n.name}: no constant zero point (uint8 by default)")
        elif zp.data_type != onnx.TensorProto.INT8:
            bad.append(f"{n.name}: zero point of type {onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8")
        elif np.any(numpy_helper.to_array(zp, base_dir=base_dir) != 0):
            bad.append(f"{n.name}: nonzero zero point (asymmetric)")
    return bad


def int8_qdq_for_tensorrt(src: str | Path, dst: str | Path) -> dict:
    """Rewrite an onnxruntime-style int8 QDQ graph (uint8 asymmetric activations, int32 biases)
    into the form TensorRT parses: symmetric int8 activations covering the same calibrated
    range, float biases. Weights (per-channel symmetric int8) are left as they are, where they
    are: the graph is read without its external data, so the TensorRT form refers to the same
    weights.int8.bin, and only the small tensors it reads (scales, zero points, biases) are loaded."""
    src = Path(src)
    base = str(src.parent)
    model = onnx.load(str(src), load_external_data=False)
    rewrite = _SymmetricQdq(model, base)
    keep_nodes = [n for n in model.graph.node if rewrite.keeps(n)]
    g = model.graph
    del g.node[:]
    g.node.extend(keep_nodes)
    g.initializer.extend(rewrite.new_inits)
    _drop_unused_initializers(g)
    del g.value_info[:]
    bad = check_int8_qdq_for_tensorrt(model, base)
    if bad:
        raise PrecisionError(f"{src}: Q/DQ left that TensorRT cannot take: {bad[:3]}")
    if Path(dst).resolve().parent != src.resolve().parent:  # elsewhere: take the weights along
        onnx.external_data_helper.load_external_data_for_model(model, base)
        save_graph(model, dst, has_external_data(src))
    else:
        onnx.save(model, str(dst))
    return {"requantised_ranges": rewrite.requantised, "folded_biases": rewrite.folded}


class _SymmetricQdq:
    """The Q/DQ rewrite of int8_qdq_for_tensorrt, node by node: an int32 bias DequantizeLinear
    becomes the float initializer it stands for; a uint8 zero point's range becomes a symmetric
    int8 one (scale amax / 127, zero point 0), shared by the nodes that share the original."""

    def __init__(self, model: onnx.ModelProto, base_dir: str) -> None:
        self.consts = _constant_tensors(model)
        self.base_dir = base_dir
        self.new_inits: list[onnx.TensorProto] = []
        self.renamed: dict[tuple[str, str], tuple[str, str]] = {}
        self.folded = self.requantised = 0

    def _arr(self, t: onnx.TensorProto) -> np.ndarray:
        return numpy_helper.to_array(t, base_dir=self.base_dir)  # reads external data too

    def keeps(self, n: onnx.NodeProto) -> bool:
        """Rewrite `n` in place; False where it is folded away (an int32 bias)."""
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
            return True
        s_name, z_name = n.input[1], n.input[2]
        zp = self.consts.get(z_name)
        if zp is None or s_name not in self.consts:
            return True
        if zp.data_type == onnx.TensorProto.INT32 and n.op_type == "DequantizeLinear" and n.input[0] in self.consts:
            q = self._arr(self.consts[n.input[0]]).astype(np.float64)
            val = (q - self._arr(zp)) * self._arr(self.consts[s_name])
            self.new_inits.append(numpy_helper.from_array(val.astype(np.float32), n.output[0]))
            self.folded += 1
            return False
        if zp.data_type == onnx.TensorProto.UINT8:
            n.input[1], n.input[2] = self._symmetric(s_name, z_name)
        return True

    def _symmetric(self, s_name: str, z_name: str) -> tuple[str, str]:
        """The names of the symmetric int8 scale and zero point covering a uint8 range's [min, max]."""
        key = (s_name, z_name)
        if key not in self.renamed:
            s = self._arr(self.consts[s_name]).astype(np.float64)
            z = self._arr(self.consts[z_name]).astype(np.float64)
            amax = np.maximum(z * s, (255.0 - z) * s)  # the calibrated [min, max], either side of 0
            ns, nz = s_name + "_sym", z_name + "_sym"
            self.new_inits.append(numpy_helper.from_array((amax / 127.0).astype(np.float32), ns))
            self.new_inits.append(numpy_helper.from_array(np.zeros(z.shape, np.int8), nz))
            self.renamed[key] = (ns, nz)
            self.requantised += 1
        return self.renamed[key]


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    still = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(still)
