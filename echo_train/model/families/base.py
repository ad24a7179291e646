"""What a backbone family is to ECHO: the Hugging Face architecture (config.json `model_type`s)
it takes, the command that takes it, and, for a vision tower, how the tower is built, what its
output holds and how its folder's weights load.

A family is one module of this package holding one instance of these classes, listed in
families/__init__.py; everything that depends on the family asks it (vision.py, pretrained.py,
qwen2_5_vl.py) instead of comparing names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..config import VisionConfig
from ..errors import PretrainedError, refuse_unmapped


class Family:
    """A Hugging Face architecture ECHO takes in, and where."""

    name: str = ""  # VisionConfig.family for a vision tower
    title: str = ""  # in messages: "SigLIP", "Qwen2.5-VL"
    model_types: tuple[str, ...] = ()  # config.json model_type values of its folders
    taken_by: str = ""  # the option or command that takes its folders: "--init-lm", "import-hf"
    command: str = ""  # that command line in full, for a hint: "echo-train stage1 --init-lm"

    def accepts(self, hf_config: dict[str, Any]) -> bool:
        return hf_config.get("model_type") in self.model_types

    def refusal_hint(self, hf_config: dict[str, Any]) -> str:
        """What to add to the refusal of a folder this family does not accept ("": nothing)."""
        return ""


class VisionFamily(Family):
    """A vision tower: built from a VisionConfig, pixels in, one embedding per image token out."""

    cls_tokens: int = 0  # tokens the tower puts before the patches (ViT's CLS); not image tokens
    has_projector: bool = True  # False: the tower's output is already at the LM's width
    fixed_position_grid: bool = False  # learned positions for one grid: the image size is fixed

    def build_tower(self, cfg: VisionConfig) -> nn.Module:
        raise NotImplementedError

    def channels(self, tower: nn.Module) -> int:
        raise NotImplementedError

    def features(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """[b, n_image_tokens, width] of normalised pixels [b, C, S, S]."""
        raise NotImplementedError

    def vision_part(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """The vision tower's settings of a folder's config.json (the whole of it by default)."""
        return hf_config

    def load_weights(self, tower: nn.Module, folder: Path, what: str) -> None:
        raise PretrainedError(f"{folder}: a {self.name} tower is not taken from a vision folder ({self.taken_by})")


class TransformersTower(VisionFamily):
    """A tower that is a `transformers` vision model, built by its config and model classes.

    Eager attention everywhere: SDPA's exported form carries float32-min masks that overflow fp16
    graphs."""

    taken_by = "--init-vision"
    command = "echo-train stage1 --init-vision"
    config_class: str = ""  # names in `transformers`, imported on first use
    model_class: str = ""
    model_kwargs: dict[str, Any] = {}  # constructor and from_pretrained options of model_class
    # parts of a folder's weights the tower is built without (heads ECHO never reads), as
    # `transformers` names them when loading
    unused_parts: tuple[str, ...] = ()

    def classes(self) -> tuple[type, type]:
        import transformers

        return getattr(transformers, self.config_class), getattr(transformers, self.model_class)

    def random_config(self, cfg: VisionConfig) -> dict[str, Any]:
        """The `transformers` config of a random-initialised tower sized by the VisionConfig fields."""
        return dict(attn_implementation="eager", image_size=cfg.image_size, patch_size=cfg.patch_size,
                    hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                    num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                    num_channels=cfg.num_channels)

    def pretrained_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """The `transformers` config of a pretrained tower's architecture (its weights load after).
        Heads ECHO never reads are left out: only the patch tokens of the last hidden state feed the
        projector, and parameters without gradient would only cost memory."""
        d = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype", "architectures", "transformers_version")}
        return {**d, "attn_implementation": "eager"}

    def build_tower(self, cfg: VisionConfig) -> nn.Module:
        config_class, model_class = self.classes()
        d = self.random_config(cfg) if cfg.hf_config is None else self.pretrained_config(cfg.hf_config)
        return model_class(config_class(**d), **self.model_kwargs)

    def channels(self, tower: nn.Module) -> int:
        return tower.config.num_channels

    def features(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return tower(pixel_values=pixel_values).last_hidden_state[:, self.cls_tokens :]

    def load_weights(self, tower: nn.Module, folder: Path, what: str) -> None:
        """The folder's weights into `tower`, through `transformers`' own loader.

        Its loader knows every checkpoint layout of these families (names as older versions saved
        them, a full SigLIP's vision half, a ViT classifier's base); ECHO adds the refusal: every
        tensor must find its parameter, every parameter its tensor, with the same shape."""
        loaded, info = _quiet_from_pretrained(type(tower), folder, tower.config, self.model_kwargs)
        unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(self.unused_parts))
        missing = sorted(info.get("missing_keys", []))
        wrong = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", []))
        refuse_unmapped(folder, what, unexpected, missing, wrong)
        tower.load_state_dict(loaded.state_dict())


def _quiet_from_pretrained(model_class: type, folder: Path, config: Any, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    """model_class.from_pretrained(folder) with transformers' progress bars and warnings off (its
    refusals are ECHO's to word), any failure a PretrainedError."""
    import transformers

    progress = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(str(folder), config=config, output_loading_info=True,
                                           attn_implementation="eager", **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"{folder}: the vision weights do not load ({str(e).splitlines()[0][:300]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()


def refuse_architecture(folder: Path, hf_config: dict[str, Any], wanted: str, families: tuple[Family, ...],
                        hint: str = "") -> NoReturn:
    """The one refusal of a folder whose architecture the option or command `wanted` does not take:
    what the folder is, what `wanted` takes, and (`hint`, else from the families) what takes it."""
    mt = hf_config.get("model_type")
    arch = ", ".join(hf_config.get("architectures") or []) or "no architectures listed"
    takers = [f for f in families if f.taken_by == wanted]
    titles = [f.title for f in takers]
    titles = " or ".join(titles) if len(titles) < 3 else ", ".join(titles[:-1]) + " or " + titles[-1]
    types = ", ".join(sorted({t for f in takers for t in f.model_types}))
    other = next((f for f in families if f.taken_by != wanted and mt in f.model_types), None)
    if not hint and other is not None:
        hint = f" (a {other.title} folder: {other.command})"
    raise PretrainedError(f"{folder}: unsupported architecture {mt!r} ({arch}); {wanted} takes {titles} "
                          f"(model_type {types}){hint}")
