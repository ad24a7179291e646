"""The AR step for onnxruntime's CPU kernels: each layer's cache updated in place by one
`com.microsoft.GroupQueryAttention` node.

Why: at batch 1 an AR step multiplies one row by every weight, and the standard ar_step graph
(graphs.ArStepGraph) spends beside its matmuls ~50 small nodes per layer on attention: slicing the
stacked cache into layers, concatenating each layer's past with its new key/value (a copy of the
cache per layer, every token), the mask, softmax and the head transposes. onnxruntime-genai's graphs,
which set the pace for a user's CPU, do all of that in one GroupQueryAttention per layer over a
cache buffer that is the node's past input and its present output at once ("shared buffer": the
node writes the new key/value at slot seqlens_k and attends to slots 0..seqlens_k). This graph does
the same. Rotary stays ours (the model's own cos/sin of the fed positions, MRoPE included), applied
before the node (`do_rotary` would index its own table by cache slot, not by position).

IO (runtime/graph_io.py, "in-place cache form"): input_ids i64[b,1], position_ids i64[b,1],
past_len i64[b], past_key.{i} / past_value.{i} f32[b,kvH,CAP,dh] for each layer i -> tokens i64[b,1],
present_key.{i} / present_value.{i} f32[b,kvH,CAP,dh]: the caller binds present_*.{i} to the very
buffer of past_*.{i} (a view of layer i of its stacked cache), so nothing is copied or stored after
the pass. Every row of a batch must have the same past_len (the AR loop's), as GroupQueryAttention
writes at each row's own seqlens_k but this graph is only verified for equal ones.

The last pass writes its key/value at slot past_len even when no later pass reads it, so the
in-place graph has one slot more than the standard one (graph_io.INPLACE_SPARE_SLOTS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from echo_train.model.backbone import apply_rotary, exclude_token
from echo_train.model.echo_model import EchoModel
from runtime import graph_io

GQA_OP = "com.microsoft::GroupQueryAttention"
ROTARY_OP = "com.microsoft::RotaryEmbedding"


def rotary_of_table(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int) -> torch.Tensor:
    """x [b,t,n*dh] rotated by the model's cos/sin [b,t,dh] (rotate-half form: both halves of a row
    hold the same angles): in export one com.microsoft.RotaryEmbedding whose table is these b*t rows
    and whose position ids pick each token's own row, so any positions (MRoPE's, a native image's
    rope delta) come through as the model computed them."""
    b, t, _ = x.shape
    dh = cos.shape[-1]
    if torch.onnx.is_in_onnx_export():
        rows = torch.arange(b * t, device=x.device).view(b, t)
        half = dh // 2
        return torch.onnx.ops.symbolic(
            ROTARY_OP, [x, rows, cos[..., :half].reshape(b * t, half), sin[..., :half].reshape(b * t, half)],
            {"interleaved": 0, "num_heads": n_heads}, dtype=x.dtype, shape=x.shape, version=1)
    return apply_rotary(x.view(b, t, n_heads, dh).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, n_heads * dh)


def gqa_shared_buffer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                      past_len: torch.Tensor, n_heads: int, n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b,t,H*dh], k/v [b,t,kvH*dh], past [b,kvH,CAP,dh], past_len i64[b] -> (out [b,t,H*dh], present
    key, present value [b,kvH,CAP,dh]): onnxruntime's GroupQueryAttention with past and present one
    buffer, causal over slots 0..past_len+t-1. In eager mode the same arithmetic in PyTorch (present
    as new tensors, not in place)."""
    b, t, _ = q.shape
    dh = past_k.shape[-1]
    if torch.onnx.is_in_onnx_export():
        seqlens_k = (past_len + (t - 1)).to(torch.int32)  # the last new token's slot
        total = (past_len.max() + t).to(torch.int32)
        out, pk, pv = torch.onnx.ops.symbolic_multi_out(
            GQA_OP, [q, k, v, past_k, past_v, seqlens_k, total],
            {"num_heads": n_heads, "kv_num_heads": n_kv, "scale": float(dh ** -0.5)},
            dtypes=[q.dtype, past_k.dtype, past_v.dtype], shapes=[q.shape, past_k.shape, past_v.shape], version=1)
        return out, pk, pv
    cap = past_k.shape[2]
    slots = torch.arange(cap, device=q.device)
    kk, vv = k.view(b, t, n_kv, dh).transpose(1, 2), v.view(b, t, n_kv, dh).transpose(1, 2)
    pk, pv = past_k.clone(), past_v.clone()
    for r in range(b):  # eager reference only: rows may differ in past_len
        s = int(past_len[r])
        pk[r, :, s : s + t], pv[r, :, s : s + t] = kk[r], vv[r]
    query_slot = past_len[:, None] + torch.arange(t, device=q.device)[None]  # [b, t]
    mask = slots[None, None] <= query_slot[..., None]  # [b, t, CAP]: causal over the written slots
    rep = n_heads // n_kv
    qh = q.view(b, t, n_heads, dh).transpose(1, 2)
    keys, values = pk.repeat_interleave(rep, 1), pv.repeat_interleave(rep, 1)
    scores = (qh @ keys.transpose(-1, -2)) * dh ** -0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = (F.softmax(scores, -1) @ values).transpose(1, 2).reshape(b, t, n_heads * dh)
    return out, pk, pv


