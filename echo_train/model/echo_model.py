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
