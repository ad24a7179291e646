"""No-cache references: every pass recomputes the whole sequence from scratch.

The cached decoders must reproduce these tokens exactly; that is what makes the KV cache,
the prefill cropping and the fused pass trustworthy.
"""
from __future__ import annotations

import torch

from runtime.schedule import DEFAULT_UNMASK_RULE, UNMASK_THRESHOLD, BlockLayout, cut_rows_at_eos, holds_eos, transfer_schedule
from runtime.text import ReportTokenizer

from ..model.echo_model import EchoModel
from ..model.masks import NOISY, TokenLayout, block_layout, build_attention_mask, causal_layout
from .block_diffusion import denoise_step
from .common import DecodeResult, never_predict_mask, prefix_ids_tensor


def _run(model: EchoModel, embeds: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    mask = build_attention_mask(layout).to(embeds.device)[None]
    pos = layout.position.to(embeds.device)[None].expand(embeds.shape[0], -1)
    return model(embeds, pos, mask)[0]


def recompute_ar_generate(model: EchoModel, tokenizer: ReportTokenizer, pixel_values: torch.Tensor, max_new_tokens: int = 128) -> DecodeResult:
    with torch.no_grad():
        b, dev = pixel_values.shape[0], pixel_values.device
        prefix = prefix_ids_tensor(tokenizer, model, b, dev)
        pre = model.embed_prefix(pixel_values, prefix)
        gen = torch.zeros(b, 0, dtype=torch.long, device=dev)
        for _ in range(max_new_tokens):
            embeds = torch.cat([pre, model.embed_tokens(gen)], 1)
            logits = _run(model, embeds, causal_layout(embeds.shape[1]))
            gen = torch.cat([gen, never_predict_mask(logits[:, -1], tokenizer.mask_id).argmax(-1, keepdim=True)], 1)
            if bool(holds_eos(gen, tokenizer.eos_id).all()):
                break
        return DecodeResult(cut_rows_at_eos(gen.cpu(), tokenizer.eos_id), gen.shape[1], gen.cpu())


def recompute_multistep_generate(
    model: EchoModel,
    tokenizer: ReportTokenizer,
    pixel_values: torch.Tensor,
    block_size: int,
    steps: int,
    max_new_tokens: int = 128,
    rule: str = DEFAULT_UNMASK_RULE,
    threshold: float = UNMASK_THRESHOLD,
) -> DecodeResult:
    with torch.no_grad():
        b, dev, B = pixel_values.shape[0], pixel_values.device, block_size
        prefix = prefix_ids_tensor(tokenizer, model, b, dev)
        grid = BlockLayout(prefix.shape[1], B)
        schedule = transfer_schedule(B, steps)
        pre = model.embed_prefix(pixel_values, prefix)
        gen = torch.zeros(b, 0, dtype=torch.long, device=dev)
        passes = 0
        for k in range(grid.num_blocks(max_new_tokens)):
            n_clean = grid.prefix_len + gen.shape[1]
            ctx = block_layout(n_clean, B, kind=model.cfg.context_kind)
            layout = TokenLayout.cat([ctx, block_layout(B, B, start=n_clean, kind=NOISY, copy=1)])
            x = torch.full((b, B), tokenizer.mask_id, dtype=torch.long, device=dev)
            for s in range(steps):
                if not bool((x == tokenizer.mask_id).any()):
                    break
                embeds = torch.cat([pre, model.embed_tokens(torch.cat([gen, x], 1))], 1)
                # shifted prediction: token j of the block from position j-1 (token 0 from the last clean one)
                logits = _run(model, embeds, layout)
                logits = logits[:, -B - 1 : -1] if model.cfg.shifted_prediction else logits[:, -B:]
                passes += 1
                x = denoise_step(logits, x, tokenizer.mask_id, schedule[s], rule, threshold)
            gen = torch.cat([gen, x], 1)
            if bool(holds_eos(gen, tokenizer.eos_id).all()):
                break
        return DecodeResult(cut_rows_at_eos(gen.cpu(), tokenizer.eos_id), passes, gen.cpu())
