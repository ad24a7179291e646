"""Qwen2.5-VL (`echo-train import-hf`): a whole vision-language model, ECHO's published checkpoints
among them. Its decoder is a Qwen2 decoder with multimodal rotary positions (MRoPE); its vision
tower (qwen2_5_vl_vision.Qwen25VisionTower) ends in a patch merger already at the decoder's width.

Its folders come in two layouts of tensor names, the hub's (`model.layers.*`, `visual.*`) and the
one newer `transformers` keeps in memory (`model.language_model.*`, `model.visual.*`); both map
onto EchoModel's names (ours_of)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from runtime.native_image import CLIP_MEAN, CLIP_STD, DEFAULT_MIN_PIXELS

from ..config import LMConfig, VisionConfig
from ..errors import PretrainedError, refuse_unmapped
from ..hf_folder import EMBEDDING_ROWS, read_json
from .base import VisionFamily
from .qwen2 import decoder_config

# What only a Qwen2.5-VL vision tower's config has (Qwen2-VL's has none of them)
VISION_KEYS = ("fullatt_block_indexes", "window_size", "out_hidden_size")
# checkpoint name prefix -> EchoModel's, in the order they are tried (the longer first)
NAME_PREFIXES = (("model.visual.", "vision.tower."), ("visual.", "vision.tower."),
                 ("model.language_model.", "lm.model."), ("lm_head.", "lm.lm_head."), ("model.", "lm.model."))


def text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings: hub configs keep them at the top level, newer ones in text_config."""
    return {**d, **(d.get("text_config") or {})}


def _rope(text: dict[str, Any]) -> tuple[float, list[int]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = float(text.get("rope_theta") or rope.get("rope_theta") or 1000000.0)
    section = rope.get("mrope_section")
    if not section:
        raise PretrainedError("config.json: no mrope_section (rope_scaling / rope_parameters): not a Qwen2.5-VL decoder")
    return theta, [int(x) for x in section]


def missing_settings(d: dict[str, Any]) -> list[str]:
    """The Qwen2.5-VL settings a config.json lacks (none: it describes a Qwen2.5-VL model)."""
    vision = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else {}
    rope = text_config(d).get("rope_parameters") or text_config(d).get("rope_scaling") or {}
    missing = [f"vision_config.{k}" for k in VISION_KEYS if k not in vision]
    return missing + ([] if rope.get("mrope_section") else ["rope_parameters.mrope_section"])


def processor_config(folder: Path) -> dict[str, Any]:
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        raise PretrainedError(f"{folder}: no preprocessor_config.json (the image processor's mean, std and pixel "
                              "bounds are read from it)")
    return read_json(p, "the image processor's configuration")


def mean_std(folder: Path) -> tuple[list[float], list[float]]:
    pre = processor_config(folder)
    mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)  # Qwen2-VL's processor defaults
    return [float(x) for x in mean], [float(x) for x in std]


