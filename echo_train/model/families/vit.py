"""ViT (`transformers` ViTModel): the demo presets' default tower, or a pretrained one by --init-vision."""
from __future__ import annotations

from .base import TransformersTower


class ViT(TransformersTower):
    name = "vit"
    title = "ViT"
    model_types = ("vit",)
    config_class, model_class = "ViTConfig", "ViTModel"
    model_kwargs = {"add_pooling_layer": False}  # ECHO reads the patch tokens only
    unused_parts = ("pooler.", "classifier.")  # an image classifier's folder holds both
    cls_tokens = 1
    fixed_position_grid = True  # learned position embeddings for one grid


FAMILY = ViT()
