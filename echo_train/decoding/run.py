"""Decode a list of studies with any reference decoder, in batches, with counts of passes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from runtime.preprocess import preprocess_image
from runtime.schedule import DEFAULT_UNMASK_RULE
from runtime.text import ReportTokenizer

from ..data.study import Study
from ..model.echo_model import EchoModel
from .ar import ar_generate
from .block_diffusion import DecodeResult, fused_onestep_generate, multistep_generate

MODES = ("ar", "multistep", "onestep", "onestep-unfused")


@dataclass
class DecodeSpec:
    mode: str = "onestep"
    block_size: int = 8
    steps: Optional[int] = None  # multistep only; default = block size
    rule: str = DEFAULT_UNMASK_RULE
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown decode mode {self.mode!r}; choose from {MODES}")


def decode_batch(model: EchoModel, tok: ReportTokenizer, px: torch.Tensor, spec: DecodeSpec, keep_trajectory: bool = False) -> DecodeResult:
    if spec.mode == "ar":
        return ar_generate(model, tok, px, spec.max_new_tokens)
    if spec.mode == "onestep":
        return fused_onestep_generate(model, tok, px, spec.block_size, spec.max_new_tokens)
    steps = 1 if spec.mode == "onestep-unfused" else (spec.steps or spec.block_size)
    return multistep_generate(model, tok, px, spec.block_size, steps, spec.max_new_tokens, spec.rule,
                              keep_trajectory=keep_trajectory)


def load_pixels(studies: list[Study], image_size: int, mode: str = "echo") -> torch.Tensor:
    """[n, 1, S, S] pixels of each study's first image (mode: the model's vision.preprocess)."""
    return torch.from_numpy(np.stack([preprocess_image(s.image_paths[0], image_size, mode) for s in studies]))


def decode_studies(
    model: EchoModel, tok: ReportTokenizer, studies: list[Study], spec: DecodeSpec, batch_size: int = 16,
    device: torch.device = torch.device("cpu"), progress: bool = True,
) -> tuple[dict[str, str], dict]:
    """Reports for every study, and per-report pass / token counts."""
    with torch.no_grad():
        model.to(device).eval()
        preds: dict[str, str] = {}
        passes = tokens = 0
        t0 = time.time()
        it = range(0, len(studies), batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"decode {spec.mode}", unit="batch", dynamic_ncols=True, mininterval=2.0)
        for i in it:
            chunk = studies[i : i + batch_size]
            res = decode_batch(model, tok, load_pixels(chunk, model.cfg.vision.image_size, model.cfg.vision.preprocess).to(device), spec)
            passes += res.forward_passes * len(chunk)
            for s, ids, raw in zip(chunk, res.tokens, res.raw.tolist()):
                preds[s.id] = tok.decode(ids)
                tokens += len(ids) + int(tok.eos_id in raw)  # the EOS is a generated token too
        n = max(1, len(studies))
        return preds, {
            "reports": len(studies),
            "forward_passes_per_report": passes / n,
            "tokens_per_report": tokens / n,
            "tokens_per_forward": tokens / max(1, passes),
            "seconds": time.time() - t0,
        }
