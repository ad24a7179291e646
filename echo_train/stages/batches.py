"""Training batch builders: what each stage feeds the model, and which positions it scores.

AR (stage 1):  [prefix][response]            causal, next-token loss on the response
RAD (stage 2): [prefix][clean response][noisy response] x K
               the prefix once, clean; loss on masked positions of the noisy copies, plus (with a
               causal context) the AR next-token loss on the clean copy, which is stage 1's sequence
Symmetric:     [prefix][noisy response][prefix][clean response]   (BD3-style ablation)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..model.echo_model import EchoModel
from ..model.masks import TokenLayout, build_attention_mask, causal_layout, prediction_sources, rad_layout, symmetric_layout

# A target position that is not scored. The value is cross_entropy's default ignore_index, though
# the losses here select the scored positions themselves (logits are computed only there).
IGNORE_INDEX = -100


@dataclass
class ModelInputs:
    """One forward's inputs plus the targets it is scored on (IGNORE_INDEX = not scored)."""

    embeds: torch.Tensor  # [b, T, d]
    position_ids: torch.Tensor  # [b, T]
    mask: torch.Tensor  # [1, T, T] bool
    targets: torch.Tensor  # [b, T] token id to predict at each position, or IGNORE_INDEX
    # [T] index of the hidden state that predicts each position (shifted prediction); None: itself
    sources: Optional[torch.Tensor] = None
    # [b, T] a second, separately averaged loss read at each position itself (the AR loss on a
    # causal clean copy), weighted by aux_weight; None: no second loss
    aux_targets: Optional[torch.Tensor] = None
    aux_weight: float = 0.0

    def scored(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states that predict the scored positions [n, d], their targets [n])."""
        if self.sources is not None:
            h = h[:, self.sources.to(h.device)]
        sel = self.targets != IGNORE_INDEX
        return h[sel], self.targets[sel]


def diffusion_inputs(model: EchoModel, embeds: torch.Tensor, layout: TokenLayout, targets: torch.Tensor) -> ModelInputs:
    """Inputs of a block-diffusion loss (RAD, symmetric, DCD): mask from the layout, and the
    prediction sources when the model reads block tokens from the position before them."""
    dev = embeds.device
    sources = prediction_sources(layout) if model.cfg.shifted_prediction else None
    return ModelInputs(embeds, _positions(layout, embeds.shape[0], dev), build_attention_mask(layout).to(dev)[None], targets, sources)


def _positions(layout: TokenLayout, b: int, device) -> torch.Tensor:
    return layout.position.to(device)[None].expand(b, -1)


def build_ar_inputs(model: EchoModel, batch: dict) -> ModelInputs:
    """Causal sequence; position i predicts token i+1 of the response (through its first EOS)."""
    px, prefix, resp, keep = batch["pixel_values"], batch["prefix_ids"], batch["response_ids"], batch["response_mask"]
    b, p = prefix.shape
    embeds = torch.cat([model.embed_prefix(px, prefix), model.embed_tokens(resp)], 1)
    layout = causal_layout(embeds.shape[1])
    targets = torch.full(embeds.shape[:2], IGNORE_INDEX, dtype=torch.long, device=resp.device)
    targets[:, p - 1 : -1] = torch.where(keep, resp, torch.full_like(resp, IGNORE_INDEX))
    return ModelInputs(embeds, _positions(layout, b, resp.device), build_attention_mask(layout).to(resp.device)[None], targets)


def sample_block_noise(resp: torch.Tensor, block_size: int, mask_id: int, gen: torch.Generator, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each block at its own ratio t ~ U(eps, 1]. Returns (noisy ids, masked bool)."""
    b, r = resp.shape
    t = torch.rand(b, r // block_size, generator=gen) * (1 - eps) + eps
    t = t.repeat_interleave(block_size, 1).to(resp.device)
    masked = torch.rand(b, r, generator=gen).to(resp.device) < t
    return torch.where(masked, torch.full_like(resp, mask_id), resp), masked


def build_rad_inputs(
    model: EchoModel, batch: dict, block_size: int, mask_id: int, gen: torch.Generator, n_noisy: int = 1,
    symmetric: bool = False, ar_weight: float = 0.0,
) -> ModelInputs:
    """RAD (or, with symmetric=True, the BD3-style duplicated sequence) for a block-diffusion loss.

    With a causal context (model.cfg.causal_context) and ar_weight > 0, the clean copy is also
    scored as stage 1 scores it: position i predicts response token i+1. That keeps the AR model,
    and the image grounding it learned, inside the teacher at no extra forward cost.
    """
    px, prefix, resp = batch["pixel_values"], batch["prefix_ids"], batch["response_ids"]
    b, p = prefix.shape
    r = resp.shape[1]
    ignore = torch.full_like(resp, IGNORE_INDEX)
    # Score the report through its first EOS only. The EOS padding after it stays in the input but
    # is never a target: trained on, the padding made EOS the most confident guess of every late
    # position, and the low-confidence-dynamic rule then ended reports early.
    scored = batch["response_mask"]
    if not symmetric:
        noisy, tgt = [], []
        for _ in range(n_noisy):
            x, masked = sample_block_noise(resp, block_size, mask_id, gen)
            noisy.append(x)
            tgt.append(torch.where(masked & scored, resp, ignore))
        inputs = rad_inputs(model, block_size, px, prefix, resp, noisy, tgt)
        add_clean_copy_ar_loss(model, inputs, p, resp, scored, ar_weight)
        return inputs
    prefix_emb = model.embed_prefix(px, prefix)
    noisy_ids, masked = sample_block_noise(resp, block_size, mask_id, gen)
    # the vision tower runs once; the LM sees the prefix twice, as in BD3-style duplication
    embeds = torch.cat([prefix_emb, model.embed_tokens(noisy_ids), prefix_emb, model.embed_tokens(resp)], 1)
    pre_ignore = torch.full((b, p), IGNORE_INDEX, dtype=torch.long, device=resp.device)
    targets = torch.cat([pre_ignore, torch.where(masked & scored, resp, ignore), pre_ignore, ignore], 1)
    return diffusion_inputs(model, embeds, symmetric_layout(p, r, block_size, model.cfg.context_kind), targets)

def rad_inputs(model: EchoModel, block_size: int, pixel_values: torch.Tensor, prefix_ids: torch.Tensor,
               clean_ids: torch.Tensor, noisy: list[torch.Tensor], targets: list[torch.Tensor]) -> ModelInputs:
    """[prefix][clean ids][noisy copy 1]...[noisy copy K] in the RAD layout, the one builder of it for
    stage 2 and stage 3; only the noisy copies are scored, copy k on targets[k] [b, R]."""
    b, p = prefix_ids.shape
    r = clean_ids.shape[1]
    parts = [model.embed_prefix(pixel_values, prefix_ids), model.embed_tokens(clean_ids)] + [model.embed_tokens(x) for x in noisy]
    layout = rad_layout(p, r, block_size, len(noisy), model.cfg.context_kind)
    ignore = torch.full((b, p + r), IGNORE_INDEX, dtype=torch.long, device=clean_ids.device)
    return diffusion_inputs(model, torch.cat(parts, 1), layout, torch.cat([ignore, *targets], 1))


def add_clean_copy_ar_loss(model: EchoModel, inputs: ModelInputs, prefix_len: int, clean_ids: torch.Tensor,
                           keep: torch.Tensor, weight: float) -> None:
    """Score the clean copy [prefix_len, prefix_len + R) of a RAD-layout input as stage 1 does
    (position i predicts clean token i+1, where `keep`), when the model's context is causal."""
    if weight <= 0 or not model.cfg.causal_context:
        return
    aux = torch.full_like(inputs.targets, IGNORE_INDEX)
    r = clean_ids.shape[1]
    aux[:, prefix_len - 1 : prefix_len + r - 1] = torch.where(keep, clean_ids, torch.full_like(clean_ids, IGNORE_INDEX))
    inputs.aux_targets, inputs.aux_weight = aux, weight


def scored_cross_entropy(model: EchoModel, inputs: ModelInputs) -> torch.Tensor:
    """Mean cross-entropy over the scored positions only (logits computed just there),
    plus aux_weight x the mean over the auxiliary targets."""
    h_all, _ = model.lm(inputs.embeds, inputs.position_ids, inputs.mask)
    h, targets = inputs.scored(h_all)
    loss = torch.nn.functional.cross_entropy(model.lm.lm_head(h).float(), targets)
    if inputs.aux_targets is not None:
        sel = inputs.aux_targets != IGNORE_INDEX
        aux = torch.nn.functional.cross_entropy(model.lm.lm_head(h_all[sel]).float(), inputs.aux_targets[sel])
        loss = loss + inputs.aux_weight * aux
    return loss
