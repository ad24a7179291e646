"""Checkpoint folders: config.json, model.safetensors, tokenizer.json, training_state.pt.

Writes go to a sibling temp folder that is renamed into place, so an interrupted save never
leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_model

from runtime.text import ReportTokenizer

from .backbone import QwenDecoder
from .config import EchoConfig
from .echo_model import EchoModel

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class CheckpointError(Exception):
    """A checkpoint folder is missing files or holds the wrong kind of model."""


def save_checkpoint(
    out_dir: str | Path,
    model: EchoModel,
    tokenizer: ReportTokenizer,
    training_state: Optional[dict[str, Any]] = None,
) -> Path:
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.cfg.save(tmp / "config.json")
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save(tmp / "tokenizer.json")
    if training_state is not None:
        torch.save(training_state, tmp / "training_state.pt")
    return swap_into_place(tmp, out)


def swap_into_place(tmp: Path, out: Path) -> Path:
    """Replace folder `out` by the finished folder `tmp` with renames only, never half-written."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out


def check_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint folder not found")
    missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d}: not a complete checkpoint, missing {', '.join(missing)}")
    return d


def load_checkpoint(ckpt_dir: str | Path, map_location: str = "cpu") -> tuple[EchoModel, ReportTokenizer]:
    d = check_checkpoint_dir(ckpt_dir)
    try:
        cfg = EchoConfig.load(d / "config.json")
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:  # ValueError: a bad prompt template
        raise CheckpointError(f"{d / 'config.json'}: not an ECHO config ({e})") from None
    model = EchoModel(cfg)
    load_model(model, str(d / "model.safetensors"), device=map_location)
    model.eval()
    return model, ReportTokenizer.from_file(d / "tokenizer.json", cfg.prompt_template)


def load_training_state(ckpt_dir: str | Path) -> Optional[dict[str, Any]]:
    p = Path(ckpt_dir) / "training_state.pt"
    return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None


def load_qwen_decoder(hf_dir: str | Path) -> QwenDecoder:
    """A Qwen2/Qwen3 causal LM from a local Hugging Face folder (config.json + *.safetensors).

    Refusals (PretrainedError, a CheckpointError): an unsupported architecture, a missing shard,
    tensors that do not map onto the decoder."""
    from .pretrained import check_folder, lm_config_from_folder, load_lm_state, load_mapped

    d = check_folder(hf_dir, "Qwen folder")
    cfg, _ = lm_config_from_folder(d)
    model = QwenDecoder(cfg)
    own = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    load_mapped(own, load_lm_state(d, cfg, cfg.vocab_size), d, f"a {cfg.num_hidden_layers}-layer Qwen decoder")
    return model.eval()
