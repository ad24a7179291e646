"""int4 weight-only precision: the linear layers' weights in 4 bits, activations fp32.

onnxruntime form (the engine's `*.int4.*.onnx`): each selected weight MatMul becomes
`com.microsoft.MatMulNBits` (bits 4, block_size 32/64/128 along K, one fp32 scale per block and
column, a 4-bit zero point per block when asymmetric). onnxruntime's CPU kernel (MLAS) reads the
packed weights directly; `accuracy_level` picks its arithmetic: 4 quantises the activations to
int8 per block and uses the int8 dot-product instructions (VNNI, AVX2, NEON), 1 computes in fp32.
The build picks it for the CPU it runs on (`choose_accuracy_level`) and records the choice.

TensorRT form (`int4_dq_for_tensorrt`, the registry's tensorrt_form): MatMulNBits is an
onnxruntime operator TensorRT does not parse, so the same 4-bit integers and scales are written as
ModelOpt writes INT4 weights for TensorRT 10+: a blockwise `DequantizeLinear` (opset 21,
`block_size`, INT4 weights [K, N], axis 0, no zero point: TensorRT takes a zero point of 0 only)
feeding a plain MatMul. Only symmetric int4 has that form.

Methods: `rtn` rounds each block to the nearest of its 16 levels; `awq` (activation-aware, after
Lin et al. 2023) first scales each input channel k of W by s_k = mean|x_k|^alpha (alpha searched
per weight on the calibration activations, alpha 0 being RTN) so that the channels the
activations use most keep more precision, quantises W * s, and divides the activations by s in a
Mul before the MatMul (exact in real arithmetic; ModelOpt's AWQ writes the same `pre_quant_scale`).

Which weights: the decoder's linear layers always; the vision tower and projector (`vision`) and
the lm_head (`lm_head`) by option. The token embedding stays fp32 (a Gather reads 2B rows per pass:
memory, not bandwidth; its tied lm_head copy is what `lm_head` quantises). Every graph of one
build quantises the same weight to the same bytes (the AWQ scales are chosen once per weight
content, over every graph's activations), so weights.int4.bin holds each weight once.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .precision import PrecisionError, external_location

BLOCK_SIZES = (32, 64, 128)
BITS = (4, 8)  # MatMulNBits' weight widths with CPU kernels (8: the int8w precision)
METHODS = ("rtn", "awq")
AWQ_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MS_DOMAIN = "com.microsoft"
DQ_BLOCK_OPSET = 21  # DequantizeLinear's block_size attribute and INT4 inputs


@dataclass(frozen=True)
class Int4Options:
    """The converter's choices (`echo-export build --precision-opt int4.<name>=<value>`)."""
    block_size: int = 32
    symmetric: bool = True  # False: a 4-bit zero point per block (onnxruntime only; no TensorRT form)
    method: str = "awq"
    vision: bool = False  # also quantise the vision tower and projector
    lm_head: bool = False  # also quantise the output head (the embedding's tied copy)
    accuracy_level: Optional[int] = None  # None: for this CPU (choose_accuracy_level)
    calib_rows: int = 256  # activation rows kept per weight for the AWQ search
    max_feeds: int = 32  # calibration feeds run per graph
    bits: int = 4  # 8: the int8w precision (weight-only 8-bit MatMulNBits), set by its converter

    @staticmethod
    def parse(opts: dict[str, str], bits: int = 4, prefix: str = "int4") -> "Int4Options":
        """From --precision-opt strings; unknown names and bad values are refused with the choices.
        `bits` is the precision's own (not an option); 8-bit defaults to RTN (its rounding error is
        1/16 of 4-bit's, so AWQ's calibration pass buys little)."""
        known = {k: v for k, v in asdict(Int4Options()).items() if k != "bits"}
        bad = sorted(set(opts) - set(known))
        if bad:
            raise PrecisionError(f"unknown {prefix} option(s) {', '.join(bad)}; known: {', '.join(known)}")
        if bits not in BITS:
            raise PrecisionError(f"{prefix}: {bits} bits; MatMulNBits here takes {BITS}")
        vals: dict = {}
        for k, v in opts.items():
            if k in ("symmetric", "vision", "lm_head"):
                if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise PrecisionError(f"{prefix}.{k}={v!r}: expected true or false")
                vals[k] = v.lower() in ("1", "true", "yes")
            elif k == "method":
                vals[k] = v.lower()
            else:
                try:
                    vals[k] = None if v.lower() in ("auto", "none") else int(v)
                except ValueError:
                    raise PrecisionError(f"{prefix}.{k}={v!r}: expected an integer") from None
        if bits == 8:
            vals.setdefault("method", "rtn")
        o = Int4Options(**vals, bits=bits)
        if o.block_size not in BLOCK_SIZES:
            raise PrecisionError(f"{prefix}.block_size={o.block_size}: choose from {BLOCK_SIZES}")
        if o.method not in METHODS:
            raise PrecisionError(f"{prefix}.method={o.method!r}: choose from {', '.join(METHODS)}")
        if o.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise PrecisionError(f"{prefix}.accuracy_level={o.accuracy_level}: choose from 0-4 or auto")
        return o


