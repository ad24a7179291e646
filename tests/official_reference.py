"""The official ECHO inference code's decoding rules, written around `transformers`'
Qwen2_5_VLForConditionalGeneration: the reference an engine of an imported checkpoint must match.

Written from the facts in ECHO-NOTES ("how the official inference code decodes"), not from this
project's decoders, so that a convention both got wrong cannot hide. The official model class is
remote code with two call options (`store_kv`, `store_kv_len`); here a pass runs with the cache and
the cache is cropped back afterwards, which stores nothing or only the first N positions' KV.

- canvas: the P prompt ids at 0..P-1, unpadded, then masks up to whole blocks of P + gen_length;
- one block-causal mask (lower triangle over blocks, expanded by B) for prompt and response;
- prefill over the P prompt tokens with the image, the cache then cut to floor(P/B)*B;
- the first decoded block [floor(P/B)*B, +B) alone, nothing stored; then [previous | current]
  passes storing the previous block's KV; greedy argmax over every id (the mask included) for
  every masked position;
- positions: get_rope_index for the prompt, canvas index + rope delta after it;
- stop after a block whose generated positions (index >= P) hold EOS; the report is the generated
  ids cut at the first EOS, then at the first mask id.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def block_causal_mask(total: int, block: int) -> torch.Tensor:
    """Additive [1, 1, total, total] mask: 0 where allowed, the float minimum elsewhere."""
    nb = total // block
    allowed = torch.tril(torch.ones(nb, nb)).repeat_interleave(block, 0).repeat_interleave(block, 1).bool()
    return torch.zeros(total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@dataclass
class Canvas:
    x: torch.Tensor  # [1, total] ids
    positions: torch.Tensor  # [3, 1, total]
    mask: torch.Tensor  # [1, 1, total, total]
    prompt_len: int
    block: int


def make_canvas(model, inputs: dict, mask_id: int, image_id: int, block: int, gen_length: int) -> Canvas:
    ids = inputs["input_ids"]
    P = ids.shape[1]
    total = -(-(P + gen_length) // block) * block
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :P] = ids
    mm = (ids == image_id).int()
    pos, delta = model.model.get_rope_index(ids, mm, image_grid_thw=inputs["image_grid_thw"])
    after = (torch.arange(P, total) + int(delta.reshape(-1)[0]))[None, None].expand(3, 1, -1)
    return Canvas(x, torch.cat([pos, after], -1), block_causal_mask(total, block), P, block)


def run_pass(model, cv: Canvas, inputs: dict, start: int, end: int, cache, store: int) -> torch.Tensor:
    """Canvas tokens [start, end) against the cache (which holds [0, start)); keep the KV of the first
    `store` of them. Returns their logits [1, end - start, V]."""
    n0 = cache.get_seq_length()
    image = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]} if start == 0 else {}
    out = model(input_ids=cv.x[:, start:end], attention_mask=cv.mask[..., start:end, :end],
                position_ids=cv.positions[..., start:end], cache=cache, use_cache=True, **image)
    drop = cache.get_seq_length() - (n0 + store)
    if drop:
        cache.crop(-drop)  # transformers 5: a negative count removes that many positions from the end
    return out.logits.float()


def _fill(cv: Canvas, start: int, logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Every masked position of block [start, start + B) takes its argmax (one step); returns the block."""
    cur = cv.x[:, start : start + cv.block].clone()
    masked = cur == mask_id
    cur[masked] = logits.argmax(-1)[masked]
    cv.x[:, start : start + cv.block] = cur
    return cur


def _stops(cv: Canvas, start: int, eos_id: int) -> bool:
    """EOS among the block's generated positions (index >= P)."""
    valid = max(0, cv.prompt_len - start)
    return bool((cv.x[:, start + valid : start + cv.block] == eos_id).any())


def report_ids(cv: Canvas, eos_id: int, mask_id: int) -> list[int]:
    ids = cv.x[0, cv.prompt_len :].tolist()
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    if mask_id in ids:
        ids = ids[: ids.index(mask_id)]
    return ids


