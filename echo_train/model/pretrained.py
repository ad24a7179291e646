"""Start ECHO from pretrained Hugging Face parts: a Qwen2 / Qwen2.5 / Qwen3 causal LM and a SigLIP,
ViT or DINOv2 vision tower, each from a local folder.

What comes from where:
- the LM folder: config.json (architecture), the safetensors shards, tokenizer.json. Our special
  tokens are added to that tokenizer (echo_train/data/tokenizer.py) and the embedding rows (and an
  untied lm_head) grow to the tokenizer's ids; the new rows start at the mean of the existing ones,
  so the new tokens begin as "an average token" instead of a random direction of unknown size.
- the vision folder: config.json (the tower's architecture, kept whole in VisionConfig.hf_config so
  the checkpoint rebuilds it without the folder), the weights, and preprocessor_config.json (image
  size, mean, std: the model applies them to the [-1, 1] grey pixels of runtime/preprocess.py).
- the projector: fresh, its output layer scaled so that image tokens start at the size of the
  LM's own token embeddings.

Every way a folder can fail to fit raises PretrainedError with one message, before anything is
written: an unsupported architecture, a missing shard, tensors that do not map (named, first few),
a tokenizer that cannot carry the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from runtime.text import ReportTokenizer

from .config import EchoConfig, LMConfig, VisionConfig
from .errors import PretrainedError
from .families import family_of_folder
from .families.base import TransformersTower
from .families.qwen2 import FAMILY as QWEN2
from .hf_folder import check_folder, read_json, weight_files


# ---------------------------------------------------------------------------- the language model
def lm_config_from_folder(folder: Path) -> tuple[LMConfig, dict[str, Any]]:
    d = read_json(folder / "config.json", "the model's configuration")
    family_of_folder(folder, d, QWEN2.taken_by)
    return QWEN2.config_of(folder, d), d


def load_qwen_decoder(hf_dir: str | Path) -> nn.Module:
    """A Qwen2/Qwen3 causal LM (backbone.QwenDecoder, eval mode) from a local Hugging Face folder
    (config.json + *.safetensors).

    Refusals (PretrainedError, a CheckpointError): an unsupported architecture, a missing shard,
    tensors that do not map onto the decoder."""
    from .backbone import QwenDecoder

    d = check_folder(hf_dir, "Qwen folder")
    cfg, _ = lm_config_from_folder(d)
    model = QwenDecoder(cfg)
    QWEN2.load_decoder_weights(model, d, cfg)
    return model.eval()


# ---------------------------------------------------------------------------- the vision tower
def _square_size(pre: dict[str, Any], key: str) -> Optional[int]:
    v = pre.get(key)
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        if "height" in v and "width" in v:
            if v["height"] != v["width"]:
                raise PretrainedError(f"preprocessor {key} {v['height']}x{v['width']} is not square; ECHO feeds "
                                      "square images")
            return int(v["height"])
        if "shortest_edge" in v:
            return int(v["shortest_edge"])
    return None


def _image_size(folder: Path, pre: dict[str, Any], d: dict[str, Any], family: TransformersTower) -> tuple[int, int]:
    """(image size, patch size): the processor's size (its crop where it crops), else the tower's own."""
    size = _square_size(pre, "crop_size") if pre.get("do_center_crop") else None
    size = size or _square_size(pre, "size")
    patch = int(d.get("patch_size", 16))
    own_size = int(d.get("image_size", size or 224))
    if size is None:
        size = own_size
    if family.fixed_position_grid and size != own_size:
        raise PretrainedError(f"{folder}: the processor resizes to {size} px but the {family.name} tower was built for "
                              f"{own_size} px")
    if size % patch:
        raise PretrainedError(f"{folder}: image size {size} is not a multiple of the patch size {patch}")
    return size, patch


def _mean_std(folder: Path, pre: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The processor's per-channel mean and std (on pixels scaled to [0, 1])."""
    if pre.get("do_rescale", True) and abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise PretrainedError(f"{folder}: rescale_factor {pre.get('rescale_factor')} is not 1/255")
    if pre.get("do_normalize", True):
        mean, std = pre.get("image_mean"), pre.get("image_std")
        if mean is None or std is None:
            raise PretrainedError(f"{folder / 'preprocessor_config.json'}: do_normalize without image_mean / image_std")
    else:
        mean, std = [0.0], [1.0]
    mean = [float(x) for x in (mean if isinstance(mean, list) else [mean])]
    std = [float(x) for x in (std if isinstance(std, list) else [std])]
    return mean, std


