"""Decoding one image at its own grid (native resolution, Qwen2.5-VL imported checkpoints).

The prompt is the template's ids with as many image placeholders as the image has tokens; the
prefill embeds the image in place of them at Qwen2.5-VL's (time, row, column) rotary positions
(runtime/native_image.py), and every later pass sits at its canvas index plus the image's rope
delta. After the prefill the passes are block_diffusion.fused_passes, the same as at a fixed grid.
"""
from __future__ import annotations

import numpy as np
import torch

from runtime.native_image import NativeImage, mrope_position_ids
from runtime.schedule import BlockLayout
from runtime.text import ReportTokenizer

from ..model.echo_model import EchoModel
from ..model.masks import block_layout, build_attention_mask
from .block_diffusion import MultistepRun, fused_passes, multistep_passes
from .common import DecodeResult, KVCache


def native_tensors(image: NativeImage) -> tuple[torch.Tensor, ...]:
    """The image's arrays in the order EchoModel.embed_prefix_native takes them."""
    arrays = (image.patches, image.patch_rc, image.window_gather, image.window_valid, image.window_inverse)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def native_prompt(model: EchoModel, tokenizer: ReportTokenizer, image: NativeImage) -> tuple[list[int], np.ndarray, int]:
    """(prompt ids, their [3, P] rotary positions, the rope delta of the ids after them)."""
    ids = tokenizer.prefix_ids(image.n_tokens)
    pos, delta = mrope_position_ids(len(ids), model.cfg.image_start, *image.llm_grid)
    return ids, pos, delta


def _native_prefill(model: EchoModel, tokenizer: ReportTokenizer, image: NativeImage, whole_blocks: bool):
    """Prefill one image at its own grid: (prompt ids [1, P], grid, cache, last logits, rope delta). The
    cache holds the prompt's whole blocks (the teacher), or all but the last (the fused decoder)."""
    ids, pos, delta = native_prompt(model, tokenizer, image)
    grid = BlockLayout(len(ids), model.cfg.block_size)
    n = grid.aligned_len if whole_blocks else grid.fused_prefill_len
    prefix = torch.tensor([ids])
    embeds = model.embed_prefix_native(prefix[:, :n], *native_tensors(image))
    layout = block_layout(n, grid.block_size, kind=model.cfg.context_kind)
    logits, kv = model(embeds, torch.from_numpy(pos[:, None, :n].copy()), build_attention_mask(layout)[None])
    cache = KVCache()
    cache.append(kv, layout)
    return prefix, grid, cache, logits[:, -1], delta


def native_onestep_generate(model: EchoModel, tokenizer: ReportTokenizer, image: NativeImage,
                            max_new_tokens: int = 128) -> DecodeResult:
    """Fused one-step decoding of one image at its own grid (batch 1)."""
    with torch.no_grad():
        prefix, grid, cache, _, delta = _native_prefill(model, tokenizer, image, whole_blocks=False)
        return fused_passes(model, tokenizer, prefix, grid, cache, max_new_tokens, position_offset=delta)


def native_multistep_generate(model: EchoModel, tokenizer: ReportTokenizer, image: NativeImage, run: MultistepRun,
                              max_new_tokens: int = 128) -> DecodeResult:
    """The multi-step teacher on one image at its own grid (batch 1)."""
    with torch.no_grad():
        prefix, grid, cache, carry, delta = _native_prefill(model, tokenizer, image, whole_blocks=True)
        return multistep_passes(model, tokenizer, prefix, grid, cache, carry, max_new_tokens, run,
                                position_offset=delta)
