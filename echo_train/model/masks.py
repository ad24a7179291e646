"""One builder for every attention pattern: causal, block-causal, RAD and symmetric BD3.

Each token carries a descriptor (kind, block, copy, position). A query may attend a key when
  - query CAUSAL: key CAUSAL in the same copy at a position <= the query's;
  - query CLEAN:  key CLEAN in a block <= the query's block (bidirectional inside a block);
  - query NOISY:  key CLEAN or CAUSAL in an earlier block, or key NOISY in the same copy and block.
Every training and decoding mask in the project is built from these three rules.

The clean context of a block-diffusion model (prefix and committed blocks) is either CLEAN
(block-causal, as in SDAR/BD3) or CAUSAL (exactly the AR model's attention; `context_kind`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.schedule import BlockLayout

CAUSAL, CLEAN, NOISY = 0, 1, 2


@dataclass
class TokenLayout:
    """Per-token descriptors of one sequence (all 1-D long tensors of equal length)."""

    kind: torch.Tensor
    block: torch.Tensor
    copy: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return int(self.kind.numel())

    @staticmethod
    def cat(parts: list["TokenLayout"]) -> "TokenLayout":
        return TokenLayout(*(torch.cat([getattr(p, f) for p in parts]) for f in ("kind", "block", "copy", "position")))


def build_attention_mask(q: TokenLayout, k: TokenLayout | None = None) -> torch.Tensor:
    """Bool [len(q), len(k)]: True where the query may attend the key."""
    k = q if k is None else k
    qk, kk = q.kind[:, None], k.kind[None, :]
    qb, kb = q.block[:, None], k.block[None, :]
    qc, kc = q.copy[:, None], k.copy[None, :]
    causal = (qk == CAUSAL) & (kk == CAUSAL) & (qc == kc) & (k.position[None, :] <= q.position[:, None])
    clean = (qk == CLEAN) & (kk == CLEAN) & (kb <= qb)
    context = (kk == CLEAN) | (kk == CAUSAL)
    noisy = (qk == NOISY) & ((context & (kb < qb)) | ((kk == NOISY) & (kc == qc) & (kb == qb)))
    return causal | clean | noisy


def context_kind(causal_context: bool) -> int:
    """Kind of the clean context tokens: CAUSAL (the AR model's own attention) or CLEAN (block-causal)."""
    return CAUSAL if causal_context else CLEAN


def _full(n: int, value: int) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.long)


def causal_layout(length: int, start: int = 0, copy: int = 0) -> TokenLayout:
    pos = torch.arange(start, start + length)
    return TokenLayout(_full(length, CAUSAL), _full(length, 0), _full(length, copy), pos)


def block_layout(length: int, block_size: int, start: int = 0, kind: int = CLEAN, copy: int = 0) -> TokenLayout:
    """Tokens at positions [start, start+length) on the global block grid (start % B == 0)."""
    pos = torch.arange(start, start + length)
    return TokenLayout(_full(length, kind), pos // block_size, _full(length, copy), pos)


def rad_layout(prefix_len: int, response_len: int, block_size: int, n_noisy: int = 1, context: int = CLEAN) -> TokenLayout:
    """RAD: prefix + clean response once (of kind `context`), then `n_noisy` noisy copies of the response only.

    Cost P + (1+K)R tokens, against 2(P+R) for the symmetric layout.
    """
    parts = [block_layout(prefix_len + response_len, block_size, kind=context)]
    for c in range(n_noisy):
        parts.append(block_layout(response_len, block_size, start=prefix_len, kind=NOISY, copy=1 + c))
    return TokenLayout.cat(parts)


def prediction_sources(layout: TokenLayout) -> torch.Tensor:
    """Index of the hidden state whose logits predict each token, under shifted prediction.

    A noisy token at block position j > 0 is read from the noisy token j-1 of its own copy; the
    first token of a noisy block from the CLEAN token just before the block (the last token of
    the previous block or of the prefix). That token's context is exactly an AR model's, so the
    first token of every block keeps stage 1's next-token head, and the others keep its
    "predict the next position" role: conversion starts from what stage 1 learned instead of
    re-purposing every position. Tokens without such a source (clean tokens, a noisy token at
    position 0) map to themselves; they are never scored.
    """
    n = len(layout)
    idx = torch.arange(n)
    src = idx.clone()
    noisy = layout.kind == NOISY
    inner = torch.zeros(n, dtype=torch.bool)
    inner[1:] = (noisy[1:] & noisy[:-1] & (layout.copy[1:] == layout.copy[:-1])
                 & (layout.block[1:] == layout.block[:-1]) & (layout.position[1:] == layout.position[:-1] + 1))
    src[inner] = idx[inner] - 1
    first = noisy & ~inner & (layout.position > 0)
    clean = (layout.kind == CLEAN) | (layout.kind == CAUSAL)
    if bool(first.any()) and bool(clean.any()):
        lookup = torch.full((int(layout.position.max()) + 1,), -1, dtype=torch.long)
        lookup[layout.position[clean]] = idx[clean]
        found = lookup[layout.position[first] - 1]
        src[first] = torch.where(found >= 0, found, idx[first])
    return src


def symmetric_layout(prefix_len: int, response_len: int, block_size: int, context: int = CLEAN) -> TokenLayout:
    """BD3-style ablation: a noisy copy of the WHOLE sequence (x_t) followed by the clean one (x_0)."""
    n = prefix_len + response_len
    return TokenLayout.cat([block_layout(n, block_size, kind=NOISY, copy=1), block_layout(n, block_size, kind=context)])


def fused_layout(grid: BlockLayout, k: int, context: int) -> TokenLayout:
    """[block k-1 clean (of kind `context`), block k noisy] of fused one-step pass k."""
    b = grid.block_size
    prev = block_layout(b, b, start=int(grid.block_positions(k - 1)[0]), kind=context)
    cur = block_layout(b, b, start=int(grid.block_positions(k)[0]), kind=NOISY, copy=1)
    return TokenLayout.cat([prev, cur])
