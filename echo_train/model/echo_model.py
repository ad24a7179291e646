"""The ECHO vision-language model: vision encoder + Qwen-compatible decoder.

The prefix is [image tokens][pads][BOS prompt], or an imported model's own template with the image
inside the prompt (runtime/prompt.py); image placeholders are replaced by projected patch
embeddings. Everything after the prefix is text.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backbone import KV, QwenDecoder
from .config import EchoConfig
from .vision import VisionEncoder


class EchoModel(nn.Module):
    def __init__(self, cfg: EchoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision, cfg.lm.hidden_size)
        self.lm = QwenDecoder(cfg.lm)

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.n_image_tokens

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(ids)

    def embed_prefix(self, pixel_values: torch.Tensor, prefix_ids: torch.Tensor) -> torch.Tensor:
        """[b, P, d]: the embedded prompt ids with the image embeddings in place of the image
        placeholders (at the template's image start; first in ECHO's own prefix)."""
        img = self.vision(pixel_values)
        s, e = self.cfg.image_start, self.cfg.image_start + self.n_image_tokens
        parts = ([self.embed_tokens(prefix_ids[:, :s])] if s else []) + [img, self.embed_tokens(prefix_ids[:, e:])]
        return torch.cat(parts, dim=1)

    def embed_prefix_native(self, prefix_ids: torch.Tensor, patches: torch.Tensor, patch_rc: torch.Tensor,
                            window_gather: torch.Tensor, window_valid: torch.Tensor,
                            window_inverse: torch.Tensor) -> torch.Tensor:
        """[1, T, d]: one image at its own grid (runtime/native_image.NativeImage's arrays) in place of
        the placeholders that start at the template's image start. The ids may stop anywhere after
        the image. Every shape follows the inputs (no data-dependent Python), so this exports with the
        patch and token counts dynamic."""
        img = self.vision.tower.forward_native(patches, patch_rc, window_gather, window_valid, window_inverse)
        s = self.cfg.image_start
        pos = torch.arange(prefix_ids.shape[1], device=prefix_ids.device)
        inside = (pos >= s) & (pos < s + img.shape[0])
        # Max / Min, not Clip: TensorRT's Clip takes floats only (echo_export/trt_ops.py)
        rows = torch.minimum(torch.maximum(pos - s, torch.zeros_like(pos)), torch.full_like(pos, img.shape[0] - 1))
        text = self.embed_tokens(prefix_ids)
        return torch.where(inside[None, :, None], img[rows][None].to(text.dtype), text)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        past: Optional[list[KV]] = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Logits [b,T,V] and the (k, v) of these tokens per layer."""
        h, kv = self.lm(inputs_embeds, position_ids, mask, past)
        return self.lm.lm_head(h), kv
