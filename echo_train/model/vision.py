"""Vision tower (a `transformers` model chosen by family) and the MLP projector to the LM width."""
from __future__ import annotations

import torch
from torch import nn

from .config import VISION_FAMILIES, VisionConfig


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """Random-initialised tower of the configured family, or a local pretrained folder."""
    if cfg.family not in VISION_FAMILIES:
        raise ValueError(f"unknown vision family {cfg.family!r}; choose from {VISION_FAMILIES}")
    # eager attention: SDPA's exported form carries float32-min masks that overflow fp16 graphs
    common = dict(
        attn_implementation="eager",
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        num_channels=cfg.num_channels,
    )
    if cfg.family == "vit":
        from transformers import ViTConfig, ViTModel

        if cfg.pretrained_path:
            return ViTModel.from_pretrained(cfg.pretrained_path, add_pooling_layer=False, attn_implementation="eager")
        return ViTModel(ViTConfig(**common), add_pooling_layer=False)
    if cfg.family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        if cfg.pretrained_path:
            return Dinov2Model.from_pretrained(cfg.pretrained_path, attn_implementation="eager")
        return Dinov2Model(Dinov2Config(**{**common, "mlp_ratio": cfg.intermediate_size / cfg.hidden_size}))
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if cfg.pretrained_path:
        return SiglipVisionModel.from_pretrained(cfg.pretrained_path, attn_implementation="eager")
    return SiglipVisionModel(SiglipVisionConfig(**common))


class VisionEncoder(nn.Module):
    """pixel_values [b, C, S, S] -> image token embeddings [b, n_image_tokens, lm_width]."""

    def __init__(self, cfg: VisionConfig, lm_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = build_vision_tower(cfg)
        width = self.tower.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
        # ViT and DINOv2 prepend a CLS token; SigLIP has none. Image tokens are the patches only.
        self.n_skip = 0 if cfg.family == "siglip" else 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want = self.tower.config.num_channels
        if pixel_values.shape[1] != want:  # grayscale radiograph into an RGB tower
            pixel_values = pixel_values.expand(-1, want, -1, -1)
        h = self.tower(pixel_values=pixel_values).last_hidden_state[:, self.n_skip :]
        return self.projector(h)
