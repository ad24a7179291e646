"""Pieces every reference decoder shares: the prefix, a growing KV cache, the result record."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from runtime.schedule import BlockLayout, excludes_mask_token
from runtime.text import ReportTokenizer

from ..model.backbone import KV
from ..model.echo_model import EchoModel
from ..model.masks import TokenLayout, build_attention_mask


@dataclass
class DecodeResult:
    tokens: list[list[int]]  # per sequence, cut before EOS
    forward_passes: int  # model forwards for the whole batch, prefill included
    raw: torch.Tensor  # [b, n] every generated id, EOS and what followed included
    trajectories: Optional[list] = field(default=None, repr=False)  # per block, filled by the teacher
    # [b, n] like raw: the probability of each id when it was written (one-step decoder, keep_confidence)
    confidence: Optional[torch.Tensor] = field(default=None, repr=False)


def prefix_ids_tensor(tokenizer: ReportTokenizer, model: EchoModel, batch: int, device) -> torch.Tensor:
    ids = tokenizer.prefix_ids(model.n_image_tokens)
    return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(batch, -1)


class KVCache:
    """Per-layer keys/values that grow by concatenation (the reference, not the runtime's buffer)."""

    def __init__(self) -> None:
        self.layers: Optional[list[KV]] = None
        self.layout: Optional[TokenLayout] = None

    def __len__(self) -> int:
        return 0 if self.layers is None else int(self.layers[0][0].shape[2])

    def append(self, kv: list[KV], layout: TokenLayout, keep: Optional[slice] = None) -> None:
        """Store these tokens' KV (optionally only the `keep` slice of them)."""
        if keep is not None:
            kv = [(k[:, :, keep], v[:, :, keep]) for k, v in kv]
            layout = TokenLayout(*(getattr(layout, f)[keep] for f in ("kind", "block", "copy", "position")))
        if self.layers is None:
            self.layers, self.layout = list(kv), layout
        else:
            self.layers = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2)) for (k0, v0), (k, v) in zip(self.layers, kv)]
            self.layout = TokenLayout.cat([self.layout, layout])


def forward_with_cache(
    model: EchoModel, embeds: torch.Tensor, layout: TokenLayout, cache: KVCache, position_offset: int = 0
) -> tuple[torch.Tensor, list[KV]]:
    """Run tokens described by `layout` against everything in `cache`. Their rotary positions are
    their grid positions plus `position_offset` (a native-resolution image's rope delta)."""
    keys = layout if cache.layout is None else TokenLayout.cat([cache.layout, layout])
    mask = build_attention_mask(layout, keys).to(embeds.device)[None]
    pos = (layout.position + position_offset).to(embeds.device)[None].expand(embeds.shape[0], -1)
    return model(embeds, pos, mask, cache.layers)


def never_predict_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The mask token is never an answer (the exported graphs apply the same rule)."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return logits


def answer_logits(model: EchoModel, logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The logits a block's argmax reads under the model's decode layout: without the mask token
    (the models trained here), or all of them (the official layout of imported checkpoints)."""
    return never_predict_mask(logits, mask_id) if excludes_mask_token(model.cfg.decode_layout) else logits


def first_block(prefix: torch.Tensor, grid: BlockLayout, mask_id: int) -> torch.Tensor:
    """Response block 0 before decoding: the prompt's tail ids, then masks."""
    b = prefix.shape[0]
    masks = torch.full((b, grid.block_size - grid.tail), mask_id, dtype=torch.long, device=prefix.device)
    return torch.cat([prefix[:, grid.aligned_len:], masks], 1)
