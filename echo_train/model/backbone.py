"""Qwen2/Qwen3-compatible decoder (RMSNorm, RoPE, GQA, SwiGLU, optional QK-norm).

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...) so real
safetensors checkpoints load unchanged. Forward takes an explicit boolean attention mask and
optional past keys/values, with no data-dependent Python control flow, so the same code
serves training, the cached reference decoders and fixed-shape ONNX export.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LMConfig

# Finite, and representable in fp16: the fp16 graphs must never see -inf.
MASK_VALUE = -30000.0

KV = tuple[torch.Tensor, torch.Tensor]


def exclude_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """The mask token is never predicted: its logit becomes MASK_VALUE (finite, fp16-safe)."""
    # made on the logits' device: no host-to-device copy inside a captured CUDA graph
    # a comparison, not a scatter into a bool tensor: TensorRT's ScatterElements takes no BOOL, and the
    # exporter folds the scatter to a constant only for small vocabularies (echo_export/trt_ops.py found it)
    onehot = torch.arange(logits.shape[-1], device=logits.device) == token_id
    return torch.where(onehot, torch.full_like(logits, MASK_VALUE), logits)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # fp32 statistics keep fp16 safe
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [b, T, head_dim] for integer positions [b, T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_positions(position_ids: torch.Tensor, image_grid: list[int], image_start: int = 0) -> torch.Tensor:
    """Qwen2.5-VL's multimodal positions [b, T, 3] (time, row, column) of token indices [b, T] in a
    prefix with one image: text at indices 0 .. s-1, the image's rows x cols tokens from index
    s = image_start, then text.

    As `transformers`' get_rope_index computes them for text, one image, text: text before the
    image has all three components at its index i; image token (r, c) sits at (s, s + r, s + c);
    text after the image continues from s + max(rows, cols), so index i >= s + rows*cols has all
    three at i - rows*cols + max(rows, cols)."""
    rows, cols = int(image_grid[0]), int(image_grid[1])
    s, n_image = int(image_start), rows * cols
    rel = position_ids - s
    is_image = (rel >= 0) & (rel < n_image)
    text = torch.where(rel < 0, position_ids, position_ids + (max(rows, cols) - n_image))
    t = torch.where(is_image, torch.full_like(position_ids, s), text)
    h = torch.where(is_image, torch.div(rel, cols, rounding_mode="floor") + s, text)
    w = torch.where(is_image, torch.remainder(rel, cols) + s, text)
    return torch.stack([t, h, w], dim=-1)


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, section: list[int],
                  image_grid: list[int], image_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's multimodal rotary cos, sin [b, T, head_dim] of token indices (mrope_positions)."""
    pos = mrope_positions(position_ids, image_grid, image_start)  # [b, T, 3]
    return mrope_cos_sin_explicit(pos.permute(2, 0, 1), head_dim, theta, dtype, section)


def mrope_cos_sin_explicit(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                           section: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's multimodal rotary cos, sin [b, T, head_dim] of (time, row, column) positions
    [3, b, T] (transformers' position_ids, runtime/native_image.mrope_position_ids).

    The frequency j of the head rotates by the component its section names (time, row, column, in
    turn). Text tokens, whose three components agree, get exactly plain RoPE at that position."""
    position_ids = positions[0]
    pos = positions.permute(1, 2, 0).float()  # [b, T, 3]
    component = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(section)])
    if component.numel() != head_dim // 2:
        raise ValueError(f"mrope_section {section} sums to {component.numel()}, not head_dim / 2 = {head_dim // 2}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = pos[..., component.to(position_ids.device)] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.dh, bias=b)
        self.k_proj = nn.Linear(d, self.n_kv * self.dh, bias=b)
        self.v_proj = nn.Linear(d, self.n_kv * self.dh, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.dh, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.dh, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.dh, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: Optional[KV] = None,
    ) -> tuple[torch.Tensor, KV]:
        """x [b,T,d]; mask bool [b|1, T, S_past+T]; past ([b,kvH,S_past,dh], same). Returns out and this call's k, v."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.dh)
        k = self.k_proj(x).view(b, t, self.n_kv, self.dh)
        v = self.v_proj(x).view(b, t, self.n_kv, self.dh).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        # GQA without copying keys/values per query head: the `rep` query heads that share a kv
        # head are stacked along the query axis ([b, kv, rep*t, dh]) and multiply that kv head in
        # place. Expanding K/V to every query head instead copies the whole cache at each step
        # (rep x its size; rep = 7 for Qwen2.5-0.5B), which dominates a memory-bound decode step.
        rep = self.n_heads // self.n_kv
        q = q.reshape(b, self.n_kv, rep * t, self.dh)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (self.dh ** -0.5)
        grouped_mask = mask.repeat(1, rep, 1)[:, None]  # [b|1, 1, rep*t, S]: query row r*t + i is query i
        # a scalar fill: full_like(scores) would be folded by the exporter into a constant of the
        # scores' whole shape ([b, kv, rep*t, S]), stored in every graph and read by every layer
        scores = torch.where(grouped_mask, scores, scores.new_tensor(MASK_VALUE))
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).reshape(b, self.n_heads, t, self.dh)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.dh)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past: Optional[KV] = None) -> tuple[torch.Tensor, KV]:
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class QwenBody(nn.Module):
    """`model.*` of a Qwen2/Qwen3 checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class QwenDecoder(nn.Module):
    """Causal LM: `model` (QwenBody) + `lm_head`."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = QwenBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module, std: float = 0.02) -> None:
        """Qwen's initialisation; N(0, 1) embeddings would give tied logits of size ~sqrt(d)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        past: Optional[list[KV]] = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Final hidden states [b,T,d] and per-layer (k, v) of these T tokens."""
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        new_kv: list[KV] = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, mask, None if past is None else past[i])
            new_kv.append(kv)
        return self.model.norm(x), new_kv

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the positions: plain RoPE; MRoPE (Qwen2.5-VL) of token indices where the config
        fixes the image grid; of explicit (time, row, column) positions [3, b, T] where it does not
        (native resolution: each image its own grid), plain RoPE of [b, T] text positions then."""
        c = self.cfg
        if c.mrope_section and position_ids.dim() == 3:
            return mrope_cos_sin_explicit(position_ids, c.head_dim, c.rope_theta, dtype, c.mrope_section)
        if c.mrope_section and c.mrope_image_grid is not None:
            return mrope_cos_sin(position_ids, c.head_dim, c.rope_theta, dtype, c.mrope_section, c.mrope_image_grid,
                                 c.mrope_image_start)
        return rotary_cos_sin(position_ids, c.head_dim, c.rope_theta, dtype)

    def causal_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain causal LM logits, as `transformers` computes them (the compatibility test)."""
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()[None]
        h, _ = self.forward(self.model.embed_tokens(input_ids), pos, mask)
        return self.lm_head(h)
