"""Export in the checkpoint's dtype: fp32-typed graphs whose weights are never all in fp32 at once.

The graphs are fp32 graphs (the fp16 converter and its fp32 islands start from one), but a 7B
model in fp32 is 33 GB on a 24 GB machine. So the model stays in its checkpoint's dtype (bf16:
16.6 GB) and, for the export only, each parameter is swapped for an fp32 placeholder that is
never written (torch.empty: address space, no resident pages; tracing reads shapes only). The
exported graph's initializers that wrap a placeholder become `onnx_ir.LazyTensor`s that convert
the real parameter to fp32 when (and only when) their bytes are asked for, one tensor at a time.

onnxscript's optimiser folds Transpose(weight) whatever its size, which would compute every
transposed weight in memory (the whole model in fp32 again). It runs here with that rule off;
the transposes of lazy weights are then folded lazily (`_fold_lazy_transposes`), and the usual
optimiser runs once more, so the graph comes out as the ordinary export's (tests compare them).

`DeferredWeights` is the store of an fp32 graph that is not kept (fp32 not asked for): it
records where each tensor would be and hands the fp16 conversion its fp32 values, one tensor at
a time; no weights.fp32.bin is written.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn


@contextmanager
def fp32_placeholders(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Swap every floating parameter for an unwritten fp32 tensor of its shape while inside;
    yields {placeholder data_ptr: the real parameter}. Tied parameters share one placeholder.
    Restored on exit, so the model (in its own dtype) serves the reference decodes after."""
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    made: dict[int, nn.Parameter] = {}
    sources: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point():
                continue
            if id(p) not in made:
                made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                sources[made[id(p)].data_ptr()] = p
            saved.append((module, name, p))
            module._parameters[name] = made[id(p)]
    try:
        yield sources
    finally:
        for module, name, p in saved:
            module._parameters[name] = p


CHUNK_ELEMENTS = 1 << 20  # a parameter is widened this many elements at a time when converted


def _lazy(read: Callable[[], np.ndarray], dtype, shape):
    import onnx_ir as ir

    return ir.LazyTensor(lambda: ir.tensor(read()), dtype=dtype, shape=shape)


def _param_tensor(p: torch.Tensor, transposed: bool = False):
    """A lazy fp32 initializer of parameter `p` (or of its 2-D transpose) that the fp16 conversion
    can also read a few rows at a time (`fp16_of`): the 7B embedding is 2.2 GB in fp32."""
    import onnx_ir as ir

    shape = ir.Shape(list(reversed(p.shape)) if transposed else list(p.shape))
    t = _lazy(lambda: _read_whole(p, transposed), ir.DataType.FLOAT, shape)
    _PARAMS[id(t)] = (t, p, transposed)  # the tensor itself is kept too, so its id stays its own
    return t


_PARAMS: dict[int, tuple[object, torch.Tensor, bool]] = {}
# while optimising, a weight read whole past this size means the optimiser folded a large weight
# (the whole model in fp32 again, at real size): refused, rather than found by the kernel's OOM killer
GUARD_ELEMENTS = 1 << 22
_GUARD = [False]


def _read_whole(p: torch.Tensor, transposed: bool) -> np.ndarray:
    if _GUARD[0] and p.numel() > GUARD_ELEMENTS:
        raise RuntimeError(f"the ONNX optimiser read a {list(p.shape)} weight while exporting: it would fold "
                           "large weights into new fp32 tensors (onnxscript's folding rules changed?)")
    a = p.detach().float().numpy()
    return np.ascontiguousarray(a.T) if transposed else a


def lazy_params_held() -> int:
    """How many model parameters staged graphs hold lazily now (0 once release_params ran)."""
    return len(_PARAMS)


def release_params() -> None:
    """Forget the lazy parameters made so far (they hold the model's tensors): after their bytes
    are written (an fp32 export) or converted (the staged graphs, once fp16 is done)."""
    _PARAMS.clear()


