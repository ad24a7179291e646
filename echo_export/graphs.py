"""nn.Module wrappers with the exact IO of `runtime/graph_io.py`, ready for fixed-shape export.

Every attention pattern comes from `echo_train.model.masks.build_attention_mask` (static,
precomputed as a buffer); the only runtime-dependent part of a mask is "cache slot j is
valid iff j < past_len", which is a comparison, not a second mask implementation.

Cache slots at or beyond past_len are masked out, but they are still multiplied by zero
attention weights: the caller must keep them finite (zero-initialised buffers).
"""
from __future__ import annotations

import torch
from torch import nn

from echo_train.model.backbone import KV, exclude_token
from echo_train.model.echo_model import EchoModel
from echo_train.model.masks import NOISY, block_layout, build_attention_mask, causal_layout, fused_layout
from runtime import graph_io
from runtime.schedule import BlockLayout, excludes_mask_token, fused_block_slice

from .inplace_steps import ArStepInPlaceGraph, BlockStepInPlaceGraph, inplace_example_inputs


def _split_past(past_key: torch.Tensor, past_value: torch.Tensor) -> list[KV]:
    return [(past_key[i], past_value[i]) for i in range(past_key.shape[0])]


def _stack_present(kv: list[KV], keep: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ks = [k if keep is None else k[:, :, keep] for k, _ in kv]
    vs = [v if keep is None else v[:, :, keep] for _, v in kv]
    return torch.stack(ks, 0), torch.stack(vs, 0)


def _cache_mask(past_len: torch.Tensor, capacity: int, n_query: int, device) -> torch.Tensor:
    """[b, T, CAP] bool: slot j is attendable iff j < past_len[b] (every cached token is clean & earlier)."""
    slots = torch.arange(capacity, device=device)
    valid = slots[None, :] < past_len[:, None]
    return valid[:, None, :].expand(past_len.shape[0], n_query, capacity)


class VisionPrefillGraph(nn.Module):
    """pixel_values f32[b,1,S,S], prefix_ids i64[b,P] -> present_key/value f32[L,b,kvH,c-B,dh].

    Over the prompt's whole blocks (c = floor(P/B)*B) minus the last one (that block is the first
    fused pass's previous block, fed again as token ids; the prompt's tail after c is decoded in
    response block 0), block-causal or causal as the model's context (cfg.causal_context).
    """

    input_names = graph_io.PREFILL_INPUTS
    output_names = graph_io.PREFILL_OUTPUTS

    def __init__(self, model: EchoModel, prefix_len: int) -> None:
        super().__init__()
        self.model = model
        B = model.cfg.block_size
        self.n_pre = BlockLayout(prefix_len, B).fused_prefill_len
        layout = block_layout(self.n_pre, B, kind=model.cfg.context_kind)
        self.register_buffer("mask", build_attention_mask(layout)[None], persistent=False)
        self.register_buffer("positions", layout.position[None].clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor, prefix_ids: torch.Tensor):
        b = pixel_values.shape[0]
        embeds = self.model.embed_prefix(pixel_values, prefix_ids)[:, : self.n_pre]
        _, kv = self.model.lm(embeds, self.positions.expand(b, -1), self.mask)
        return _stack_present(kv)


class NativePrefillGraph(nn.Module):
    """One image at its own grid + the prompt ids before the last whole block -> their KV
    (graph_io: the native vision_prefill). Block-causal over the grid from position 0 (the official
    layout), built from the token count in the graph, so every shape stays dynamic."""

    input_names = graph_io.NATIVE_PREFILL_INPUTS
    output_names = graph_io.PREFILL_OUTPUTS

    def __init__(self, model: EchoModel) -> None:
        super().__init__()
        self.model, self.B = model, model.cfg.block_size

    def forward(self, pixel_patches, patch_rc, window_gather, window_valid, window_inverse, prefix_ids, position_ids):
        embeds = self.model.embed_prefix_native(prefix_ids, pixel_patches, patch_rc, window_gather, window_valid,
                                                window_inverse)
        # truncating division (the indices are >= 0): floor division exports a sign test that TensorRT refuses
        block = torch.div(torch.arange(prefix_ids.shape[1], device=prefix_ids.device), self.B, rounding_mode="trunc")
        mask = (block[None, :] <= block[:, None])[None]
        _, kv = self.model.lm(embeds, position_ids, mask)
        return _stack_present(kv)


def native_example_inputs(cfg, capacity: int) -> tuple[torch.Tensor, ...]:
    """Inputs of a real image at a non-square grid of several windows, for the dynamic export."""
    import numpy as np

    from runtime.native_image import VisionGridSpec, mrope_position_ids, native_image

    spec = VisionGridSpec.from_config(cfg.to_dict()["vision"])
    side = spec.window_size * 2 + spec.factor  # 2 windows and a partial one a side: padded windows live
    spec = VisionGridSpec(**{**spec.__dict__, "min_pixels": side * side // 2, "max_pixels": side * side})
    img = native_image((np.arange(side * (side - spec.factor)) % 251).reshape(side - spec.factor, side).astype(np.float32), spec)
    t = cfg.prompt_template
    P = len(t.before) + img.n_tokens + len(t.after)
    n_pre = BlockLayout(P, cfg.block_size).fused_prefill_len
    ids = torch.tensor([list(t.before) + [0] * img.n_tokens + list(t.after)])[:, :n_pre]
    pos, _ = mrope_position_ids(P, len(t.before), *img.llm_grid)
    arrays = (img.patches, img.patch_rc, img.window_gather, img.window_valid, img.window_inverse)
    return (*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays), ids,
            torch.from_numpy(pos[:, None, :n_pre].copy()))


def native_dynamic_shapes() -> dict[str, dict[int, object]]:
    """torch.export dims of the native prefill's inputs: patches n, windows w, tokens T."""
    from torch.export import Dim

    n, w, t = Dim("patches", min=4), Dim("windows", min=1), Dim("tokens", min=1)
    return {"pixel_patches": {0: n}, "patch_rc": {0: n}, "window_gather": {0: w}, "window_valid": {0: w},
            "window_inverse": {0: n}, "prefix_ids": {1: t}, "position_ids": {2: t}}


class BlockStepGraph(nn.Module):
    """One fused one-step pass: [previous block CLEAN, current block NOISY] against the cache.

    input_ids i64[b,2B], position_ids i64[b,2B], past_key/value f32[L,b,kvH,CAP,dh], past_len i64[b]
    -> tokens i64[b,B], confidence f32[b,B], present_key/value f32[L,b,kvH,B,dh].
    """

    input_names = graph_io.STEP_INPUTS
    output_names = graph_io.BLOCK_STEP_OUTPUTS

    def __init__(self, model: EchoModel, capacity: int, mask_id: int) -> None:
        super().__init__()
        self.model, self.capacity, self.mask_id = model, capacity, mask_id
        B = self.B = model.cfg.block_size
        # positions are relative here: only the block structure of the 2B tokens matters
        static = build_attention_mask(fused_layout(BlockLayout(B, B), 0, model.cfg.context_kind))
        self.register_buffer("self_mask", static[None], persistent=False)

    def forward(self, input_ids, position_ids, past_key, past_value, past_len):
        b, t = input_ids.shape
        B = self.B
        mask = torch.cat(
            [_cache_mask(past_len, self.capacity, t, input_ids.device), self.self_mask.expand(b, t, t)], -1
        )
        h, kv = self.model.lm(self.model.embed_tokens(input_ids), position_ids, mask, _split_past(past_key, past_value))
        read = fused_block_slice(B, self.model.cfg.shifted_prediction)
        logits = self.model.lm.lm_head(h[:, read]).float()
        if excludes_mask_token(self.model.cfg.decode_layout):  # the official layout's argmax takes every id
            logits = exclude_token(logits, self.mask_id)
        tokens = logits.argmax(-1)
        confidence = torch.softmax(logits, -1).amax(-1)
        pk, pv = _stack_present(kv, slice(0, B))
        return tokens, confidence, pk.float(), pv.float()


class BlockPassGraph(nn.Module):
    """One multi-step pass over a single block of B tokens against the cache (graph_io block_denoise /
    block_commit): a noisy block (denoise: its KV is not kept) or a finished one in the model's
    context attention (commit). Outputs each position's own argmax and confidence; the runtime reads
    them shifted where the model predicts token j from position j-1."""

    input_names = graph_io.STEP_INPUTS
    output_names = graph_io.BLOCK_PASS_OUTPUTS

    def __init__(self, model: EchoModel, capacity: int, mask_id: int, commit: bool) -> None:
        super().__init__()
        self.model, self.capacity, self.mask_id = model, capacity, mask_id
        B = model.cfg.block_size
        kind = model.cfg.context_kind if commit else NOISY
        layout = block_layout(B, B, start=B, kind=kind, copy=0 if commit else 1)  # relative positions suffice
        self.register_buffer("self_mask", build_attention_mask(layout)[None], persistent=False)

    def forward(self, input_ids, position_ids, past_key, past_value, past_len):
        b, t = input_ids.shape
        mask = torch.cat(
            [_cache_mask(past_len, self.capacity, t, input_ids.device), self.self_mask.expand(b, t, t)], -1
        )
        h, kv = self.model.lm(self.model.embed_tokens(input_ids), position_ids, mask, _split_past(past_key, past_value))
        logits = self.model.lm.lm_head(h).float()
        if excludes_mask_token(self.model.cfg.decode_layout):
            logits = exclude_token(logits, self.mask_id)
        pk, pv = _stack_present(kv)
        return logits.argmax(-1), torch.softmax(logits, -1).amax(-1), pk.float(), pv.float()


class ArPrefillGraph(nn.Module):
    """pixel_values, prefix_ids -> tokens i64[b,1], present_key/value f32[L,b,kvH,P,dh] (causal)."""

    input_names = graph_io.PREFILL_INPUTS
    output_names = graph_io.AR_PREFILL_OUTPUTS

    def __init__(self, model: EchoModel, prefix_len: int, mask_id: int) -> None:
        super().__init__()
        self.model, self.mask_id = model, mask_id
        layout = causal_layout(prefix_len)
        self.register_buffer("mask", build_attention_mask(layout)[None], persistent=False)
        self.register_buffer("positions", layout.position[None].clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor, prefix_ids: torch.Tensor):
        b = pixel_values.shape[0]
        embeds = self.model.embed_prefix(pixel_values, prefix_ids)
        h, kv = self.model.lm(embeds, self.positions.expand(b, -1), self.mask)
        logits = exclude_token(self.model.lm.lm_head(h[:, -1:]).float(), self.mask_id)
        pk, pv = _stack_present(kv)
        return logits.argmax(-1), pk.float(), pv.float()


class ArStepGraph(nn.Module):
    """input_ids i64[b,1], position_ids i64[b,1], past_key/value, past_len -> tokens i64[b,1], present f32[L,b,kvH,1,dh]."""

    input_names = graph_io.STEP_INPUTS
    output_names = graph_io.AR_STEP_OUTPUTS

    def __init__(self, model: EchoModel, capacity: int, mask_id: int) -> None:
        super().__init__()
        self.model, self.capacity, self.mask_id = model, capacity, mask_id
        self.register_buffer("self_mask", build_attention_mask(causal_layout(1))[None], persistent=False)

    def forward(self, input_ids, position_ids, past_key, past_value, past_len):
        b, t = input_ids.shape
        mask = torch.cat(
            [_cache_mask(past_len, self.capacity, t, input_ids.device), self.self_mask.expand(b, t, t)], -1
        )
        h, kv = self.model.lm(self.model.embed_tokens(input_ids), position_ids, mask, _split_past(past_key, past_value))
        logits = exclude_token(self.model.lm.lm_head(h).float(), self.mask_id)
        pk, pv = _stack_present(kv)
        return logits.argmax(-1), pk.float(), pv.float()


def example_inputs(role: str, cfg, batch: int, capacity: int, prefix_len: int) -> tuple[torch.Tensor, ...]:
    """Dummy inputs of the fixed export shapes (values chosen so every code path is live)."""
    lm = cfg.lm
    S = cfg.vision.image_size
    if role == graph_io.VISION_PREFILL and cfg.vision.native:
        return native_example_inputs(cfg, capacity)
    if role in (graph_io.VISION_PREFILL, graph_io.AR_PREFILL):
        return (torch.zeros(batch, 1, S, S), torch.zeros(batch, prefix_len, dtype=torch.long))
    if role in graph_io.CPU_ONLY_ROLES:
        return inplace_example_inputs(cfg, batch, capacity, role)
    t = graph_io.step_width(role, cfg.block_size)
    kv = torch.zeros(lm.num_hidden_layers, batch, lm.num_key_value_heads, capacity, lm.head_dim)
    return (
        torch.zeros(batch, t, dtype=torch.long),
        torch.arange(t)[None].expand(batch, t).contiguous(),
        kv,
        kv.clone(),
        torch.full((batch,), 1, dtype=torch.long),
    )


def make_graph(role: str, model: EchoModel, capacity: int, prefix_len: int, mask_id: int) -> nn.Module:
    if role == graph_io.VISION_PREFILL and model.cfg.vision.native:
        return NativePrefillGraph(model).eval()
    if role == graph_io.VISION_PREFILL:
        return VisionPrefillGraph(model, prefix_len).eval()
    if role == graph_io.BLOCK_STEP:
        return BlockStepGraph(model, capacity, mask_id).eval()
    if role == graph_io.AR_PREFILL:
        return ArPrefillGraph(model, prefix_len, mask_id).eval()
    if role == graph_io.AR_STEP:
        return ArStepGraph(model, capacity, mask_id).eval()
    if role == graph_io.AR_STEP_INPLACE:
        return ArStepInPlaceGraph(model, mask_id, capacity).eval()
    if role == graph_io.BLOCK_STEP_INPLACE:
        return BlockStepInPlaceGraph(model, mask_id, capacity).eval()
    if role in graph_io.MULTISTEP_ROLES:
        return BlockPassGraph(model, capacity, mask_id, commit=role == graph_io.BLOCK_COMMIT).eval()
    raise ValueError(f"unknown graph role {role!r}; choose from {graph_io.GRAPH_ROLES}")


def export_graph(module: nn.Module, inputs: tuple[torch.Tensor, ...], path, opset: int = 18, weights=None,
                 min_bytes: int = 1024, dynamic_shapes: dict | None = None,
                 sources: dict[int, torch.Tensor] | None = None) -> None:
    """Fixed-shape export with the dynamo exporter. `weights` (an external_weights.WeightsFile):
    initializers of at least `min_bytes` go straight into it, one at a time, and the graph file
    holds the rest; else the weights live inside the file (or beside it, past 2 GB).

    Straight into the shared file because at real size each graph's own data file is the weights
    again (about 14 GB per graph at 3.75B parameters in fp32) and would then be copied once more.

    `sources` (stream_export.fp32_placeholders): the module's parameters are unwritten fp32
    placeholders and the weights are read from these, lazily, one tensor at a time; `weights`
    may then be a stream_export.DeferredWeights (the fp32 graph is only the fp16 one's source)."""
    import logging
    import warnings

    # the exporter's op registry logs 4 lines per graph about torchvision ops, which no ECHO graph uses
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                None,
                dynamo=True,
                opset_version=opset,
                input_names=list(module.input_names),
                output_names=list(module.output_names),
                optimize=sources is None,  # else after the weights are made lazy: folding reads them
                verbose=False,
                dynamic_shapes=dynamic_shapes,
            )
    finally:
        registry_log.setLevel(level)
    _store_program(program, path, weights, min_bytes, sources)
    del program


def _store_program(program, path, weights, min_bytes: int, sources) -> None:
    import onnx_ir as ir

    from echo_export.external_weights import store_initializers
    from echo_export.stream_export import DeferredWeights, defer_initializers, lazy_initializers, release_params

    if sources is not None:
        lazy_initializers(program.model, sources)
    if isinstance(weights, DeferredWeights):
        defer_initializers(program.model, weights, min_bytes)
        ir.save(program.model, str(path))
    elif weights is None:
        program.save(str(path), external_data=False)
    else:
        store_initializers(program.model, weights, min_bytes)
        ir.save(program.model, str(path))
    if sources is not None and not isinstance(weights, DeferredWeights):
        release_params()  # written: the lazy tensors' parameters need not be kept


def release_exporter_references() -> int:
    """Let go of the last exported graph, and with it the PyTorch weights it wraps.

    onnxscript 0.7's pattern matchers (module-level rewrite rules that the exporter's optimiser
    runs on every graph) keep the last graph they matched (`_graph`, `_match`, ...) after the
    export returns, and that graph's initialisers wrap the model's parameter tensors: a model
    deleted after its export stayed resident through the rest of the build (at 0.5B the AR model's
    2.3 GB through int8 and verify). Every matcher sets these again before its next match.
    Returns how many matchers held a graph."""
    import gc

    try:
        from onnxscript.rewriter._basics import MatchResult
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to release
        return 0
    n = 0
    for o in gc.get_objects():
        if issubclass(type(o), SimplePatternMatcher) and getattr(o, "_graph", None) is not None:
            o._graph = o._tracer = o._current_node = None
            o._match = MatchResult()
            n += 1
    return n
