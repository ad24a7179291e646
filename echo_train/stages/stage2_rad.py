"""Stage 2: RAD converts the AR model into a multi-step block-diffusion teacher."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from runtime.prompt import SUPPORTED_BLOCK_SIZES

from ..model.checkpoint import CheckpointError, load_checkpoint
from ..model.echo_model import EchoModel
from .batches import build_rad_inputs, scored_cross_entropy
from .common import load_split, make_collate, make_dataset
from .errors import StageError
from .trainer import TrainConfig, train


@dataclass
class Stage2Config:
    data: str = "data/synth"
    init: str = "runs/ar"
    out: str = "runs/base"
    block_size: int = 8
    n_noisy: int = 1  # K noisy copies of the response per sample
    symmetric: bool = False  # BD3-style duplication of the whole sequence (the ablation)
    shifted_prediction: bool = True  # block token j read from position j-1, as in AR (see EchoConfig)
    # The clean context keeps AR's causal attention (see EchoConfig), so the clean copy can keep
    # training as stage 1 did, with weight ar_weight. Measured on the demo (700 steps, 200 test
    # studies, teacher B=8, 8 steps, dynamic-ltr): block-causal, no AR loss 0.449 F1; causal + weight 1
    # 0.517; causal + weight 3 0.551 (stage-1 AR: 0.552). The AR loss is what keeps the teacher
    # grounded in the image while the diffusion loss converts it.
    causal_context: bool = True
    ar_weight: float = 3.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, batch_size=16, lr=1e-3))
    train_limit: Optional[int] = None


def make_diffusion_loss(block_size: int, mask_id: int, n_noisy: int = 1, symmetric: bool = False, ar_weight: float = 0.0):
    def loss(model: EchoModel, batch: dict, gen: torch.Generator) -> torch.Tensor:
        inputs = build_rad_inputs(model, batch, block_size, mask_id, gen, n_noisy, symmetric, ar_weight)
        return scored_cross_entropy(model, inputs)

    return loss


def run_stage2(cfg: Stage2Config) -> dict:
    if cfg.block_size not in SUPPORTED_BLOCK_SIZES:
        raise StageError(f"block size {cfg.block_size} not supported; choose from {SUPPORTED_BLOCK_SIZES}")
    try:
        model, tokenizer = load_checkpoint(cfg.init)
    except CheckpointError as e:
        raise StageError(f"stage 2 starts from a stage-1 checkpoint: {e}") from e
    if model.cfg.stage != "ar":
        print(f"[stage2] note: initialising from a '{model.cfg.stage}' checkpoint, not an AR one")
    if cfg.ar_weight > 0 and not cfg.causal_context:
        print("[stage2] note: no AR loss with a block-causal context (the clean copy is not a causal sequence)")
    if model.cfg.stage == "ar":
        model.cfg.shifted_prediction, model.cfg.causal_context = cfg.shifted_prediction, cfg.causal_context
    elif (model.cfg.shifted_prediction, model.cfg.causal_context) != (cfg.shifted_prediction, cfg.causal_context):
        print(f"[stage2] note: keeping the init checkpoint's shifted_prediction={model.cfg.shifted_prediction}, "
              f"causal_context={model.cfg.causal_context}")
    model.cfg.stage, model.cfg.block_size = "rad", cfg.block_size
    train_studies = load_split(cfg.data, "train", cfg.train_limit)
    val_studies = load_split(cfg.data, "val")
    mode = ("symmetric BD3-style" if cfg.symmetric else f"RAD (K={cfg.n_noisy})") + \
        (", shifted prediction" if model.cfg.shifted_prediction else ", aligned prediction") + \
        (f", causal context, AR weight {cfg.ar_weight:g}" if model.cfg.causal_context else ", block-causal context")
    print(f"[stage2] {mode}, block size {cfg.block_size}, from {cfg.init} -> {cfg.out}")
    loss = make_diffusion_loss(cfg.block_size, tokenizer.mask_id, cfg.n_noisy, cfg.symmetric, cfg.ar_weight)
    return train(model, tokenizer, make_dataset(train_studies, tokenizer, model.cfg), make_collate(tokenizer), loss,
                 cfg.train, Path(cfg.out), make_dataset(val_studies, tokenizer, model.cfg), desc=f"stage2 {mode}")
