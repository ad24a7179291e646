"""The decode steps for onnxruntime's CPU kernels: each layer's cache updated in place by one
`com.microsoft.GroupQueryAttention` node (ar_step_inplace for the AR loop, block_step_inplace for
the one-step loop).

Why: the standard step graphs (graphs.ArStepGraph, graphs.BlockStepGraph), which TensorRT also
runs, spend beside their matmuls ~50 small nodes per layer on attention: slicing the stacked cache
into layers, concatenating each layer's past with the new keys/values (a copy of the cache per
layer, every pass), the mask, rotary, softmax and the head transposes. onnxruntime-genai's graphs,
which set the pace on a user's CPU, do all of that in one GroupQueryAttention per layer over a cache
buffer that is the node's past input and its present output at once ("shared buffer": the node
writes the new keys/values at slots past_len.. and attends to the slots before and its own). These
graphs do the same, rotary included: the node indexes a cos/sin table by the fed position ids, and
the table is the model's own rotary of every index the cache can hold (rotary_table), so MRoPE of a
fixed image grid and a native image's rope delta come through exactly as the model computes them.

The AR step is causal over its one token. The one-step pass feeds [previous block, current block]
(2B tokens) and attends within them by the model's block mask, so its node is not causal and takes
an additive bias over every cache slot (total_sequence_length the cache's capacity: slots at or
after past_len + 2B carry -inf, and the node reads only those up to its last new token). It writes
all 2B tokens' keys/values: the previous block's are the cache's from now on; the current block's
lie past the cache's end until the next pass writes that block again, finished, over them.

IO (runtime/graph_io.py, "in-place cache form"): input_ids i64[b,T], position_ids i64[b,T],
past_len i64[b], past_key.{i} / past_value.{i} f32[b,kvH,CAP+T,dh] for each layer i -> tokens
(, confidence), present_key.{i} / present_value.{i}: the caller binds present_*.{i} to the very
buffer of past_*.{i} (a view of layer i of its stacked cache), so nothing is copied or stored after
the pass. T spare slots take the last pass's writes (graph_io.inplace_spare_slots). Every row of a
batch must have the same past_len (the loops'), as the graphs are only verified for equal ones.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from echo_train.model.backbone import apply_rotary, exclude_token
from echo_train.model.echo_model import EchoModel
from echo_train.model.masks import build_attention_mask, fused_layout
from runtime import graph_io
from runtime.schedule import BlockLayout, excludes_mask_token, fused_block_slice

GQA_OP = "com.microsoft::GroupQueryAttention"
NEG_INF = float("-inf")


def rotary_table(model: EchoModel, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [rows, dh/2] of positions 0..rows-1 as the model's own rotary computes them for
    [b, T] position ids (MRoPE of a fixed grid included: its angles per frequency are any angles,
    and rotate-half holds the same ones in both halves of a row)."""
    lm = model.lm
    cos, sin = lm.rotary(torch.arange(rows)[None], torch.float32)
    half = lm.cfg.head_dim // 2
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Eager: x [b,t,n*dh] rotated by the table rows of its positions (what the node does)."""
    b, t, _ = x.shape
    c, s = cos[position_ids], sin[position_ids]  # [b, t, dh/2]
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    return apply_rotary(x.view(b, t, n, -1).transpose(1, 2), c, s).transpose(1, 2).reshape(b, t, -1)


def _slot_mask(past_len: torch.Tensor, slots: int, self_mask: torch.Tensor) -> torch.Tensor:
    """[b, t, slots] bool: slot j attendable by new token i iff j < past_len, or j is new token
    j - past_len and self_mask allows it."""
    t = self_mask.shape[0]
    rel = torch.arange(slots, device=past_len.device)[None, :] - past_len[:, None]  # [b, slots]
    in_block = (rel >= 0) & (rel < t)
    allowed_new = self_mask[:, rel.clamp(0, t - 1)].permute(1, 0, 2)  # [b, t, slots]
    return (rel < 0)[:, None, :] | (in_block[:, None, :] & allowed_new)


def gqa_shared_buffer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                      past_len: torch.Tensor, position_ids: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor],
                      n_heads: int, n_kv: int, self_mask: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b,t,H*dh], k/v [b,t,kvH*dh] (not yet rotated), past [b,kvH,CAP,dh], past_len i64[b],
    position_ids i64[b,t], table (rotary_table) -> (out [b,t,H*dh], present key, present value
    [b,kvH,CAP,dh]): onnxruntime's GroupQueryAttention with rotary and one buffer for past and
    present. self_mask [t,t] bool (None: causal) says which new tokens each new token attends.
    In eager mode the same arithmetic in PyTorch (present as new tensors, not in place)."""
    b, t, _ = q.shape
    cap, dh = past_k.shape[2], past_k.shape[-1]
    cos, sin = table
    if torch.onnx.is_in_onnx_export():
        seqlens_k = (past_len + (t - 1)).to(torch.int32)  # the last new token's slot
        attrs = {"num_heads": n_heads, "kv_num_heads": n_kv, "scale": float(dh ** -0.5), "do_rotary": 1}
        inputs = [q, k, v, past_k, past_v, seqlens_k]
        if self_mask is None:
            inputs += [(past_len.max() + t).to(torch.int32), cos, sin, position_ids]
        else:  # a bias over every slot: the node reads the columns up to its last new token
            bias = torch.where(_slot_mask(past_len, cap, self_mask), 0.0, NEG_INF)[:, None].to(q.dtype)
            inputs += [torch.tensor(cap, dtype=torch.int32), cos, sin, position_ids, bias]
            attrs["causal"] = 0
        out, pk, pv = torch.onnx.ops.symbolic_multi_out(
            GQA_OP, inputs, attrs, dtypes=[q.dtype, past_k.dtype, past_v.dtype],
            shapes=[q.shape, past_k.shape, past_v.shape], version=1)
        return out, pk, pv
    q, k = _rotate(q, cos, sin, position_ids, n_heads), _rotate(k, cos, sin, position_ids, n_kv)
    kk, vv = k.view(b, t, n_kv, dh).transpose(1, 2), v.view(b, t, n_kv, dh).transpose(1, 2)
    pk, pv = past_k.clone(), past_v.clone()
    for r in range(b):  # eager reference only: rows may differ in past_len
        s = int(past_len[r])
        pk[r, :, s : s + t], pv[r, :, s : s + t] = kk[r], vv[r]
    if self_mask is None:
        self_mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    mask = _slot_mask(past_len, cap, self_mask)
    rep = n_heads // n_kv
    qh = q.view(b, t, n_heads, dh).transpose(1, 2)
    keys, values = pk.repeat_interleave(rep, 1), pv.repeat_interleave(rep, 1)
    scores = (qh @ keys.transpose(-1, -2)) * dh ** -0.5
    scores = scores.masked_fill(~mask[:, None], NEG_INF)
    out = (F.softmax(scores, -1) @ values).transpose(1, 2).reshape(b, t, n_heads * dh)
    return out, pk, pv


