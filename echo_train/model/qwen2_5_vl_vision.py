"""The Qwen2.5-VL vision tower for one fixed image grid, written for fixed-shape export.

Same computation and parameter names as `transformers`' Qwen2_5_VisionTransformerPretrainedModel
(`visual.*` of a Qwen2.5-VL checkpoint): patch embedding (a Conv3d over 2 identical frames),
2-D rotary positions, blocks with window attention and a few with full attention, and the patch
merger (2x2 patches -> one LM token). What differs is only how the fixed grid is used:

- The image comes in as ECHO's [b, 1, S, S] grey pixels in [-1, 1] (runtime/preprocess.py). The
  processor's RGB conversion of a grey image copies it to 3 channels, and its mean/std are a
  per-channel multiply-add (VisionConfig.image_mean/std), both applied here.
- A still image is 2 identical frames in the processor, so the Conv3d equals a Conv2d with the
  kernel summed over its 2 frames.
- transformers reorders tokens into windows and attends per window (cu_seqlens); here the tokens
  stay in the processor's order and window attention is a fixed block mask over them. Attention
  is permutation-equivariant, so the outputs agree (tests/test_import_hf.py, against transformers).
- Rotary angles and masks depend only on the grid, so they are precomputed buffers: the exported
  graph holds no data-dependent shapes.

`forward_native` takes the processor's own grid instead (aspect ratio kept, up to max_pixels: the
official inference code's images): the processor's pixel_values [n, C*T*p*p] and the index tensors
of runtime/native_image.py (patch_rc, window_gather, window_valid, window_inverse). The number of
patches is a graph input's size, not a constant, so one exported graph serves every image size
(`NativeTowerExport`, `native_dynamic_shapes`). Window attention there runs over the windows
gathered into a padded [n_win, W] batch with a key mask, as transformers' per-window attention
without its data-dependent split (tests/test_native_image.py, against transformers).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import MASK_VALUE, RMSNorm

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def grid_of(image_size: int, patch_size: int, merge_size: int) -> tuple[int, int]:
    """(patches a side, LM tokens a side) of a square image."""
    if image_size % (patch_size * merge_size):
        raise ValueError(f"image size {image_size} is not a multiple of patch x merge = {patch_size * merge_size}")
    return image_size // patch_size, image_size // patch_size // merge_size


def patch_positions(grid: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch, in the processor's order (merge blocks of merge x merge)."""
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    shape = (grid // merge, merge, grid // merge, merge)
    return h.reshape(shape).transpose(1, 2).flatten(), w.reshape(shape).transpose(1, 2).flatten()


def window_ids(grid: int, merge: int, window_tokens: int) -> torch.Tensor:
    """Window of every patch: windows are window_tokens x window_tokens merged tokens, counted
    from the top-left corner (transformers pads the right and bottom edges)."""
    rows, cols = patch_positions(grid, merge)
    llm_rows, llm_cols = rows // merge, cols // merge
    n_cols = -(-(grid // merge) // window_tokens)
    return (llm_rows // window_tokens) * n_cols + llm_cols // window_tokens


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                heads_per_pass: Optional[int] = None) -> torch.Tensor:
        """heads_per_pass: attend a few heads at a time (a static loop), so that the [n, n] scores of
        a full-attention block over thousands of patches exist for those heads only (None: all)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4).unbind(0)  # [b, H, n, dh]
        dtype = q.dtype  # rotary in fp32, as transformers does
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(dtype)
        step = heads_per_pass or self.heads
        outs = [self._attend(q[:, h:h + step], k[:, h:h + step], v[:, h:h + step], mask)
                for h in range(0, self.heads, step)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.dh))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dtype = q.dtype
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.dh ** -0.5)
        if mask is not None:
            scores = torch.where(mask, scores, scores.new_tensor(MASK_VALUE))
        probs = F.softmax(scores.float(), dim=-1).to(dtype)
        return torch.matmul(probs, v)


def _rotary_angles(rc: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[n, 2] (row, column) -> [n, dh] angles: row frequencies, column frequencies, twice (fp32, as
    transformers' Qwen2_5_VLVisionRotaryEmbedding)."""
    rc = rc.to(torch.float32)
    freqs = torch.cat([rc[:, :1] * inv_freq, rc[:, 1:] * inv_freq], -1)
    return torch.cat([freqs, freqs], -1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6)
        self.norm2 = RMSNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMLP(dim, hidden, act)

    def forward(self, x, cos, sin, mask, heads_per_pass: Optional[int] = None):
        x = x + self.attn(self.norm1(x), cos, sin, mask, heads_per_pass)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, temporal: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(channels, dim, kernel_size=(temporal, patch, patch), stride=(temporal, patch, patch),
                              bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[b, C, S, S] (one still image: every temporal frame the same) -> [b, D, S/p, S/p]."""
        return F.conv2d(pixels, self.proj.weight.sum(2), stride=self.patch)


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = RMSNorm(context_dim, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.mlp(self.ln_q(x).reshape(b, -1, self.hidden))


class Qwen25VisionTower(nn.Module):
    """pixels [b, C, S, S] (already normalised) -> image token embeddings [b, (S/28)^2, LM width];
    forward_native: one image at its own grid -> [n / merge^2, LM width].

    image_size None: a tower for forward_native only (no fixed-grid buffers)."""

    def __init__(self, hf: dict[str, Any], image_size: Optional[int]) -> None:
        super().__init__()
        dim, heads = int(hf["hidden_size"]), int(hf.get("num_heads", hf.get("num_attention_heads", 16)))
        self.patch, self.merge = int(hf.get("patch_size", 14)), int(hf.get("spatial_merge_size", 2))
        temporal = int(hf.get("temporal_patch_size", 2))
        depth = int(hf.get("depth", hf.get("num_hidden_layers", 32)))
        self.full_blocks = tuple(int(i) for i in hf.get("fullatt_block_indexes", []))
        self.patch_embed = PatchEmbed(int(hf.get("in_channels", hf.get("in_chans", 3))), temporal, self.patch, dim)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, int(hf["intermediate_size"]), hf.get("hidden_act", "silu"))
                                    for _ in range(depth))
        self.merger = PatchMerger(int(hf["out_hidden_size"]), dim, self.merge)
        # 2-D rotary: a quarter of the head's frequencies per axis (rows, then columns), as transformers
        half = dim // heads // 2
        theta = float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.register_buffer("rot_inv_freq", inv_freq, persistent=False)  # forward_native's angles, in-graph
        self.window_tokens = int(hf.get("window_size", 112)) // self.merge // self.patch
        self.grid = self.n_tokens = None
        # forward_native's full-attention blocks attend this many heads at a time: their scores are
        # [heads, n, n] (at 2.25 M pixels, 16 heads and n = 11.5k patches: 8.4 GB in fp32 at once)
        self.native_heads_per_pass: Optional[int] = 1
        if image_size is not None:
            self._fixed_grid(image_size)

    def _fixed_grid(self, image_size: int) -> None:
        """Rotary angles and the window mask of one square grid, as buffers (forward)."""
        grid, llm_grid = grid_of(image_size, self.patch, self.merge)
        self.grid, self.n_tokens = grid, llm_grid * llm_grid
        rows, cols = patch_positions(grid, self.merge)
        emb = _rotary_angles(torch.stack([rows, cols], -1), self.rot_inv_freq)
        self.register_buffer("rot_cos", emb.cos()[None, None], persistent=False)  # [1, 1, n, dh]
        self.register_buffer("rot_sin", emb.sin()[None, None], persistent=False)
        win = window_ids(grid, self.merge, self.window_tokens)
        self.register_buffer("window_mask", (win[:, None] == win[None, :])[None, None], persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            raise ValueError("this tower was built without a fixed image size: use forward_native")
        b = pixels.shape[0]
        x = self.patch_embed(pixels)  # [b, D, g, g]
        g, m = self.grid, self.merge
        # the processor's token order: merge blocks row by row, the m x m patches of a block inside
        x = x.view(b, -1, g // m, m, g // m, m).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rot_cos, self.rot_sin, None if i in self.full_blocks else self.window_mask)
        return self.merger(x)

    # ------------------------------------------------------------------ native resolution
    def forward_native(self, patches: torch.Tensor, patch_rc: torch.Tensor, window_gather: torch.Tensor,
                       window_valid: torch.Tensor, window_inverse: torch.Tensor) -> torch.Tensor:
        """One image at the processor's grid -> [n / merge^2, LM width] in the processor's order.

        patches [n, C*T*p*p]: the processor's pixel_values; patch_rc [n, 2] int64; window_gather,
        window_valid [n_win, W]; window_inverse [n] (runtime/native_image.py). Every shape follows the
        inputs and the block pattern is the config's, so the graph exports with n and n_win dynamic."""
        w = self.patch_embed.proj.weight  # [D, C, T, p, p]: the patch row is (C, T, p, p) flattened
        x = (patches.to(w.dtype) @ w.reshape(w.shape[0], -1).t())[None]  # [1, n, D]
        d = x.shape[-1]
        emb = _rotary_angles(patch_rc, self.rot_inv_freq)  # [n, dh], fp32
        cos, sin = emb.cos(), emb.sin()
        dense_rot = (cos[None, None], sin[None, None])  # [1, 1, n, dh]
        win_rot = (cos[window_gather][:, None], sin[window_gather][:, None])  # [n_win, 1, W, dh]
        key_mask = window_valid[:, None, None, :]  # padded slots are never attended to
        windowed = False
        for i, blk in enumerate(self.blocks):
            full = i in self.full_blocks  # the config's pattern: fixed when the graph is traced
            if full and windowed:  # back to the processor's order for attention over all n
                x, windowed = x.reshape(-1, d)[window_inverse][None], False
            elif not full and not windowed:  # into padded windows [n_win, W, D]
                x, windowed = x[0][window_gather], True
            x = blk(x, *dense_rot, None, self.native_heads_per_pass) if full else blk(x, *win_rot, key_mask)
        if windowed:
            x = x.reshape(-1, d)[window_inverse][None]
        return self.merger(x)[0]


class NativeTowerExport(nn.Module):
    """forward_native as a module's forward, for torch.export / torch.onnx.export(dynamo=True)."""

    INPUT_NAMES = ("patches", "patch_rc", "window_gather", "window_valid", "window_inverse")

    def __init__(self, tower: Qwen25VisionTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, patches: torch.Tensor, patch_rc: torch.Tensor, window_gather: torch.Tensor,
                window_valid: torch.Tensor, window_inverse: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_native(patches, patch_rc, window_gather, window_valid, window_inverse)


def native_dynamic_shapes(merge: int, max_tokens: int = 1 << 20) -> dict[str, dict[int, Any]]:
    """torch.export dynamic shapes of NativeTowerExport's inputs: n = merge^2 x LM tokens patches
    (a multiple, so the merger's reshape needs no runtime check) and n_win windows."""
    from torch.export import Dim

    tokens = Dim("image_tokens", min=1, max=max_tokens)
    windows = Dim("windows", min=1, max=max_tokens)  # a picture under 4 x 4 LM tokens is one window
    n = merge * merge * tokens
    return {"patches": {0: n}, "patch_rc": {0: n}, "window_gather": {0: windows}, "window_valid": {0: windows},
            "window_inverse": {0: n}}
