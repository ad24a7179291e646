"""The ECHO vision-language model: vision encoder + Qwen-compatible decoder.

The prefix is [image tokens][pads][BOS prompt] (runtime/prompt.py); image placeholders are
replaced by projected patch embeddings. Everything after the prefix is text.
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
        """[b, P, d]: image embeddings first, then the embedded prompt ids."""
        img = self.vision(pixel_values)
        return torch.cat([img, self.embed_tokens(prefix_ids[:, self.n_image_tokens :])], dim=1)

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
