"""Vision tower (a `transformers` model chosen by family) and the MLP projector to the LM width."""
from __future__ import annotations

import torch
from torch import nn

from .config import VISION_FAMILIES, VisionConfig


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """Random-initialised tower of the configured family, or a local pretrained folder."""
    if cfg.family not in VISION_FAMILIES:
        raise ValueError(f"unknown vision family {cfg.family!r}; choose from {VISION_FAMILIES}")
    if cfg.hf_config is not None:
        return tower_from_hf_config(cfg.family, cfg.hf_config)
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
        if cfg.intermediate_size % cfg.hidden_size:  # transformers 5 takes only a whole mlp_ratio
            raise ValueError(f"a DINOv2 tower needs intermediate_size ({cfg.intermediate_size}) to be a multiple of "
                             f"hidden_size ({cfg.hidden_size})")
        return Dinov2Model(Dinov2Config(**{**common, "mlp_ratio": cfg.intermediate_size // cfg.hidden_size}))
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if cfg.pretrained_path:
        return SiglipVisionModel.from_pretrained(cfg.pretrained_path, attn_implementation="eager")
    return SiglipVisionModel(SiglipVisionConfig(**common))


def tower_from_hf_config(family: str, hf_config: dict) -> nn.Module:
    """The architecture of a pretrained tower from its config dict, random weights (loaded after).

    Heads that ECHO never reads are left out (SigLIP's attention-pooling head, ViT's pooler): only
    the patch tokens of the last hidden state feed the projector, and parameters without gradient
    would only cost memory."""
    d = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype", "architectures", "transformers_version")}
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig(**d, attn_implementation="eager"), add_pooling_layer=False)
    if family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**d, attn_implementation="eager"))
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**{**d, "vision_use_head": False}, attn_implementation="eager"))


class VisionEncoder(nn.Module):
    """pixel_values [b, C, S, S] -> image token embeddings [b, n_image_tokens, lm_width]."""

    def __init__(self, cfg: VisionConfig, lm_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        # Qwen2.5-VL's tower ends in its own patch merger, already at the LM width: no projector
        self.merged = cfg.family == "qwen2_5_vl"
        if self.merged:
            from .qwen2_5_vl_vision import Qwen25VisionTower

            if cfg.hf_config is None:
                raise ValueError("a qwen2_5_vl vision tower needs its hf_config (echo-train import-hf writes it)")
            self.tower = Qwen25VisionTower(cfg.hf_config, cfg.image_size)
            self.projector = nn.Identity()
            self.channels = self.tower.patch_embed.proj.in_channels
        else:
            self.tower = build_vision_tower(cfg)
            width = self.tower.config.hidden_size
            self.projector = nn.Sequential(nn.Linear(width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
            self.channels = self.tower.config.num_channels
        # ViT and DINOv2 prepend a CLS token; SigLIP has none. Image tokens are the patches only.
        self.n_skip = 0 if cfg.family in ("siglip", "qwen2_5_vl") else 1
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
        if self.merged:
            return self.tower(pixel_values)
        h = self.tower(pixel_values=pixel_values).last_hidden_state[:, self.n_skip :]
        return self.projector(h)


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

