"""Stage 1: the autoregressive vision-language model (response-only next-token loss)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..model.config import EchoConfig
from ..model.echo_model import EchoModel
from .batches import build_ar_inputs, scored_cross_entropy
from .common import build_tokenizer, load_split, make_collate, make_dataset, preset
from .trainer import TrainConfig, train


@dataclass
class Stage1Config:
    data: str = "data/synth"
    out: str = "runs/ar"
    preset: str = "tiny"
    vocab_size: int = 1024
    vision_family: str = "vit"
    # Local Hugging Face folders to start from (echo_train/model/pretrained.py): a Qwen2/2.5/3 causal
    # LM (its tokenizer replaces the trained BPE) and a SigLIP / ViT / DINOv2 vision model. Either
    # may be given alone; the other part comes from the preset.
    init_lm: Optional[str] = None
    init_vision: Optional[str] = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=16, lr=2e-3))
    train_limit: Optional[int] = None


def ar_loss(model: EchoModel, batch: dict, gen: torch.Generator) -> torch.Tensor:
    return scored_cross_entropy(model, build_ar_inputs(model, batch))


def run_stage1(cfg: Stage1Config) -> dict:
    out = Path(cfg.out)
    if cfg.init_lm or cfg.init_vision:
        return _run_stage1_pretrained(cfg, out)
    train_studies = load_split(cfg.data, "train", cfg.train_limit)
    val_studies = load_split(cfg.data, "val")
    if (out / "tokenizer.json").is_file():  # resuming: the vocabulary must not change
        from runtime.text import ReportTokenizer

        tokenizer = ReportTokenizer.from_file(out / "tokenizer.json")
    else:
        tokenizer = build_tokenizer(train_studies, cfg.vocab_size)
    mcfg: EchoConfig = preset(cfg.preset)
    mcfg.lm.vocab_size = tokenizer.vocab_size
    mcfg.vision.family = cfg.vision_family
    mcfg.stage = "ar"
    torch.manual_seed(cfg.train.seed)
    model = EchoModel(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[stage1] AR model: {n_params / 1e6:.2f}M parameters, {len(train_studies)} training studies -> {out}")
    return train(model, tokenizer, make_dataset(train_studies, tokenizer, mcfg), make_collate(tokenizer), ar_loss,
                 cfg.train, out, make_dataset(val_studies, tokenizer, mcfg), desc="stage1 AR")


def _run_stage1_pretrained(cfg: Stage1Config, out: Path) -> dict:
    """Stage 1 from pretrained Hugging Face parts. Every refusal (PretrainedError) comes before
    anything is written, and with --init-lm before the data is read."""
    from runtime.text import ReportTokenizer

    from ..model.pretrained import build_pretrained_model, plan_pretrained

    base = preset(cfg.preset)
    base.vision.family = cfg.vision_family
    base.stage = "ar"
    parts = plan_pretrained(base, cfg.init_lm, cfg.init_vision)
    torch.manual_seed(cfg.train.seed)
    if (out / "training_state.pt").is_file() and (out / "config.json").is_file():
        # resuming: the saved config and tokenizer; the trainer loads the saved weights
        tokenizer = ReportTokenizer.from_file(out / "tokenizer.json")
        mcfg = EchoConfig.load(out / "config.json")
        model = EchoModel(mcfg)
        train_studies = load_split(cfg.data, "train", cfg.train_limit)
    else:
        train_studies = None
        if parts.tokenizer is None:  # vision only: the preset's LM with a BPE trained on the reports
            train_studies = load_split(cfg.data, "train", cfg.train_limit)
            parts.tokenizer = build_tokenizer(train_studies, cfg.vocab_size)
            parts.config.lm.vocab_size = parts.tokenizer.vocab_size
        tokenizer, mcfg = parts.tokenizer, parts.config
        model = build_pretrained_model(parts)  # tensors that do not map are refused here, before the data
        train_studies = train_studies or load_split(cfg.data, "train", cfg.train_limit)
    val_studies = load_split(cfg.data, "val")
    n_params = sum(p.numel() for p in model.parameters())
    added = getattr(tokenizer, "added_special_tokens", None)
    lm = (f"LM {parts.lm_folder} ({mcfg.lm.vocab_size} embedding rows"
          + (f", special tokens added: {' '.join(added)}" if added else "") + ")") if parts.lm_folder else "LM from the preset"
    v = mcfg.vision
    vis = f"{v.family} tower {parts.vision_folder} ({v.image_size} px, mean {v.image_mean}, std {v.image_std})" \
        if parts.vision_folder else f"{v.family} tower from the preset"
    print(f"[stage1] AR model from pretrained parts: {lm}; {vis}; {n_params / 1e6:.2f}M parameters, "
          f"{len(train_studies)} training studies -> {out}")
    return train(model, tokenizer, make_dataset(train_studies, tokenizer, mcfg), make_collate(tokenizer), ar_loss,
                 cfg.train, out, make_dataset(val_studies, tokenizer, mcfg), desc="stage1 AR")