def check_options(opts: dict[str, str]) -> None:
    """The build's early check of --precision-opt int4.* (before any export)."""
    Int4Options.parse(opts)


def choose_accuracy_level(cpu=None) -> int:
    """MatMulNBits accuracy_level for the serving CPU: 4 (int8 activations per block) where MLAS has
    int8 dot-product kernels for 4-bit weights (x86 with AVX2 or VNNI, ARM64 with NEON), where it is
    the fast path; 1 (fp32 arithmetic) elsewhere."""
    from runtime.cpu_features import detect_cpu_features

    cpu = cpu or detect_cpu_features()
    if cpu.avx2 or cpu.avx512_vnni or cpu.avx_vnni or cpu.machine.lower() in ("aarch64", "arm64"):
        return 4
    return 1


# ------------------------------------------------------------------ blockwise quantisation


@dataclass
class QuantizedWeight:
    """W [K, N] as `bits`-bit integers q (0..2^bits-1, [N, K padded to blocks]), scales [N, blocks]
    and zero points [N, blocks] (2^(bits-1) everywhere when symmetric: MatMulNBits' default);
    `act_scale`: AWQ's per-input-channel divisor."""
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    block_size: int
    symmetric: bool
    act_scale: Optional[np.ndarray] = None
    bits: int = 4

    def dequantized(self) -> np.ndarray:
        """The [K, N] weight the quantised form computes with (AWQ's channel scale divided out)."""
        bs = self.block_size
        n, kp = self.q.shape
        w = (self.q.reshape(n, kp // bs, bs).astype(np.float32) - self.zero_points[:, :, None]) * self.scales[:, :, None]
        w = w.reshape(n, kp)[:, : self.k].T
        return w / self.act_scale[:, None] if self.act_scale is not None else w


def quantize_blockwise(w_kn: np.ndarray, block_size: int, symmetric: bool, bits: int = 4) -> QuantizedWeight:
    """Round-to-nearest `bits`-bit quantisation of W [K, N] in blocks of `block_size` along K."""
    k, n = w_kn.shape
    top, mid = (1 << bits) - 1, 1 << (bits - 1)  # 4 bits: levels 0..15, zero point 8; 8 bits: 0..255, 128
    nb = -(-k // block_size)
    w = np.zeros((n, nb * block_size), np.float32)
    w[:, :k] = w_kn.T  # padding rows are 0, which every block represents exactly
    w = w.reshape(n, nb, block_size)
    if symmetric:  # levels -(mid-1)..mid-1 around the stored zero point mid (MatMulNBits' default)
        scales = np.abs(w).max(axis=2) / (mid - 1)
        scales[scales == 0] = 1.0
        zp = np.full((n, nb), float(mid), np.float32)
    else:  # levels 0..top spanning [min, max] of the block (0 included, so padding stays exact)
        lo, hi = np.minimum(w.min(axis=2), 0.0), np.maximum(w.max(axis=2), 0.0)
        scales = (hi - lo) / top
        scales[scales == 0] = 1.0
        zp = np.clip(np.round(-lo / scales), 0, top)
    q = np.clip(np.round(w / scales[:, :, None]) + zp[:, :, None], 0, top).astype(np.uint8)
    return QuantizedWeight(q.reshape(n, -1), scales.astype(np.float32), zp.astype(np.float32), k, block_size, symmetric,
                           bits=bits)


QUANT_COLUMNS = 8192  # output columns quantised at a time: a 2 GB output head's temporaries stay small


def quantize_in_column_chunks(w_kn: np.ndarray, block_size: int, symmetric: bool,
                              act_scale: Optional[np.ndarray] = None, bits: int = 4) -> QuantizedWeight:
    """`quantize_blockwise` of W * act_scale (per input channel), a slice of N columns at a time: each
    column's blocks are independent, so the result is the whole-matrix one (`act_scale` is recorded)."""
    k, n = w_kn.shape
    parts = []
    for a in range(0, n, QUANT_COLUMNS):
        part = w_kn[:, a : a + QUANT_COLUMNS]
        parts.append(quantize_blockwise(part * act_scale[:, None] if act_scale is not None else part,
                                        block_size, symmetric, bits))
    qw = QuantizedWeight(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scales", "zero_points")),
                         k, block_size, symmetric, bits=bits)
    qw.act_scale = act_scale
    return qw


def awq_quantize(w_kn: np.ndarray, x_rows: np.ndarray, block_size: int, symmetric: bool,
                 bits: int = 4) -> tuple[QuantizedWeight, float]:
    """The channel scaling s = mean|x|^alpha (alpha in AWQ_ALPHAS) whose quantised weight gives the
    smallest output error ||x W - x Wq|| on the calibration rows; returns it and its alpha."""
    mean_abs = np.abs(x_rows).mean(axis=0).astype(np.float64) + 1e-8
    ref = x_rows @ w_kn
    best: tuple[float, Optional[QuantizedWeight], float] = (np.inf, None, 0.0)
    for alpha in AWQ_ALPHAS:
        s = mean_abs ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # centred: the weights keep their range
        qw = quantize_blockwise(w_kn * s[:, None], block_size, symmetric, bits)
        qw.act_scale = s if alpha else None
        err = float(np.square(x_rows @ qw.dequantized() - ref).sum())
        if err < best[0]:
            best = (err, qw, alpha)
    return best[1], best[2]


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 along the last axis, two per byte (first in the low nibble), padded to even."""
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _pack(v: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' byte layout of `bits`-bit values along the last axis: 4 bits two per byte, 8 bits as they are."""
    return _pack_nibbles(v) if bits == 4 else v.astype(np.uint8)


def _unpack_nibbles(b: np.ndarray, n: int) -> np.ndarray:
    out = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[:-1] + (-1,))
    return out[..., :n]


# ------------------------------------------------------------------ which weights


@dataclass(frozen=True)
class WeightMatMul:
    """A MatMul whose second input is a constant [K, N] weight (`transposed`: read through a
    Transpose of an initializer stored [N, K], as the tied lm_head is)."""
    node: str
    weight: str  # the initializer's name
    transposed: bool
    part: str  # "decoder", "vision" or "lm_head"


def _part_of(node: onnx.NodeProto) -> str:
    """Which module the exporter says a node came from (its `namespace` metadata)."""
    ns = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    if "model.vision" in ns:
        return "vision"
    return "lm_head" if "lm_head" in ns else "decoder"


def weight_matmuls(model: onnx.ModelProto, parts: Iterable[str]) -> list[WeightMatMul]:
    """The MatMuls of `parts` that read a 2-D float initializer as their weight."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type != "MatMul" or _part_of(n) not in parts:
            continue
        w, p = n.input[1], prod.get(n.input[1])
        transposed = p is not None and p.op_type == "Transpose" and p.input[0] in inits and \
            list(next((a.ints for a in p.attribute if a.name == "perm"), [1, 0])) == [1, 0]
        src = p.input[0] if transposed else w
        t = inits.get(src)
        if t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            out.append(WeightMatMul(n.name, src, transposed, _part_of(n)))
    return out


def quantised_parts(opts: Int4Options) -> tuple[str, ...]:
    return ("decoder",) + (("vision",) if opts.vision else ()) + (("lm_head",) if opts.lm_head else ())


def _staged_offset(t: onnx.TensorProto, source) -> Optional[int]:
    """Where a staged graph's initializer sits in `source` (a stream_export.DeferredWeights: the
    fp32 file that a build from the checkpoint's own dtype never writes), else None."""
    where = external_location(t) if source is not None else None
    return where[1] if where is not None and where[0] == source.name else None


def initializer_array(model: onnx.ModelProto, name: str, base: Path, source=None) -> np.ndarray:
    """An initializer in fp32: from the graph's weights file, or widened from the checkpoint's
    dtype where the graph is staged (`source`)."""
    t = next(t for t in model.graph.initializer if t.name == name)
    offset = _staged_offset(t, source)
    w = source.array(offset) if offset is not None else numpy_helper.to_array(t, base_dir=str(base))
    return w.astype(np.float32, copy=False)


def weight_kn(model: onnx.ModelProto, wm: WeightMatMul, base: Path, source=None) -> np.ndarray:
    """The weight [K, N] in fp32, one tensor at a time (initializer_array)."""
    w = initializer_array(model, wm.weight, base, source)
    return w.T if wm.transposed else w


HASH_ROWS = 4096  # rows of a weight hashed at a time: a transposed 2 GB head is not copied whole


def weight_key(w_kn: np.ndarray) -> str:
    """The same weight in every graph (prefill, step, each batch) gets the same key: its content
    (the sha256 of its C-order bytes, fed a slice of rows at a time)."""
    h = hashlib.sha256()
    for a in range(0, max(1, w_kn.shape[0]), HASH_ROWS):
        h.update(np.ascontiguousarray(w_kn[a : a + HASH_ROWS]).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ AWQ calibration


def activation_rows(graph: Path, feeds, inputs: dict[str, str], max_feeds: int, max_rows: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of the activations entering each weight MatMul, on recorded calibration feeds.

    `inputs`: weight key -> the MatMul's activation tensor name. The fp32 graph runs with those
    tensors as extra outputs (saved beside it, so its external weights resolve); up to `max_rows`
    rows per tensor are kept, drawn at random over every feed (every image and block position)."""
    import onnxruntime as ort

    from .precision import calibration_indices

    model = onnx.load(str(graph), load_external_data=False)
    names = sorted(set(inputs.values()))
    model.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    tmp = graph.with_name(graph.stem + ".int4-calib.onnx")
    onnx.save(model, str(tmp))
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
        feed_names = [i.name for i in sess.get_inputs()]
        parts: dict[str, list[np.ndarray]] = {t: [] for t in names}
        for i in calibration_indices(len(feeds), max_feeds):
            f = feeds[i]
            for t, x in zip(names, sess.run(names, {k: f[k] for k in feed_names})):
                parts[t].append(x.reshape(-1, x.shape[-1]))
        del sess
    finally:
        tmp.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    rows = {}
    for t, xs in parts.items():
        x = np.concatenate(xs)
        rows[t] = x[np.sort(rng.choice(len(x), max_rows, replace=False))] if len(x) > max_rows else x
    return {key: rows[t] for key, t in inputs.items()}


FP16_MAX = 65504.0


NBITS = {"int4": 4, "int8w": 8}  # the MatMulNBits precisions this module converts, by name


def awq_rows_wanted(precisions: Iterable[str], options: dict[str, dict[str, str]]) -> Optional[int]:
    """The calibration rows per layer that the MatMulNBits precisions asked with AWQ want (the
    most of them), or None when none uses AWQ."""
    rows = [o.calib_rows for p in precisions if p in NBITS
            for o in [Int4Options.parse(options.get(p, {}), NBITS[p], p)] if o.method == "awq"]
    return max(rows) if rows else None


def calibration_rows(b, parts: tuple[str, ...], max_feeds: int, max_rows: int, add_rows) -> None:
    """The activation rows entering each weight MatMul of `parts`, by weight key, handed to
    `add_rows` ({key: rows} per graph or phase): from the PyTorch decodes' hooks in a build from
    the checkpoint's dtype (build._int4_rows_from_pytorch), else by running each fp32 graph on its
    recorded calibration feeds. `b` is echo_export.build's _Build."""
    if b.stream:
        for rows in b.int4_rows:  # dropped with the staged graphs (another precision may read them too)
            add_rows(rows)
        return
    for (role, _, bs), src in sorted((k, v) for k, v in b.files.items() if k[1] == "fp32"):
        if (role, bs) not in b.calib:  # a teacher's block passes: the same weights as its block_step
            continue
        model = onnx.load(str(b.tmp / src), load_external_data=False)
        inputs = {}
        nodes = {n.name: n for n in model.graph.node}
        for wm in weight_matmuls(model, parts):
            inputs[weight_key(weight_kn(model, wm, b.tmp))] = nodes[wm.node].input[0]
        add_rows(activation_rows(b.tmp / src, b.calib[(role, bs)], inputs, max_feeds, max_rows))


class LinearInputRows:
    """AWQ's calibration rows taken from the PyTorch model as it decodes the calibration images:
    what `activation_rows` takes from the fp32 graphs, for a build from the checkpoint's own dtype
    that has no fp32 graphs to run. A forward pre-hook on every nn.Linear keeps a uniform random
    sample (a reservoir) of up to `max_rows` input rows per layer and decode phase (prefill, step:
    the two graphs the ONNX path samples separately). Rows are kept in fp16 (clipped to its range):
    at 7B that is about 1 GB for every layer's two reservoirs, where fp32 would be twice that."""

    def __init__(self, model, max_rows: int, seed: int = 0) -> None:
        from torch import nn

        self.max_rows = max_rows
        self.phase = "prefill"
        self._rng = np.random.default_rng(seed)
        self._modules = {id(m): m for m in model.modules() if isinstance(m, nn.Linear)}
        self._rows: dict[tuple[int, str], np.ndarray] = {}
        self._seen: dict[tuple[int, str], int] = {}
        self._hooks = [m.register_forward_pre_hook(self._take) for m in self._modules.values()]

    def during(self, phase: str, run):
        """`run` (a graph runner), marking what it computes as `phase`."""
        def wrapped(feeds):
            self.phase = phase
            return run(feeds)

        return wrapped

    def _take(self, module, args) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        slot_key = (id(module), self.phase)
        n = self._seen.get(slot_key, 0)
        if slot_key not in self._rows:
            self._rows[slot_key] = np.zeros((0, x.shape[1]), np.float16)
        idx = n + np.arange(x.shape[0])
        slots = np.where(idx < self.max_rows, idx, self._rng.integers(0, idx + 1))
        keep = np.flatnonzero(slots < self.max_rows)
        if keep.size:
            buf = self._rows[slot_key]
            top = int(slots[keep].max()) + 1
            if top > len(buf):  # the reservoir fills up to max_rows first
                buf = np.concatenate([buf, np.zeros((top - len(buf), buf.shape[1]), np.float16)])
            rows = x[keep].float().numpy()
            buf[slots[keep]] = np.clip(rows, -FP16_MAX, FP16_MAX).astype(np.float16)
            self._rows[slot_key] = buf
        self._seen[slot_key] = n + x.shape[0]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def by_weight(self) -> list[dict[str, np.ndarray]]:
        """One {weight key (`weight_key` of W [K, N] in fp32): rows} per phase, for WeightPlan.add_rows."""
        self.close()
        keys = {mid: weight_key(m.weight.detach().float().numpy().T) for mid, m in self._modules.items()
                if any((mid, ph) in self._rows for ph in ("prefill", "step"))}
        out = []
        for phase in ("prefill", "step"):
            rows = {keys[mid]: r for (mid, ph), r in self._rows.items() if ph == phase}
            if rows:
                out.append(rows)
        self._rows.clear()
        return out


class WeightPlan:
    """How each weight (by content) is quantised, the same in every graph of the build: RTN, or AWQ
    with a channel scaling searched once over the activation rows every graph contributed."""

    def __init__(self, opts: Int4Options) -> None:
        self.opts = opts
        self.rows: dict[str, list[np.ndarray]] = {}
        self.act_scale: dict[str, Optional[np.ndarray]] = {}
        self.alphas: dict[str, float] = {}

    def add_rows(self, rows: dict[str, np.ndarray]) -> None:
        for key, x in rows.items():
            self.rows.setdefault(key, []).append(x)

    def quantize(self, key: str, w_kn: np.ndarray) -> QuantizedWeight:
        o = self.opts
        if o.method == "awq" and key not in self.act_scale:
            rows = self.rows.pop(key, None)
            if not rows:
                raise PrecisionError("int4 awq: no calibration activations reached a weight (no feeds recorded?)")
            x = np.concatenate(rows).astype(np.float32, copy=False)  # up to calib_rows per graph (or phase)
            qw, self.alphas[key] = awq_quantize(w_kn, x, o.block_size, o.symmetric, o.bits)
            self.act_scale[key] = qw.act_scale
            return qw
        return quantize_in_column_chunks(w_kn, o.block_size, o.symmetric, self.act_scale.get(key), o.bits)


# ------------------------------------------------------------------ graphs


def _matmulnbits_nodes(wm: WeightMatMul, node: onnx.NodeProto, qw: QuantizedWeight, level: int):
    """(nodes, initializers) replacing `node`: [Mul by 1/s (AWQ)] -> MatMulNBits."""
    n, kp = qw.q.shape
    nb = kp // qw.block_size
    base = f"{wm.node}_int{qw.bits}"
    inits = [numpy_helper.from_array(_pack(qw.q.reshape(n, nb, qw.block_size), qw.bits), f"{base}_B"),
             numpy_helper.from_array(qw.scales, f"{base}_scales")]
    ins = [node.input[0], inits[0].name, inits[1].name]
    if not qw.symmetric:
        inits.append(numpy_helper.from_array(_pack(qw.zero_points.astype(np.uint8), qw.bits), f"{base}_zero_points"))
        ins.append(inits[-1].name)
    nodes = []
    if qw.act_scale is not None:  # x / s before the scaled weight (AWQ's pre_quant_scale)
        inits.append(numpy_helper.from_array((1.0 / qw.act_scale).astype(np.float32), f"{base}_inv_act_scale"))
        nodes.append(helper.make_node("Mul", [node.input[0], inits[-1].name], [f"{base}_x"], name=f"{base}_awq"))
        ins[0] = f"{base}_x"
    nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=f"{base}", domain=MS_DOMAIN,
                                  K=qw.k, N=n, bits=qw.bits, block_size=qw.block_size, accuracy_level=level))
    return nodes, inits


def _replace_nodes(model: onnx.ModelProto, new: dict[str, list[onnx.NodeProto]], inits: list) -> None:
    """Put each replaced node's nodes in its place, then drop what nothing reads any more (the
    lm_head's Transpose, the fp32 weights)."""
    g = model.graph
    nodes = [m for n in g.node for m in new.get(n.name, [n])]
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    still = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(still)
    del g.value_info[:]


def _stored(t: onnx.TensorProto, store, min_bytes: int) -> onnx.TensorProto:
    """A new in-memory initializer of at least `min_bytes`, written to `store` and pointing there."""
    from .external_weights import point_to

    if t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
        point_to(t, store.name, *store.add(t.raw_data))
    return t


def _store_initializers(model: onnx.ModelProto, base: Path, store, min_bytes: int, source=None) -> None:
    """Every initializer of at least `min_bytes` into `store` (weights.int4.bin), one at a time:
    the untouched fp32 ones (embedding, norms, a kept vision tower) read from the fp32 weights file,
    or from `source` where the graph is staged (widened from the checkpoint's dtype). Those already
    in `store` (the quantised weights, stored as they were made) stay where they are."""
    from .external_weights import point_to, tensor_bytes

    for t in model.graph.initializer:
        where = external_location(t)
        if where is not None and where[0] == store.name:
            continue
        offset = _staged_offset(t, source)
        data = source.raw(offset) if offset is not None else tensor_bytes(t, base)
        if len(data) >= min_bytes:
            offset, length = store.add(data)
            point_to(t, store.name, offset, length)
        del data  # before the next one is read: two 2.2 GB fp32 tables at 7B (embedding, head) otherwise
    store.flush()


def rewrite_weight_matmuls(src: Path, dst: Path, parts: tuple[str, ...], make_nodes, store, min_bytes: int = 1024,
                           source=None, other_nodes=None) -> dict:
    """Replace every weight MatMul of `parts` in the fp32 graph `src` by what `make_nodes(wm, node,
    w_kn)` returns, (nodes, initializers); write the graph to `dst`, its tensors in `store`.
    `source`: the DeferredWeights of a staged `src` (a build from the checkpoint's dtype), else None.
    `other_nodes(model)`: ({node name: its replacement nodes}, initializers) for nodes that are not
    weight MatMuls (int8dyn's smoothing folded into a norm's weight). The int4/int8w converter and
    the int8dyn one (echo_export/int8_dynamic.py) share it."""
    from .precision import name_nodes

    model = onnx.load(str(src), load_external_data=False)
    name_nodes(model)
    by_name = {n.name: n for n in model.graph.node}
    new, inits, counts = {}, [], {}
    for wm in weight_matmuls(model, parts):
        w = weight_kn(model, wm, src.parent, source)
        new[wm.node], more = make_nodes(wm, by_name[wm.node], w)
        del w
        inits += [_stored(t, store, min_bytes) for t in more]  # out of memory at once: 4 GB of them at 7B
        counts[wm.part] = counts.get(wm.part, 0) + 1
    if not new:
        raise PrecisionError(f"{src}: no weight MatMul of {', '.join(parts)} to quantise")
    if other_nodes is not None:
        more_nodes, more = other_nodes(model)
        new.update(more_nodes)
        inits += [_stored(t, store, min_bytes) for t in more]
    _replace_nodes(model, new, inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _store_initializers(model, src.parent, store, min_bytes, source)
    onnx.save(model, str(dst))
    return {"replaced": len(new), "by_part": counts}


def to_int4(src: Path, dst: Path, plan: WeightPlan, level: int, store, min_bytes: int = 1024, source=None) -> dict:
    """The int4 (MatMulNBits) graph of the fp32 graph `src`, its tensors in `store`; `source`: the
    DeferredWeights of a staged `src` (a build from the checkpoint's dtype), else None."""
    def make(wm: WeightMatMul, node: onnx.NodeProto, w: np.ndarray):
        return _matmulnbits_nodes(wm, node, plan.quantize(weight_key(w), w), level)

    info = rewrite_weight_matmuls(src, dst, quantised_parts(plan.opts), make, store, min_bytes, source)
    return {"matmulnbits": info["replaced"], "by_part": info["by_part"]}


def _int4_tensor(values: np.ndarray, name: str) -> onnx.TensorProto:
    """A signed INT4 initializer (values -8..7), two per byte, first in the low nibble (ONNX's packing)."""
    t = onnx.TensorProto()
    t.name, t.data_type = name, onnx.TensorProto.INT4
    t.dims.extend(values.shape)
    t.raw_data = _pack_nibbles((values.reshape(-1).astype(np.int8) & 0x0F).astype(np.uint8)).tobytes()
    return t


def _dq_nodes(node: onnx.NodeProto, arrays: list[np.ndarray]):
    """(nodes, initializers) replacing one MatMulNBits: DequantizeLinear(INT4 [K, N], scales [blocks,
    N], axis 0, block_size) -> MatMul. The integers and scales are the MatMulNBits ones, unchanged."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    if len(arrays) > 3 and arrays[3] is not None:
        raise PrecisionError(f"{node.name}: asymmetric int4 (a zero point per block) has no TensorRT form: TensorRT's "
                             "DequantizeLinear takes a zero point of 0 only; build int4 with int4.symmetric=true")
    packed, scales = arrays[1], arrays[2].reshape(n, -1)
    q = _unpack_nibbles(packed.reshape(n, -1), packed.shape[1] * bs)[:, :k].astype(np.int16) - 8  # [N, K]
    w = _int4_tensor(np.ascontiguousarray(q.T), f"{node.name}_w_int4")
    s = numpy_helper.from_array(np.ascontiguousarray(scales.T.astype(np.float32)), f"{node.name}_w_scale")
    dq = helper.make_node("DequantizeLinear", [w.name, s.name], [f"{node.name}_w"], name=f"{node.name}_dq",
                          axis=0, block_size=bs)
    mm = helper.make_node("MatMul", [node.input[0], dq.output[0]], list(node.output), name=f"{node.name}_matmul")
    return [dq, mm], [w, s]


def int4_dq_for_tensorrt(src: str | Path, dst: str | Path) -> dict:
    """Rewrite an int4 MatMulNBits graph into the form TensorRT parses (module docstring): blockwise
    INT4 DequantizeLinear + MatMul, opset 21, no com.microsoft operator. The other initializers stay
    where they are (weights.int4.bin); the INT4 weights, in TensorRT's [K, N] layout, go to
    `<dst>.data` beside it (or, for a dst in another folder, everything goes to `<dst>.data`)."""
    from .external_weights import WeightsFile, point_to
    from .precision import save_graph

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name], base_dir=str(src.parent)) if name in inits else None  # noqa: E731
    beside = dst.resolve().parent == src.resolve().parent
    store = WeightsFile(dst.parent, dst.name + ".data") if beside else None
    new, added = {}, []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            new[node.name], more = _dq_nodes(node, [None] + [arr(i) for i in node.input[1:]])
            for t in more:  # each INT4 weight to <dst>.data as it is made, not all held (3.3 GB at 7B)
                if store is not None and t.data_type == onnx.TensorProto.INT4:
                    point_to(t, store.name, *store.add(t.raw_data))
            added += more
    _replace_nodes(model, new, added)
    keep = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", MS_DOMAIN)]
    keep += [helper.make_opsetid("", max(DQ_BLOCK_OPSET, *[o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]))]
    if any(n.domain == MS_DOMAIN for n in model.graph.node):
        keep.append(helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if store is None:  # elsewhere: take every weight along
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
        save_graph(model, dst, external=True)
    else:
        store.close()
        onnx.save(model, str(dst))
    return {"dequantize_linear_int4": len(new), "opset": DQ_BLOCK_OPSET}


def int8w_for_tensorrt(src: str | Path, dst: str | Path) -> dict:
    """int8w has no TensorRT form: TensorRT's blockwise DequantizeLinear takes INT4 weights only
    (8-bit weights go to TensorRT as the int8 precision's per-channel QDQ)."""
    raise PrecisionError("int8w (blockwise 8-bit MatMulNBits) has no TensorRT form: TensorRT's blockwise "
                         "DequantizeLinear takes INT4 only; build int8 for TensorRT")


# ------------------------------------------------------------------ the build phase


def build_int4(b, calib_px: Optional[list[np.ndarray]] = None, precision: str = "int4", bits: int = 4) -> None:
    """The registry's int4 converter: every fp32 graph of the build -> its int4 graph, the tensors
    in weights.int4.bin. `b` is echo_export.build's _Build; its calibration feeds drive AWQ.
    `precision`/`bits`: the same conversion for int8w (build_int8w)."""
    from runtime import graph_io as gio

    from .external_weights import file_size_text

    opts = Int4Options.parse(b.opts.precision_options.get(precision, {}), bits, precision)
    level = choose_accuracy_level() if opts.accuracy_level is None else opts.accuracy_level
    b.meter.start(precision)
    b.log(f"[{precision}] {opts.method}, block {opts.block_size}, {'symmetric' if opts.symmetric else 'asymmetric'}, "
          f"accuracy_level {level}; quantised: {', '.join(quantised_parts(opts))}")
    sources = sorted((k, v) for k, v in b.files.items() if k[1] == "fp32")
    if not sources:  # the fp32 graphs are its source (their weights are read one at a time)
        raise PrecisionError(f"{precision} converts the fp32 graphs, and this build has none")
    plan = WeightPlan(opts)
    staged = b.deferred if b.stream else None  # the graphs' weights are the checkpoint's, widened when read
    if opts.method == "awq":  # every graph's activations first: one scaling per weight for all graphs
        calibration_rows(b, quantised_parts(opts), opts.max_feeds, opts.calib_rows, plan.add_rows)
    info: dict = {}
    for (role, _, bs), src in sources:
        name = gio.graph_filename(role, precision, bs)
        info = to_int4(b.tmp / src, b.tmp / name, plan, level, b.store(precision), b.opts.weights_min_bytes, staged)
        onnx.checker.check_model(str(b.tmp / name), full_check=True)
        b.log(f"  {name:<34} {file_size_text(b.tmp / name):>10}  {info['matmulnbits']} MatMulNBits {info['by_part']}")
        b.add_graph((role, precision, bs), name)
    alphas = sorted(plan.alphas.values())
    b.precision_info[precision] = {
        **asdict(opts), "accuracy_level": level, "accuracy_level_requested": opts.accuracy_level or "auto",
        "quantized_parts": list(quantised_parts(opts)), "awq_alpha_median": float(np.median(alphas)) if alphas else None,
        "tensorrt_form": "DequantizeLinear(INT4, block_size) + MatMul, opset 21" if opts.symmetric and bits == 4 else None}
    b.meter.stop()


def build_int8w(b, calib_px: Optional[list[np.ndarray]] = None) -> None:
    """The registry's int8w converter: int4's conversion with 8-bit MatMulNBits (weight-only, blockwise
    scales, activations fp32), the tensors in weights.int8w.bin; RTN unless int8w.method=awq."""
    build_int4(b, calib_px, precision="int8w", bits=8)
