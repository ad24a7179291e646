"""SigLIP's vision tower (`transformers` SiglipVisionModel), from a vision-only or a full SigLIP folder."""
from __future__ import annotations

from typing import Any

from .base import TransformersTower


class SigLIP(TransformersTower):
    name = "siglip"
    title = "SigLIP"
    model_types = ("siglip", "siglip_vision_model")  # a full (text + vision) SigLIP is "siglip"
    config_class, model_class = "SiglipVisionConfig", "SiglipVisionModel"
    unused_parts = ("head.", "vision_model.head.")  # the attention-pooling head, built without
    cls_tokens = 0
    fixed_position_grid = True  # learned position embeddings for one grid

    def vision_part(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        if hf_config.get("model_type") == "siglip" and isinstance(hf_config.get("vision_config"), dict):
            return {**hf_config["vision_config"], "model_type": "siglip_vision_model"}
        return hf_config

    def pretrained_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        return {**super().pretrained_config(hf_config), "vision_use_head": False}


FAMILY = SigLIP()
