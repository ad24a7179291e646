"""The vision encoder: its family's tower, then (where the tower stops short of it) an MLP projector
to the LM width."""
from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .families import vision_family


class VisionEncoder(nn.Module):
    """pixel_values [b, C, S, S] -> image token embeddings [b, n_image_tokens, lm_width].

    The tower is its family's (families/): a `transformers` model random-initialised from the
    config's fields or rebuilt from a pretrained tower's hf_config, or Qwen2.5-VL's own."""

    def __init__(self, cfg: VisionConfig, lm_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.family = vision_family(cfg.family)
        self.tower = self.family.build_tower(cfg)
        if self.family.has_projector:
            width = self.tower.config.hidden_size
            self.projector = nn.Sequential(nn.Linear(width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
        else:  # the tower ends at the LM width (Qwen2.5-VL's patch merger)
            self.projector = nn.Identity()
        self.channels = self.family.channels(self.tower)
        self.normalize = cfg.image_mean is not None
        if self.normalize:
            scale, shift = channel_affine(cfg.image_mean, cfg.image_std or [1.0], self.channels)
            # not persistent: constants of the config, so checkpoints without them still load strictly
            self.register_buffer("pixel_scale", scale, persistent=False)
            self.register_buffer("pixel_shift", shift, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.channels:  # grayscale radiograph into an RGB tower
            pixel_values = pixel_values.expand(-1, self.channels, -1, -1)
        if self.normalize:
            pixel_values = pixel_values * self.pixel_scale + self.pixel_shift
        return self.projector(self.family.features(self.tower, pixel_values))


def channel_affine(mean: list[float], std: list[float], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, shift [C, 1, 1] that turn [-1, 1] pixels into (x01 - mean) / std per channel.

    x01 = (x + 1) / 2, so (x01 - mean) / std = x * 0.5 / std + (0.5 - mean) / std: one
    multiply-add, the same arithmetic in every precision of the exported graphs."""
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32)
    if m.numel() not in (1, channels) or s.numel() not in (1, channels):
        raise ValueError(f"image_mean / image_std have {m.numel()} / {s.numel()} values for a {channels}-channel tower")
    m, s = m.expand(channels), s.expand(channels)
    return (0.5 / s).view(-1, 1, 1).clone(), ((0.5 - m) / s).view(-1, 1, 1).clone()

