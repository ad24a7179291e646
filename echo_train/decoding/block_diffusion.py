"""Block-diffusion decoding with a KV cache: multi-step teacher and fused one-step.

Semantics (unmask rule, block positions) come from runtime/schedule.py, shared with the runtime.
"""
from __future__ import annotations

import torch

from runtime.schedule import (
    DEFAULT_UNMASK_RULE,
    UNMASK_THRESHOLD,
    BlockLayout,
    cut_rows_at_eos,
    fused_block_slice,
    holds_eos,
    select_unmask,
    transfer_schedule,
)
from runtime.text import ReportTokenizer

from ..model.echo_model import EchoModel
from ..model.masks import NOISY, block_layout, fused_layout
from .common import DecodeResult, KVCache, forward_with_cache, never_predict_mask, prefix_ids_tensor


def denoise_step(
    logits: torch.Tensor, x: torch.Tensor, mask_id: int, min_count: int, rule: str, threshold: float
) -> torch.Tensor:
    """One unmasking step on a block: accept positions by the shared rule, return the new block."""
    probs = torch.softmax(never_predict_mask(logits.float(), mask_id), -1)
    conf, pred = probs.max(-1)
    still = x == mask_id
    accept = select_unmask(conf.cpu().numpy(), still.cpu().numpy(), min_count, rule, threshold)
    accept_t = torch.from_numpy(accept).to(x.device)
    return torch.where(accept_t, pred, x)


def block_logits(logits: torch.Tensor, carry: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Logits of a block's B tokens from a pass over that block.

    Shifted prediction reads token j from position j-1 and token 0 from `carry`, the last
    position of the pass that stored the token before the block (prefill or commit pass).
    """
    return torch.cat([carry[:, None], logits[:, :-1]], 1) if shifted else logits


def multistep_generate(
    model: EchoModel,
    tokenizer: ReportTokenizer,
    pixel_values: torch.Tensor,
    block_size: int,
    steps: int,
    max_new_tokens: int = 128,
    rule: str = DEFAULT_UNMASK_RULE,
    threshold: float = UNMASK_THRESHOLD,
    keep_trajectory: bool = False,
) -> DecodeResult:
    """Per block: `steps` denoising passes, then a commit pass that stores the block's KV.

    With steps=1 this is the naive (unfused) one-step decoder.
    keep_trajectory records, per block, every intermediate state (for DCD).
    """
    with torch.no_grad():
        b, dev, B = pixel_values.shape[0], pixel_values.device, block_size
        prefix = prefix_ids_tensor(tokenizer, model, b, dev)
        grid = BlockLayout(prefix.shape[1], B)
        schedule = transfer_schedule(B, steps)
        cache = KVCache()
        ctx = model.cfg.context_kind
        pre_layout = block_layout(grid.prefix_len, B, kind=ctx)
        logits, kv = forward_with_cache(model, model.embed_prefix(pixel_values, prefix), pre_layout, cache)
        cache.append(kv, pre_layout)
        carry, shifted = logits[:, -1], model.cfg.shifted_prediction
        passes = 1
        blocks, trajectory = [], []
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        for k in range(grid.num_blocks(max_new_tokens)):
            start = int(grid.block_positions(k)[0])
            noisy = block_layout(B, B, start=start, kind=NOISY, copy=1)
            x = torch.full((b, B), tokenizer.mask_id, dtype=torch.long, device=dev)
            states = [x.clone()]
            for s in range(steps):
                if not bool((x == tokenizer.mask_id).any()):
                    break
                logits, _ = forward_with_cache(model, model.embed_tokens(x), noisy, cache)
                passes += 1
                x = denoise_step(block_logits(logits, carry, shifted), x, tokenizer.mask_id, schedule[s], rule, threshold)
                states.append(x.clone())
            blocks.append(x)
            if keep_trajectory:
                trajectory.append(torch.stack(states, 1).cpu())  # [b, n_states, B]
            done |= holds_eos(x, tokenizer.eos_id)
            if bool(done.all()) or k == grid.num_blocks(max_new_tokens) - 1:
                break
            clean = block_layout(B, B, start=start, kind=ctx)
            logits, kv = forward_with_cache(model, model.embed_tokens(x), clean, cache)
            carry = logits[:, -1]
            cache.append(kv, clean)
            passes += 1
        raw = torch.cat(blocks, 1).cpu()
        return DecodeResult(cut_rows_at_eos(raw, tokenizer.eos_id), passes, raw, trajectory if keep_trajectory else None)


def fused_onestep_generate(
    model: EchoModel,
    tokenizer: ReportTokenizer,
    pixel_values: torch.Tensor,
    block_size: int,
    max_new_tokens: int = 128,
) -> DecodeResult:
    """One forward per block: [previous block clean + current block all-mask] = 2B tokens.

    The pass stores the previous block's KV and reads the current block from the last B
    positions. The first pass's previous block is the last prefix block, so prefill stores
    P - B tokens. Forward passes per report = blocks + 1.
    """
    with torch.no_grad():
        b, dev, B = pixel_values.shape[0], pixel_values.device, block_size
        prefix = prefix_ids_tensor(tokenizer, model, b, dev)
        grid = BlockLayout(prefix.shape[1], B)
        cache = KVCache()
        n_pre = grid.fused_prefill_len
        pre_layout = block_layout(n_pre, B, kind=model.cfg.context_kind)
        embeds = model.embed_prefix(pixel_values, prefix)
        _, kv = forward_with_cache(model, embeds[:, :n_pre], pre_layout, cache)
        cache.append(kv, pre_layout)
        passes = 1
        prev = prefix[:, n_pre:]
        masks = torch.full((b, B), tokenizer.mask_id, dtype=torch.long, device=dev)
        blocks = []
        read = fused_block_slice(B, model.cfg.shifted_prediction)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        for k in range(grid.num_blocks(max_new_tokens)):
            layout = fused_layout(grid, k, model.cfg.context_kind)
            logits, kv = forward_with_cache(model, model.embed_tokens(torch.cat([prev, masks], 1)), layout, cache)
            passes += 1
            cache.append(kv, layout, keep=slice(0, B))
            prev = never_predict_mask(logits[:, read], tokenizer.mask_id).argmax(-1)
            blocks.append(prev)
            done |= holds_eos(prev, tokenizer.eos_id)
            if bool(done.all()):
                break
        raw = torch.cat(blocks, 1).cpu()
        return DecodeResult(cut_rows_at_eos(raw, tokenizer.eos_id), passes, raw)
