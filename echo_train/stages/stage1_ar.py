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
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=16, lr=2e-3))
    train_limit: Optional[int] = None


def ar_loss(model: EchoModel, batch: dict, gen: torch.Generator) -> torch.Tensor:
    return scored_cross_entropy(model, build_ar_inputs(model, batch))


def run_stage1(cfg: Stage1Config) -> dict:
    out = Path(cfg.out)
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