def fp16_of(t, convert: Callable[[np.ndarray, np.ndarray], None]):
    """t's values as an fp16 array, `convert(fp32 chunk, fp16 out)` writing each chunk: a lazy
    parameter is widened CHUNK_ELEMENTS at a time (rows of the parameter; columns of its
    transpose), anything else whole."""
    return _chunked(t, np.float16, convert)


def fp32_of(t) -> np.ndarray:
    """t's values in fp32, a lazy parameter widened a chunk at a time into one array (a weight the
    fp16 graph keeps fp32, the lm_head: whole-and-copied it was twice its 2.2 GB at 7B)."""
    def copy(a: np.ndarray, out: np.ndarray) -> None:
        out[:] = a

    return _chunked(t, np.float32, copy)


def _chunked(t, dtype, convert: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    entry = _PARAMS.get(id(t))
    if entry is None:
        a = t.numpy()
        out = np.empty(a.shape, dtype)
        convert(a.reshape(-1), out.reshape(-1))
        return out
    _, p, transposed = entry
    rows = p.reshape(p.shape[0], -1)
    out = np.empty((rows.shape[1], rows.shape[0]) if transposed else rows.shape, dtype)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for a in range(0, rows.shape[0], step):
        part = rows[a : a + step].detach().float().numpy()
        if transposed:
            tmp = np.empty(part.shape, dtype)
            convert(part.reshape(-1), tmp.reshape(-1))
            out[:, a : a + step] = tmp.T
        else:
            convert(part.reshape(-1), out[a : a + step].reshape(-1))
    return out


def lazy_initializers(model, sources: dict[int, torch.Tensor]) -> int:
    """Make the initializers of an exported (unoptimised) onnx_ir Model that wrap a placeholder
    read their real parameter lazily, then optimise as the exporter would. Returns how many."""
    import onnx_ir as ir

    n = 0
    for value in model.graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.data_ptr() in sources and raw.dtype == torch.float32:
            value.const_value = _param_tensor(sources[raw.data_ptr()])
            n += 1
    _GUARD[0] = True
    try:
        _optimise(model, fold_large_transposes=False)
        _fold_lazy_transposes(model)
        _optimise(model, fold_large_transposes=True)
    finally:
        _GUARD[0] = False
    return n


def _optimise(model, fold_large_transposes: bool) -> None:
    """The exporter's optimiser (onnxscript), with or without its fold-any-size Transpose rule."""
    from onnxscript.optimizer import _constant_folding as cf
    from torch.onnx._internal.exporter import _onnx_program

    rule = cf._DEFAULT_ALWAYS_FOLD_OPS
    if not fold_large_transposes:
        cf._DEFAULT_ALWAYS_FOLD_OPS = frozenset()
    try:
        _onnx_program.onnxscript_apis.optimize(model)
    finally:
        cf._DEFAULT_ALWAYS_FOLD_OPS = rule


def _fold_lazy_transposes(model) -> int:
    """Transpose(lazy weight) -> a lazy transposed weight (named as the Transpose's output, as the
    optimiser names what it folds), where the Transpose is the weight's only reader."""
    import onnx_ir as ir

    g = model.graph
    folded = 0
    for node in list(g):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        t = src.const_value if src is not None and src.is_initializer() else None
        if not isinstance(t, ir.LazyTensor) or len(src.uses()) != 1:
            continue
        perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
        if id(t) not in _PARAMS or len(t.shape) != 2 or perm not in (None, [1, 0]):
            continue  # only a linear layer's weight.T is expected here; anything else stays a Transpose
        out = node.outputs[0]
        lazy = _param_tensor(_PARAMS[id(t)][1], transposed=not _PARAMS[id(t)][2])
        new = ir.Value(name=out.name, shape=lazy.shape, type=ir.TensorType(t.dtype), const_value=lazy)
        ir.convenience.replace_all_uses_with(out, new)
        if out.is_graph_output():
            continue  # never a weight's transpose in our graphs; leave it as it is
        g.remove(node, safe=True)
        g.initializers.pop(src.name)
        g.register_initializer(new)
        folded += 1
    return folded


class DeferredWeights:
    """The weights store of an fp32 graph that is not kept: `add_tensor` records a tensor under
    an offset it would have in weights.fp32.bin, and `array` gives its values back (a lazy tensor
    converts its parameter again, so only one is in fp32 at a time)."""

    def __init__(self, folder: Path, name: str = "weights.fp32.bin") -> None:
        self.folder, self.name = Path(folder), name
        self._tensors: dict[int, object] = {}
        self._next = 0
        self.tensors_stored = 0
        self.bytes_stored = 0

    def add_tensor(self, t) -> tuple[int, int]:
        offset, length = self._next, int(t.nbytes)
        self._tensors[offset] = t
        self._next += max(length, 1)
        self.tensors_stored += 1
        self.bytes_stored += length
        return offset, length

    def array(self, offset: int) -> np.ndarray:
        return self._tensors[offset].numpy()

    def fp16(self, offset: int, convert: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
        return fp16_of(self._tensors[offset], convert)

    def raw(self, offset: int) -> bytes | memoryview:
        t = self._tensors[offset]
        if id(t) in _PARAMS:  # a weight kept fp32: built a chunk at a time, not copied again
            return memoryview(fp32_of(t).reshape(-1).view(np.uint8))
        return t.tobytes()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def defer_initializers(model, store: DeferredWeights, min_bytes: int) -> int:
    """store_initializers' twin for a DeferredWeights: initializers of at least `min_bytes` point
    at their (unwritten) place in the store's file; nothing is converted or copied here."""
    import onnx_ir as ir

    referenced = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None or t.nbytes < min_bytes or isinstance(t, ir.StringTensor):
            continue
        offset, length = store.add_tensor(t)
        value.const_value = ir.ExternalTensor(store.name, offset, length, t.dtype, shape=t.shape, name=value.name,
                                              base_dir=str(store.folder))
        referenced += length
    return referenced


SUBTREE_WIDEN_BYTES = 1.5e9  # a module whose parameters are at most this in fp32 is widened whole


def _narrow_params(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The non-fp32 float parameters to widen for a module's forward: its whole subtree's where
    that is at most SUBTREE_WIDEN_BYTES in fp32 (a parent may read a descendant's weight dtype
    before it runs: transformers' ViT casts the pixels to patch_embeddings.projection.weight.dtype),
    else its own and its children's (a 7B decoder layer is 0.9 GB in fp32, the whole model 33).
    Embeddings widen their looked-up rows instead (exact, and 2 GB less at 7B)."""
    def own(ms) -> list[tuple[nn.Module, str, nn.Parameter]]:
        return [(m, k, p) for m in ms if not isinstance(m, nn.Embedding) for k, p in m._parameters.items()
                if p is not None and p.is_floating_point() and p.dtype != torch.float32]

    whole = own(module.modules())
    if sum(p.numel() for _, _, p in whole) * 4 <= SUBTREE_WIDEN_BYTES:
        return whole
    return own((module, *module.children()))


@contextmanager
def fp32_compute(model: nn.Module) -> Iterator[None]:
    """While inside, every module runs its forward on fp32 copies of its (and its children's)
    bf16/fp16 parameters, made on entry and dropped on exit, and an embedding lookup's rows are
    widened after it (exact): the model kept in bf16 computes what its fp32 twin computes, holding
    a few modules' fp32 weights at a time. The reference the graphs are verified against stays fp32."""
    stack: list[list[tuple[nn.Module, str, nn.Parameter]]] = []

    def widen(module: nn.Module, _args) -> None:
        saved = _narrow_params(module)
        for m, k, p in saved:
            m._parameters[k] = nn.Parameter(p.detach().to(torch.float32), requires_grad=False)
        stack.append(saved)

    def narrow(module: nn.Module, _args, _out) -> None:
        for m, k, p in stack.pop():
            m._parameters[k] = p

    def widen_rows(module: nn.Module, _args, out: torch.Tensor) -> torch.Tensor:
        return out.float()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            handles.append(m.register_forward_hook(widen_rows))
        elif _narrow_params(m):
            handles += [m.register_forward_pre_hook(widen), m.register_forward_hook(narrow)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
