"""DINOv2 (`transformers` Dinov2Model): interpolates its position embeddings, so any image size fits."""
from __future__ import annotations

from typing import Any

from ..config import VisionConfig
from .base import TransformersTower


class DINOv2(TransformersTower):
    name = "dinov2"
    title = "DINOv2"
    model_types = ("dinov2",)
    config_class, model_class = "Dinov2Config", "Dinov2Model"
    unused_parts = ("classifier.",)
    cls_tokens = 1

    def random_config(self, cfg: VisionConfig) -> dict[str, Any]:
        if cfg.intermediate_size % cfg.hidden_size:  # transformers 5 takes only a whole mlp_ratio
            raise ValueError(f"a DINOv2 tower needs intermediate_size ({cfg.intermediate_size}) to be a multiple of "
                             f"hidden_size ({cfg.hidden_size})")
        return {**super().random_config(cfg), "mlp_ratio": cfg.intermediate_size // cfg.hidden_size}


FAMILY = DINOv2()
