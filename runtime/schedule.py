"""Decode semantics shared by the PyTorch reference decoders and the runtime.

A report is written in blocks of B tokens that follow the prefix (length P, a multiple
of B). Block k occupies absolute positions [P + kB, P + (k+1)B).

Multi-step teacher: a block starts all-mask; each step accepts every masked position above
`threshold` and at least the scheduled count, the latter taken
  - "dynamic-ltr" (default): in reading order, the leftmost masked positions first;
  - "dynamic": most confident first (low-confidence-dynamic remasking, as in Fast-dLLM/SDAR);
or, with "static", exactly the scheduled count, most confident first.
Why reading order: when nothing is confident, the most confident masked position is usually a
template word far to the right ("silhouette", "normal"); committing it first settles the
sentence before the word that carries the finding is chosen, and the teacher under-reports
findings. The leftmost position instead sees everything before it, as in AR.

Fused one-step: pass t feeds [block t-1 (clean), block t (all mask)] = 2B tokens. Block -1
is the last whole block of the prefix, so prefill covers c - B tokens (c = floor(P/B)*B) and
every pass, the first included, has the same shape.

The block grid starts at the first prompt token (the official ECHO inference code's layout).
When P is not a multiple of B, block 0 holds the prompt's P - c tail ids (kept, never
replaced) and then masks, so the response starts mid-block; the models trained here pad their
prefix to a multiple of 16 (runtime/prompt.py), so their tail is empty and block 0 is all mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

UNMASK_THRESHOLD = 0.85

# Decode layouts (EchoConfig.decode_layout, the manifest's model_config). Both use the grid above.
# "echo": the models trained here; the mask token is never an answer (its logit is excluded).
# "official": imported ECHO checkpoints, as the official inference code decodes them: the prompt
# unpadded, argmax over every id (a position the model leaves masked cuts the report there).
LAYOUT_ECHO = "echo"
LAYOUT_OFFICIAL = "official"
DECODE_LAYOUTS = (LAYOUT_ECHO, LAYOUT_OFFICIAL)


def excludes_mask_token(layout: str) -> bool:
    """Whether a decode layout takes the mask token out of every argmax."""
    if layout not in DECODE_LAYOUTS:
        raise ValueError(f"unknown decode layout {layout!r}; expected one of {DECODE_LAYOUTS}")
    return layout == LAYOUT_ECHO
UNMASK_RULES = ("dynamic-ltr", "dynamic", "static", "sequential")
DEFAULT_UNMASK_RULE = "dynamic-ltr"
# The official inference code's remasking strategies are these rules under other names: its
# low_confidence_dynamic (every masked position above the threshold if there are at least k of
# them, else the k most confident) accepts exactly what "dynamic" (the k most confident and every
# one above the threshold) accepts, as the k most confident are then all above it; its
# low_confidence_static is "static", its sequential (the k leftmost masked positions) "sequential".
OFFICIAL_RULES = {"low_confidence_dynamic": "dynamic", "low_confidence_static": "static", "sequential": "sequential"}
OFFICIAL_DEFAULT_RULE = "dynamic"  # the official code's default, low_confidence_dynamic


def rule_named(name: str) -> str:
    """A rule by our name or the official code's."""
    rule = OFFICIAL_RULES.get(name, name)
    if rule not in UNMASK_RULES:
        raise ValueError(f"unknown unmask rule {name!r}; choose from {UNMASK_RULES + tuple(OFFICIAL_RULES)}")
    return rule