def vision_config_from_folder(folder: Path) -> VisionConfig:
    d = read_json(folder / "config.json", "the vision model's configuration")
    family = family_of_folder(folder, d, TransformersTower.taken_by)
    d = family.vision_part(d)
    pre = read_json(folder / "preprocessor_config.json",
                    "the image processor's configuration: image size, mean and std are read from it")
    size, patch = _image_size(folder, pre, d, family)
    mean, std = _mean_std(folder, pre)
    hidden = int(d.get("hidden_size", 768))
    return VisionConfig(
        family=family.name, image_size=size, patch_size=patch, hidden_size=hidden,
        num_hidden_layers=int(d.get("num_hidden_layers", 12)), num_attention_heads=int(d.get("num_attention_heads", 12)),
        intermediate_size=int(d.get("intermediate_size") or hidden * float(d.get("mlp_ratio", 4))),
        num_channels=int(d.get("num_channels", 3)), hf_config=d, image_mean=mean, image_std=std,
    )


# ---------------------------------------------------------------------------- the whole model
@dataclass
class PretrainedParts:
    """What `echo-train stage1 --init-lm/--init-vision` starts from."""

    config: EchoConfig
    tokenizer: Optional[ReportTokenizer]  # the LM's own, with our special tokens; None without --init-lm
    lm_folder: Optional[Path] = None
    vision_folder: Optional[Path] = None


def pretrained_tokenizer(folder: Path) -> ReportTokenizer:
    """The LM folder's tokenizer.json with our special tokens added; refused if it cannot carry the prompt."""
    from ..data.tokenizer import load_tokenizer, lost_prompt_text

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no tokenizer.json (the fast tokenizer file); ECHO uses the LM's own "
                              "tokenizer and cannot build one from vocab.json/merges.txt here")
    try:
        tok = load_tokenizer(path, add_missing=True)
    except Exception as e:  # tokenizers raises its own exception types on a damaged file
        raise PretrainedError(f"{path}: unreadable tokenizer ({e})") from None
    lost = lost_prompt_text(tok)
    if lost:
        raise PretrainedError(f"{path}: the tokenizer lacks the tokens to encode the prompt (lost: {lost!r}); "
                              "a tokenizer with byte fallback (byte-level BPE, as Qwen's) is needed")
    return tok


def plan_pretrained(base: EchoConfig, lm_folder: Optional[str | Path], vision_folder: Optional[str | Path]) -> PretrainedParts:
    """Check both folders and work out the model config; reads configs and the tokenizer, no weights."""
    cfg = EchoConfig.from_dict(base.to_dict())
    tok = None
    lm_dir = vis_dir = None
    if lm_folder is not None:
        from ..data.tokenizer import tokenizer_rows

        lm_dir = check_folder(lm_folder, "--init-lm")
        lm_cfg, _ = lm_config_from_folder(lm_dir)
        weight_files(lm_dir)  # a missing shard is refused before anything else is read
        tok = pretrained_tokenizer(lm_dir)
        lm_cfg.vocab_size = max(lm_cfg.vocab_size, tokenizer_rows(tok))
        cfg.lm = lm_cfg
    if vision_folder is not None:
        vis_dir = check_folder(vision_folder, "--init-vision")
        cfg.vision = vision_config_from_folder(vis_dir)
        weight_files(vis_dir)
    return PretrainedParts(cfg, tok, lm_dir, vis_dir)


def build_pretrained_model(parts: PretrainedParts):
    """The EchoModel of `parts.config` with the pretrained weights in and the projector initialised."""
    from .echo_model import EchoModel

    model = EchoModel(parts.config)
    if parts.lm_folder is not None:
        QWEN2.load_decoder_weights(model.lm, parts.lm_folder, parts.config.lm)
    if parts.vision_folder is not None:
        model.vision.family.load_weights(model.vision.tower, parts.vision_folder,
                                         f"a {parts.config.vision.family} vision tower")
    if parts.lm_folder is not None or parts.vision_folder is not None:
        init_projector(model)
    return model.eval()


@torch.no_grad()
def init_projector(model) -> None:
    """Scale the projector's output layer so image tokens start at the RMS size of the LM's token
    embeddings (measured on a mid-grey image): a pretrained LM has never seen inputs far larger or
    smaller than its own embeddings, and PyTorch's default init gives neither."""
    last = model.vision.projector[-1]
    nn.init.zeros_(last.bias)
    S = model.cfg.vision.image_size
    was_training = model.training
    model.eval()
    img = model.vision(torch.zeros(1, 1, S, S))
    model.train(was_training)
    emb = model.lm.model.embed_tokens.weight
    want = emb.float().pow(2).mean().sqrt()
    got = img.float().pow(2).mean().sqrt()
    if got > 0:
        last.weight.mul_(want / got)