class _InPlaceDecoder(nn.Module):
    """The model's decoder layers over per-layer caches written in place, in DecoderLayer.forward's
    order: its own norms, projections, MLP; attention and rotary in one GroupQueryAttention."""

    def __init__(self, model: EchoModel, mask_id: int, capacity: int, role: str,
                 self_mask: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.model, self.mask_id = model, mask_id
        self.n_layers = n = model.cfg.lm.num_hidden_layers
        self.input_names = graph_io.inplace_step_inputs(n)
        self.output_names = graph_io.inplace_step_outputs(n, role)
        self.register_buffer("self_mask", self_mask, persistent=False)
        # every position a slot of the caches can hold (the loops feed positions below their slot count)
        width = graph_io.step_width(role, model.cfg.block_size)
        cos, sin = rotary_table(model, capacity + graph_io.inplace_spare_slots(width))
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def hidden(self, input_ids, position_ids, past_len, caches) -> tuple[torch.Tensor, list, list]:
        """Final hidden states [b,t,d] (the model's final norm applied) and each layer's present k, v."""
        lm = self.model.lm
        n = self.n_layers
        past_keys, past_values = caches[:n], caches[n:]
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        keys, values = [], []
        for i, layer in enumerate(lm.model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q, k = a.q_proj(h), a.k_proj(h)
            if a.qk_norm:  # the norms before rotary, as the model does
                q = a.q_norm(q.view(b, t, a.n_heads, a.dh)).reshape(b, t, -1)
                k = a.k_norm(k.view(b, t, a.n_kv, a.dh)).reshape(b, t, -1)
            out, pk, pv = gqa_shared_buffer(q, k, a.v_proj(h), past_keys[i], past_values[i], past_len, position_ids,
                                            (self.cos_table, self.sin_table), a.n_heads, a.n_kv, self.self_mask)
            keys.append(pk)
            values.append(pv)
            x = x + a.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return lm.model.norm(x), keys, values


class ArStepInPlaceGraph(_InPlaceDecoder):
    """ar_step in the in-place cache form (module docstring): causal over its one token."""

    def __init__(self, model: EchoModel, mask_id: int, capacity: int) -> None:
        super().__init__(model, mask_id, capacity, graph_io.AR_STEP_INPLACE, None)

    def forward(self, input_ids, position_ids, past_len, *caches):
        h, keys, values = self.hidden(input_ids, position_ids, past_len, caches)
        logits = exclude_token(self.model.lm.lm_head(h).float(), self.mask_id)
        return (logits.argmax(-1), *keys, *values)


class BlockStepInPlaceGraph(_InPlaceDecoder):
    """block_step in the in-place cache form (module docstring): [previous block, current block]
    attending as graphs.BlockStepGraph's mask says, the current block's tokens and confidence out."""

    def __init__(self, model: EchoModel, mask_id: int, capacity: int) -> None:
        B = model.cfg.block_size
        self_mask = build_attention_mask(fused_layout(BlockLayout(B, B), 0, model.cfg.context_kind))
        super().__init__(model, mask_id, capacity, graph_io.BLOCK_STEP_INPLACE, self_mask)
        self.B = B

    def forward(self, input_ids, position_ids, past_len, *caches):
        h, keys, values = self.hidden(input_ids, position_ids, past_len, caches)
        read = fused_block_slice(self.B, self.model.cfg.shifted_prediction)
        logits = self.model.lm.lm_head(h[:, read]).float()
        if excludes_mask_token(self.model.cfg.decode_layout):  # the official layout's argmax takes every id
            logits = exclude_token(logits, self.mask_id)
        return (logits.argmax(-1), torch.softmax(logits, -1).amax(-1), *keys, *values)


def inplace_example_inputs(cfg, batch: int, capacity: int, role: str = graph_io.AR_STEP_INPLACE) -> tuple[torch.Tensor, ...]:
    """Dummy inputs of an in-place step's fixed shapes for a loop of `capacity` cache slots (the
    graph's caches hold graph_io.inplace_spare_slots more)."""
    lm = cfg.lm
    t = graph_io.step_width(role, cfg.block_size)
    slots = capacity + graph_io.inplace_spare_slots(t)
    kv = [torch.zeros(batch, lm.num_key_value_heads, slots, lm.head_dim) for _ in range(2 * lm.num_hidden_layers)]
    return (torch.zeros(batch, t, dtype=torch.long), torch.arange(1, t + 1)[None].expand(batch, t).contiguous(),
            torch.ones(batch, dtype=torch.long), *kv)
