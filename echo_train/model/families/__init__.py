"""The backbone families ECHO takes, one module each; adding a family is one module here (a Family
instance named FAMILY) plus its line in FAMILIES and its tests.

- siglip, vit, dinov2: `transformers` vision towers, random-initialised from a preset (the demo's
  tiny model has a ViT) or pretrained by `echo-train stage1 --init-vision`;
- qwen2: Qwen2 / Qwen2.5 / Qwen3 causal LMs, the decoder of every ECHO model, pretrained by
  `echo-train stage1 --init-lm`;
- qwen2_5_vl: whole Qwen2.5-VL models (ECHO's published checkpoints), by `echo-train import-hf`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import dinov2, qwen2, qwen2_5_vl, siglip, vit
from .base import Family, VisionFamily, refuse_architecture

FAMILIES: tuple[Family, ...] = (siglip.FAMILY, vit.FAMILY, dinov2.FAMILY, qwen2.FAMILY, qwen2_5_vl.FAMILY)
VISION_FAMILIES: dict[str, VisionFamily] = {f.name: f for f in FAMILIES if isinstance(f, VisionFamily)}


def vision_family(name: str) -> VisionFamily:
    """The family of VisionConfig.family `name`."""
    if name not in VISION_FAMILIES:
        raise ValueError(f"unknown vision family {name!r}; choose from {tuple(VISION_FAMILIES)}")
    return VISION_FAMILIES[name]


def family_of_folder(folder: Path, hf_config: dict[str, Any], taken_by: str) -> Family:
    """The family among those `taken_by` (an option or command) takes whose folders have this
    config.json; refused naming the architecture, what `taken_by` takes and what takes the folder."""
    takers = [f for f in FAMILIES if f.taken_by == taken_by]
    for f in takers:
        if f.accepts(hf_config):
            return f
    hint = next((h for f in takers if (h := f.refusal_hint(hf_config))), "")
    refuse_architecture(folder, hf_config, taken_by, FAMILIES, hint)