class ArStepInPlaceGraph(nn.Module):
    """ar_step in the in-place cache form (module docstring); the model's own norms, projections,
    rotary, MLP and lm_head, in DecoderLayer.forward's order."""

    def __init__(self, model: EchoModel, mask_id: int) -> None:  # its cache slots: its inputs' (fixed at export)
        super().__init__()
        self.model, self.mask_id = model, mask_id
        n = model.cfg.lm.num_hidden_layers
        self.input_names = graph_io.inplace_step_inputs(n)
        self.output_names = graph_io.inplace_step_outputs(n)

    def forward(self, input_ids, position_ids, past_len, *caches):
        lm = self.model.lm
        n = len(lm.model.layers)
        past_keys, past_values = caches[:n], caches[n:]
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos, sin = lm.rotary(position_ids, x.dtype)
        keys, values = [], []
        for i, layer in enumerate(lm.model.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, a.n_heads, a.dh)
            k = a.k_proj(h).view(b, t, a.n_kv, a.dh)
            if a.qk_norm:
                q, k = a.q_norm(q), a.k_norm(k)
            q = rotary_of_table(q.reshape(b, t, a.n_heads * a.dh), cos, sin, a.n_heads)
            k = rotary_of_table(k.reshape(b, t, a.n_kv * a.dh), cos, sin, a.n_kv)
            out, pk, pv = gqa_shared_buffer(q, k, a.v_proj(h), past_keys[i], past_values[i], past_len,
                                            a.n_heads, a.n_kv)
            keys.append(pk)
            values.append(pv)
            x = x + a.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = exclude_token(lm.lm_head(lm.model.norm(x)).float(), self.mask_id)
        return (logits.argmax(-1), *keys, *values)


def inplace_example_inputs(cfg, batch: int, capacity: int) -> tuple[torch.Tensor, ...]:
    """Dummy inputs of the in-place ar_step's fixed shapes for a loop of `capacity` cache slots (the
    graph's caches hold graph_io.INPLACE_SPARE_SLOTS more)."""
    lm = cfg.lm
    slots = capacity + graph_io.INPLACE_SPARE_SLOTS
    kv = [torch.zeros(batch, lm.num_key_value_heads, slots, lm.head_dim) for _ in range(2 * lm.num_hidden_layers)]
    return (torch.zeros(batch, 1, dtype=torch.long), torch.ones(batch, 1, dtype=torch.long),
            torch.ones(batch, dtype=torch.long), *kv)