@torch.no_grad()
def official_onestep(model, inputs: dict, *, mask_id: int, eos_id: int, image_id: int, block: int,
                     gen_length: int) -> list[int]:
    """generate_echo.py's fused one-step decode (steps 1, fused on), greedy."""
    from transformers import DynamicCache

    cv = make_canvas(model, inputs, mask_id, image_id, block, gen_length)
    P, B = cv.prompt_len, block
    c = P // B * B
    cache = DynamicCache(config=model.config)
    run_pass(model, cv, inputs, 0, P, cache, store=c)
    first = True
    for start in range(c, cv.x.shape[1], B):
        if first:
            logits = run_pass(model, cv, inputs, start, start + B, cache, store=0)
        else:
            logits = run_pass(model, cv, inputs, start - B, start + B, cache, store=B)[:, -B:]
        first = False
        _fill(cv, start, logits, mask_id)
        if _stops(cv, start, eos_id):
            break
    return report_ids(cv, eos_id, mask_id)


@torch.no_grad()
def official_onestep_uncached(model, inputs: dict, *, mask_id: int, eos_id: int, image_id: int, block: int,
                              gen_length: int) -> list[int]:
    """The same decode with no cache at all: every block recomputes the canvas [0, block end) with
    the image. Equal tokens to `official_onestep` check its cache cropping."""
    from transformers import DynamicCache

    cv = make_canvas(model, inputs, mask_id, image_id, block, gen_length)
    P, B = cv.prompt_len, block
    for start in range(P // B * B, cv.x.shape[1], B):
        logits = run_pass(model, cv, inputs, 0, start + B, DynamicCache(config=model.config), store=0)[:, start:]
        _fill(cv, start, logits, mask_id)
        if _stops(cv, start, eos_id):
            break
    return report_ids(cv, eos_id, mask_id)


def transfer_counts(block: int, steps: int) -> list[int]:
    base, extra = divmod(block, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def remask(cur: torch.Tensor, masked: torch.Tensor, x0: torch.Tensor, p: torch.Tensor, n: int, rule: str,
           threshold: float) -> torch.Tensor:
    """The official `_remask` for one row: which masked positions take their prediction this step."""
    take = torch.zeros_like(masked)
    conf = torch.where(masked, p, torch.tensor(-torch.inf))
    k = min(n, int(masked.sum()))
    if rule == "sequential":
        take[masked.nonzero(as_tuple=True)[0][:k]] = True
    elif rule == "low_confidence_static":
        if k > 0:
            take[torch.topk(conf, k).indices] = True
    elif rule == "low_confidence_dynamic":
        high = conf > threshold
        if int(high.sum()) >= n:
            take = high
        elif k > 0:
            take[torch.topk(conf, k).indices] = True
    else:
        raise ValueError(rule)
    return take


@torch.no_grad()
def official_multistep(model, inputs: dict, *, mask_id: int, eos_id: int, image_id: int, block: int, gen_length: int,
                       steps: int, rule: str, threshold: float = 0.85) -> list[int]:
    """generate_echo.py's multi-step decode (generate_vl_block.py's loop): per block up to `steps`
    denoising passes storing nothing, then, once no mask is left, a pass storing the block's KV."""
    from transformers import DynamicCache

    cv = make_canvas(model, inputs, mask_id, image_id, block, gen_length)
    P, B = cv.prompt_len, block
    cache = DynamicCache(config=model.config)
    run_pass(model, cv, inputs, 0, P, cache, store=P // B * B)
    counts = transfer_counts(B, steps)
    for start in range(P // B * B, cv.x.shape[1], B):
        cur = cv.x[:, start : start + B].clone()
        for step in range(steps + 1):
            cv.x[:, start : start + B] = cur  # each pass reads the block as it stands
            masked = cur == mask_id
            if not bool(masked.any()):
                run_pass(model, cv, inputs, start, start + B, cache, store=B)
                break
            logits = run_pass(model, cv, inputs, start, start + B, cache, store=0)
            p, x0 = torch.softmax(logits, -1).max(-1)
            take = remask(cur[0], masked[0], x0[0], p[0], counts[step], rule, threshold)[None]
            cur[take] = x0[take]
        cv.x[:, start : start + B] = cur
        if _stops(cv, start, eos_id):
            break
    return report_ids(cv, eos_id, mask_id)
