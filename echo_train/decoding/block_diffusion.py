"""Block-diffusion decoding with a KV cache: multi-step teacher and fused one-step.

Semantics (unmask rule, block positions) come from runtime/schedule.py, shared with the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from runtime.schedule import (
    DEFAULT_UNMASK_RULE,
    UNMASK_THRESHOLD,
    BlockLayout,
    cut_rows_at_eos,
    excludes_mask_token,
    fused_block_slice,
    holds_eos,
    select_unmask,
    transfer_schedule,
)
from runtime.text import ReportTokenizer

from ..model.echo_model import EchoModel
from ..model.masks import NOISY, block_layout, fused_layout
from .common import (DecodeResult, KVCache, answer_logits, first_block, forward_with_cache, never_predict_mask,
                     prefix_ids_tensor)


def denoise_step(
    logits: torch.Tensor, x: torch.Tensor, mask_id: int, min_count: int, rule: str, threshold: float,
    exclude_mask: bool = True,
) -> torch.Tensor:
    """One unmasking step on a block: accept positions by the shared rule, return the new block.
    exclude_mask False (the official layout): the mask token may be the argmax; accepting it
    leaves that position masked."""
    logits = logits.float()
    probs = torch.softmax(never_predict_mask(logits, mask_id) if exclude_mask else logits, -1)
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
    context: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
) -> DecodeResult:
    """Per block: `steps` denoising passes, then a commit pass that stores the block's KV.

    With steps=1 this is the naive (unfused) one-step decoder.
    keep_trajectory records, per block, every intermediate state (for DCD).
    context, start: see multistep_passes (the teacher's blocks in a student's context, on-policy DCD).
    """
    with torch.no_grad():
        b, dev, B = pixel_values.shape[0], pixel_values.device, block_size
        prefix = prefix_ids_tensor(tokenizer, model, b, dev)
        grid = BlockLayout(prefix.shape[1], B)
        cache = KVCache()
        # the prompt's whole blocks; its tail (if any) is decoded inside response block 0
        pre_layout = block_layout(grid.aligned_len, B, kind=model.cfg.context_kind)
        embeds = model.embed_prefix(pixel_values, prefix)[:, : grid.aligned_len]
        logits, kv = forward_with_cache(model, embeds, pre_layout, cache)
        cache.append(kv, pre_layout)
        opts = MultistepRun(steps, rule, threshold, keep_trajectory)
        return multistep_passes(model, tokenizer, prefix, grid, cache, logits[:, -1], max_new_tokens, opts,
                                context=context, start=start)


@dataclass(frozen=True)
class MultistepRun:
    """How the teacher decodes: steps per block, the unmask rule and threshold, and whether to keep
    every intermediate state (DCD's trajectories)."""
    steps: int
    rule: str = DEFAULT_UNMASK_RULE
    threshold: float = UNMASK_THRESHOLD
    keep_trajectory: bool = False


def multistep_passes(model: EchoModel, tokenizer: ReportTokenizer, prefix: torch.Tensor, grid: BlockLayout,
                     cache: KVCache, carry: torch.Tensor, max_new_tokens: int, run: MultistepRun,
                     position_offset: int = 0, context: Optional[torch.Tensor] = None,
                     start: Optional[torch.Tensor] = None) -> DecodeResult:
    """The blocks after a prefill that stored the prompt's whole blocks; `carry`: the logits of its last
    position (token 0 of block 0 under shifted prediction). On-policy DCD's options, response tokens
    [b, R]: `context` is committed after each block in place of the block written (block k: the
    completion after context's blocks < k; decoding ends with context's reports); `start` holds each
    block's starting ids (mask_id: to decode), in place of all-mask."""
    b, dev, B = prefix.shape[0], prefix.device, grid.block_size
    schedule = transfer_schedule(B, run.steps)
    passes, blocks, trajectory = 1, [], []
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    tail = prefix[:, grid.aligned_len :]  # the prompt's ids at the head of block 0
    context, start = _on_grid(context, tail), _on_grid(start, torch.full_like(tail, tokenizer.mask_id))
    n_blocks = grid.num_blocks(max_new_tokens) if context is None else \
        min(grid.num_blocks(max_new_tokens), context.shape[1] // B)
    for k in range(n_blocks):
        pos0 = int(grid.block_positions(k)[0])
        noisy = block_layout(B, B, start=pos0, kind=NOISY, copy=1)
        x = _start_state(k, prefix, grid, tokenizer.mask_id, start)
        states = _denoise(model, x, noisy, cache, carry, schedule, run, tokenizer.mask_id, position_offset)
        x = states[-1]
        passes += len(states) - 1  # one pass a state after the first
        blocks.append(x)
        if run.keep_trajectory:
            trajectory.append(torch.stack(states, 1).cpu())  # [b, n_states, B]
        if context is not None:
            x = context[:, k * B : (k + 1) * B]
        done |= holds_eos(x[:, grid.tail if k == 0 else 0 :], tokenizer.eos_id)  # generated positions only
        if bool(done.all()) or k == n_blocks - 1:
            break
        clean = block_layout(B, B, start=pos0, kind=model.cfg.context_kind)
        logits, kv = forward_with_cache(model, model.embed_tokens(x), clean, cache, position_offset)
        carry = logits[:, -1]
        cache.append(kv, clean)
        passes += 1
    raw = torch.cat(blocks, 1).cpu()[:, grid.tail :]
    return DecodeResult(cut_rows_at_eos(raw, tokenizer.eos_id, tokenizer.mask_id), passes, raw,
                        trajectory if run.keep_trajectory else None)


def _on_grid(tokens: Optional[torch.Tensor], head: torch.Tensor) -> Optional[torch.Tensor]:
    """Response tokens [b, R] in grid blocks: `head` (block 0's prompt positions) first."""
    return None if tokens is None else torch.cat([head, tokens.to(head.device)], 1)


def _start_state(k: int, prefix: torch.Tensor, grid: BlockLayout, mask_id: int, start: Optional[torch.Tensor]) -> torch.Tensor:
    """Block k before denoising: all-mask (block 0 opens with the prompt's tail ids), with the
    non-mask ids of `start` (grid blocks) in place."""
    B = grid.block_size
    x = first_block(prefix, grid, mask_id) if k == 0 else \
        torch.full((prefix.shape[0], B), mask_id, dtype=torch.long, device=prefix.device)
    if start is not None and k < start.shape[1] // B:
        x = torch.where(x == mask_id, start[:, k * B : (k + 1) * B], x)
    return x


def _denoise(model: EchoModel, x: torch.Tensor, noisy, cache: KVCache, carry: torch.Tensor, schedule: list[int],
             run: MultistepRun, mask_id: int, position_offset: int) -> list[torch.Tensor]:
    """The block's states from `x` on, one a denoising pass: each pass unmasks what run.rule picks
    (at least the schedule's count), until nothing is masked or the steps end."""
    exclude = excludes_mask_token(model.cfg.decode_layout)
    states = [x.clone()]
    for s in range(run.steps):
        if not bool((x == mask_id).any()):
            break
        logits, _ = forward_with_cache(model, model.embed_tokens(x), noisy, cache, position_offset)
        x = denoise_step(block_logits(logits, carry, model.cfg.shifted_prediction), x, mask_id, schedule[s], run.rule,
                         run.threshold, exclude)
        states.append(x.clone())
    return states


def fused_onestep_generate(
    model: EchoModel,
    tokenizer: ReportTokenizer,
    pixel_values: torch.Tensor,
    block_size: int,
    max_new_tokens: int = 128,
    keep_confidence: bool = False,
) -> DecodeResult:
    """One forward per block: [previous block clean + current block all-mask] = 2B tokens.
    keep_confidence: also return each id's probability (on-policy DCD's anchors; a softmax per pass).

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
        return fused_passes(model, tokenizer, prefix, grid, cache, max_new_tokens, keep_confidence=keep_confidence)


def fused_passes(model: EchoModel, tokenizer: ReportTokenizer, prefix: torch.Tensor, grid: BlockLayout,
                 cache: KVCache, max_new_tokens: int, position_offset: int = 0,
                 keep_confidence: bool = False) -> DecodeResult:
    """The fused passes after a prefill that stored the KV of the first grid.fused_prefill_len prompt
    tokens: pass k feeds [block k-1 clean, block k], stores block k-1's KV and reads block k (block 0
    opens with the prompt's tail ids, which are kept)."""
    b, dev, B = prefix.shape[0], prefix.device, grid.block_size
    passes = 1
    prev = prefix[:, grid.fused_prefill_len : grid.aligned_len]
    cur = first_block(prefix, grid, tokenizer.mask_id)
    masks = torch.full((b, B), tokenizer.mask_id, dtype=torch.long, device=dev)
    blocks, confs = [], []
    read = fused_block_slice(B, model.cfg.shifted_prediction)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for k in range(grid.num_blocks(max_new_tokens)):
        layout = fused_layout(grid, k, model.cfg.context_kind)
        logits, kv = forward_with_cache(model, model.embed_tokens(torch.cat([prev, cur], 1)), layout, cache,
                                        position_offset)
        passes += 1
        cache.append(kv, layout, keep=slice(0, B))
        answer = answer_logits(model, logits[:, read], tokenizer.mask_id)
        pred = answer.argmax(-1)
        prev = torch.where(cur == tokenizer.mask_id, pred, cur)  # the prompt's tail ids are kept
        blocks.append(prev)
        if keep_confidence:  # the prompt's tail ids count as certain
            conf = torch.softmax(answer.float(), -1).gather(-1, pred[..., None])[..., 0]
            confs.append(torch.where(cur == tokenizer.mask_id, conf, torch.ones_like(conf)))
        done |= holds_eos(prev[:, grid.tail if k == 0 else 0 :], tokenizer.eos_id)  # generated positions only
        if bool(done.all()):
            break
        cur = masks
    raw = torch.cat(blocks, 1).cpu()[:, grid.tail :]
    conf = torch.cat(confs, 1).cpu()[:, grid.tail :] if keep_confidence else None
    return DecodeResult(cut_rows_at_eos(raw, tokenizer.eos_id, tokenizer.mask_id), passes, raw, confidence=conf)