def transfer_schedule(block_size: int, steps: int) -> list[int]:
    """How many positions each step must accept at least: B split as evenly as possible."""
    if not 1 <= steps <= block_size:
        raise ValueError(f"steps must be in [1, {block_size}], got {steps}")
    base, extra = divmod(block_size, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def select_unmask(
    confidence: np.ndarray,
    still_masked: np.ndarray,
    min_count: int,
    rule: str = DEFAULT_UNMASK_RULE,
    threshold: float = UNMASK_THRESHOLD,
) -> np.ndarray:
    """Positions to accept this step, per row.

    confidence: [b, B] float, probability of the argmax token; still_masked: [b, B] bool.
    Returns a [b, B] bool array, a subset of still_masked. Ties break toward the lower
    position so that every implementation picks the same set.
    """
    rule = rule_named(rule)
    conf = np.where(still_masked, confidence.astype(np.float64), -np.inf)
    n_masked = still_masked.sum(-1, keepdims=True)
    if rule == "sequential":
        return still_masked & (np.cumsum(still_masked, -1) <= np.minimum(min_count, n_masked))
    if rule == "dynamic-ltr":
        leftmost = still_masked & (np.cumsum(still_masked, -1) <= np.minimum(min_count, n_masked))
        return still_masked & (leftmost | (conf > threshold))
    order = np.argsort(-conf, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(conf.shape[-1])[None, :].repeat(conf.shape[0], 0), -1)
    top = rank < np.minimum(min_count, n_masked)
    accept = top.copy()
    if rule == "dynamic":
        accept |= conf > threshold
    return accept & still_masked


@dataclass(frozen=True)
class BlockLayout:
    """Where blocks sit for a prompt of `prefix_len` ids and block size `block_size`.

    The grid starts at position 0. The prompt's whole blocks end at `aligned_len` (c); block 0
    of the response is [c, c + B) and begins with the prompt's `tail` = P - c ids."""

    prefix_len: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.prefix_len < self.block_size:
            raise ValueError(f"prompt length {self.prefix_len} is shorter than block size {self.block_size}: the fused "
                             "decoder carries the prompt's last whole block as its first pass's previous block")

    @property
    def aligned_len(self) -> int:
        """c: the prompt tokens in whole blocks (the official code crops its prefill cache to this)."""
        return self.prefix_len // self.block_size * self.block_size

    @property
    def tail(self) -> int:
        """Prompt ids at the start of response block 0 (0 when P is a multiple of B)."""
        return self.prefix_len - self.aligned_len

    def num_blocks(self, max_new_tokens: int) -> int:
        """Blocks decoded for up to max_new_tokens: the canvas is P + max_new rounded up to blocks."""
        return -(-(self.tail + max_new_tokens) // self.block_size)

    def block_positions(self, k: int) -> np.ndarray:
        """Absolute positions of response block k (k = -1 is the last whole prompt block)."""
        start = self.aligned_len + k * self.block_size
        return np.arange(start, start + self.block_size, dtype=np.int64)

    def fused_positions(self, k: int) -> np.ndarray:
        """Positions of fused pass k: [block k-1, block k]."""
        return np.concatenate([self.block_positions(k - 1), self.block_positions(k)])

    @property
    def fused_prefill_len(self) -> int:
        """Tokens whose KV the prefill stores before the first fused pass."""
        return self.aligned_len - self.block_size


def fused_block_slice(block_size: int, shifted: bool) -> slice:
    """Where fused pass [previous block, current block] holds the current block's logits:
    with shifted prediction token j is read from position j-1 (the reference decoder and the
    exported block_step graph read the same slice)."""
    return slice(block_size - 1, 2 * block_size - 1) if shifted else slice(block_size, 2 * block_size)


def cut_at_eos(ids: Iterable[int], eos_id: int, mask_id: Optional[int] = None) -> list[int]:
    """A report's tokens: the ids before the first EOS (all of them when there is none), then,
    given `mask_id`, before the first mask id (a position the model left masked: the official
    decoders' rule, in that order)."""
    row = [int(i) for i in ids]
    row = row[: row.index(eos_id)] if eos_id in row else row
    if mask_id is not None and mask_id in row:
        row = row[: row.index(mask_id)]
    return row


def cut_rows_at_eos(rows: Any, eos_id: int, mask_id: Optional[int] = None) -> list[list[int]]:
    """cut_at_eos per row of a [b, n] NumPy array or torch tensor."""
    return [cut_at_eos(r, eos_id, mask_id) for r in rows.tolist()]


def holds_eos(tokens: Any, eos_id: int) -> Any:
    """Per row (last axis), whether it holds EOS: [b, n] -> [b] bool, NumPy or torch."""
    return (tokens == eos_id).any(-1)