def pixel_bounds(folder: Path, min_pixels: Optional[int], max_pixels: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) of native resolution: `min_pixels`, else the folder's processor's
    (`min_pixels`, or `size.shortest_edge` as newer processors write it); `max_pixels` as given
    (the official code passes 2,250,000 whatever the folder says)."""
    pre = processor_config(folder)
    lo = min_pixels or pre.get("min_pixels") or (pre.get("size") or {}).get("shortest_edge") or DEFAULT_MIN_PIXELS
    if not 0 < int(lo) <= max_pixels:
        raise PretrainedError(f"--max-pixels {max_pixels} is below the processor's min_pixels {lo}")
    return int(lo), int(max_pixels)


class Qwen25VL(VisionFamily):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
    taken_by = "import-hf"
    command = "echo-train import-hf"
    cls_tokens = 0
    has_projector = False  # the tower's patch merger writes the decoder's width

    # ------------------------------------------------------------------------ which folders
    def accepts(self, d: dict[str, Any]) -> bool:
        """model_type qwen2_5_vl, or a folder whose own model class is remote code (the released ECHO
        checkpoints: `auto_map`, their own architecture names) but whose config is Qwen2.5-VL's.
        Recognised from the config alone: no remote code is ever executed."""
        return super().accepts(d) or (bool(d.get("auto_map")) and not missing_settings(d))

    def refusal_hint(self, d: dict[str, Any]) -> str:
        if d.get("auto_map"):  # remote code (never run): say which Qwen2.5-VL setting its config lacks
            return f" (its model class is remote code; its config lacks {', '.join(missing_settings(d))})"
        return ""

    # ------------------------------------------------------------------------ configuration
    def configs(self, folder: Path, d: dict[str, Any], image_size: int, **settings: Any) -> tuple[LMConfig, VisionConfig]:
        """The decoder's and the tower's configs of config.json `d`, the tower at a square `image_size`
        grid; `settings`: VisionConfig's preprocessing and native-resolution fields as the import
        chose them. The decoder's MRoPE image grid is left to the caller (it follows the images)."""
        vision = d.get("vision_config")
        if not isinstance(vision, dict):
            raise PretrainedError(f"{folder / 'config.json'}: no vision_config")
        text = text_config(d)
        theta, section = _rope(text)
        tie = bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        try:
            lm = decoder_config({k: v for k, v in text.items() if k != "head_dim"}, rope_theta=theta, tie=tie,
                                max_positions=32768, mrope_section=section)
            patch, merge = int(vision.get("patch_size", 14)), int(vision.get("spatial_merge_size", 2))
            hidden, out_width = int(vision["hidden_size"]), int(vision["out_hidden_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise PretrainedError(f"{folder / 'config.json'}: incomplete Qwen2.5-VL configuration ({e!r})") from None
        if out_width != lm.hidden_size:
            raise PretrainedError(f"{folder}: the vision merger writes width {out_width}, the decoder takes {lm.hidden_size}")
        if image_size % (patch * merge):
            raise PretrainedError(f"--image-size {image_size} is not a multiple of patch x merge = {patch * merge} px")
        mean, std = mean_std(folder)
        vcfg = VisionConfig(family=self.name, image_size=image_size, patch_size=patch, merge_size=merge,
                            hidden_size=hidden, num_hidden_layers=int(vision.get("depth", 32)),
                            num_attention_heads=int(vision.get("num_heads", 16)),
                            intermediate_size=int(vision.get("intermediate_size", hidden * 4)),
                            num_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
                            hf_config={k: v for k, v in vision.items() if k not in ("dtype", "torch_dtype")},
                            image_mean=mean, image_std=std, **settings)
        return lm, vcfg

    # ------------------------------------------------------------------------ the vision tower
    def build_tower(self, cfg: VisionConfig) -> nn.Module:
        from ..qwen2_5_vl_vision import Qwen25VisionTower

        if cfg.hf_config is None:
            raise ValueError("a qwen2_5_vl vision tower needs its hf_config (echo-train import-hf writes it)")
        return Qwen25VisionTower(cfg.hf_config, cfg.image_size)

    def channels(self, tower: nn.Module) -> int:
        return tower.patch_embed.proj.in_channels

    def features(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return tower(pixel_values)

    # ------------------------------------------------------------------------ tensor names
    def ours_of(self, name: str) -> Optional[str]:
        """A checkpoint tensor's name in EchoModel, or None when it has no place there."""
        for prefix, ours in NAME_PREFIXES:
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        return None

    def name_map(self, folder: Path, own: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                 rows: int, tied: bool) -> dict[str, str]:
        """Checkpoint name -> ours for every tensor of the folder (`shapes`: checkpoint name -> shape),
        refused when any has no place in `own` (EchoModel's state_dict, shapes only) or another
        shape; the embedding (and an untied head) may have fewer rows, up to `rows`."""
        grown = {"lm." + n for n in EMBEDDING_ROWS}
        mapping, unexpected, wrong = {}, [], []
        for name, shape in sorted(shapes.items()):
            ours = self.ours_of(name)
            if "rotary_emb" in name or (ours == "lm.lm_head.weight" and tied):
                continue
            if ours is None or ours not in own:
                unexpected.append(name)
                continue
            want = tuple(own[ours].shape)
            fewer_rows = ours in grown and shape[0] <= rows and shape[1:] == want[1:]
            if shape != want and not fewer_rows:
                wrong.append(f"{name} {shape} vs {want}")
                continue
            mapping[name] = ours
        missing = sorted(set(own) - set(mapping.values()) - ({"lm.lm_head.weight"} if tied else set()))
        refuse_unmapped(folder, "a Qwen2.5-VL model", unexpected, missing, wrong)
        return mapping


FAMILY = Qwen25VL()
