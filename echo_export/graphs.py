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

from echo_train.model.backbone import KV, MASK_VALUE
from echo_train.model.echo_model import EchoModel
from echo_train.model.masks import block_layout, build_attention_mask, causal_layout, fused_layout
from runtime import graph_io
from runtime.schedule import BlockLayout, fused_block_slice


def exclude_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """The mask token is never predicted: its logit becomes MASK_VALUE (finite, fp16-safe)."""
    # made on the logits' device: no host-to-device copy inside a captured CUDA graph
    # a comparison, not a scatter into a bool tensor: TensorRT's ScatterElements takes no BOOL, and the
    # exporter folds the scatter to a constant only for small vocabularies (echo_export/trt_ops.py found it)
    onehot = torch.arange(logits.shape[-1], device=logits.device) == token_id
    return torch.where(onehot, torch.full_like(logits, MASK_VALUE), logits)


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
    """pixel_values f32[b,1,S,S], prefix_ids i64[b,P] -> present_key/value f32[L,b,kvH,P-B,dh].

    Over the prefix minus its last block (that block is the first fused pass's previous block,
    fed again as token ids), block-causal or causal as the model's context (cfg.causal_context).
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
        logits = exclude_token(self.model.lm.lm_head(h[:, read]).float(), self.mask_id)
        tokens = logits.argmax(-1)
        confidence = torch.softmax(logits, -1).amax(-1)
        pk, pv = _stack_present(kv, slice(0, B))
        return tokens, confidence, pk.float(), pv.float()


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
    if role in (graph_io.VISION_PREFILL, graph_io.AR_PREFILL):
        return (torch.zeros(batch, 1, S, S), torch.zeros(batch, prefix_len, dtype=torch.long))
    t = 2 * cfg.block_size if role == graph_io.BLOCK_STEP else 1
    kv = torch.zeros(lm.num_hidden_layers, batch, lm.num_key_value_heads, capacity, lm.head_dim)
    return (
        torch.zeros(batch, t, dtype=torch.long),
        torch.arange(t)[None].expand(batch, t).contiguous(),
        kv,
        kv.clone(),
        torch.full((batch,), 1, dtype=torch.long),
    )


def make_graph(role: str, model: EchoModel, capacity: int, prefix_len: int, mask_id: int) -> nn.Module:
    if role == graph_io.VISION_PREFILL:
        return VisionPrefillGraph(model, prefix_len).eval()
    if role == graph_io.BLOCK_STEP:
        return BlockStepGraph(model, capacity, mask_id).eval()
    if role == graph_io.AR_PREFILL:
        return ArPrefillGraph(model, prefix_len, mask_id).eval()
    if role == graph_io.AR_STEP:
        return ArStepGraph(model, capacity, mask_id).eval()
    raise ValueError(f"unknown graph role {role!r}; choose from {graph_io.GRAPH_ROLES}")


def export_graph(module: nn.Module, inputs: tuple[torch.Tensor, ...], path, opset: int = 18, weights=None,
                 min_bytes: int = 1024) -> None:
    """Fixed-shape export with the dynamo exporter. `weights` (an external_weights.WeightsFile):
    initializers of at least `min_bytes` go straight into it, one at a time, and the graph file
    holds the rest; else the weights live inside the file (or beside it, past 2 GB).

    Straight into the shared file because at real size each graph's own data file is the weights
    again (about 14 GB per graph at 3.75B parameters in fp32) and would then be copied once more."""
    import logging
    import warnings

    import onnx_ir as ir

    from echo_export.external_weights import store_initializers

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
                optimize=True,
                verbose=False,
            )
    finally:
        registry_log.setLevel(level)
    if weights is None:
        program.save(str(path), external_data=False)
    else:
        store_initializers(program.model, weights, min_bytes)
        ir.save(program.model, str(path))
    del program


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
