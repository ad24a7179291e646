"""The two one-pass decode modes over the graph_io graphs, described once: which graphs a mode
runs, what its passes feed, store and read. The runtime's loop (runtime/engine.py), the build's
export and reference decodes (echo_export/build.py), verification's decode loop
(echo_export/decode_loop.py) and the static-buffer PyTorch decoder (echo_export/cuda_graph_decode.py)
all read this description instead of deriving it again.

fused   the one-step student: vision_prefill stores the KV of the first P - B prefix ids; pass k
        feeds [block k-1 (clean), block k (B x MASK)] at BlockLayout.fused_positions(k), stores
        the KV of block k-1 and reads block k (block -1: the prompt's last whole block).
ar      the autoregressive baseline: ar_prefill stores the whole prefix and gives token 0; pass j
        feeds the last token at position P + j and stores its KV.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import graph_io as gio
from .schedule import BlockLayout

FUSED = "fused"
AR = "ar"
ONE_PASS_MODES = (FUSED, AR)
GRAPHS = {FUSED: (gio.VISION_PREFILL, gio.BLOCK_STEP), AR: (gio.AR_PREFILL, gio.AR_STEP)}  # (prefill, step) roles


@dataclass(frozen=True)
class DecodeMode:
    """What one decode mode's graphs feed and read, for a prompt of `prefix_len` ids.

    The prefill stores the KV of the first `cached` prefix ids and gives `prefill_ids` new ids
    (AR: token 0). Pass j feeds `feed` ids at positions `first_positions + j * width`, returns the
    KV of the first `width` of them and `width` new ids, which the next pass feeds first. Pass 0
    is fed the prefill's own ids (AR) or else the prefix ids the prefill did not cache (fused: the
    prompt's last whole block), then its `tail` (prompt ids that open the first new block, kept,
    not generated) and masks.
    """

    name: str
    prefill: str  # graph roles
    step: str
    prefix_len: int
    cached: int
    feed: int
    width: int
    first_positions: np.ndarray
    tail: int = 0
    prefill_ids: int = 0

    @staticmethod
    def of(name: str, prefix_len: int, block_size: int) -> "DecodeMode":
        """The mode `name` ("fused" or "ar") for a prompt of `prefix_len` ids; ValueError for a
        fused prompt shorter than a block."""
        if name == FUSED:
            grid = BlockLayout(prefix_len, block_size)
            return DecodeMode(FUSED, *GRAPHS[FUSED], prefix_len, grid.fused_prefill_len, 2 * block_size, block_size,
                              grid.fused_positions(0), grid.tail)
        if name == AR:
            return DecodeMode(AR, *GRAPHS[AR], prefix_len, prefix_len, 1, 1, np.array([prefix_len], np.int64),
                              prefill_ids=1)
        raise ValueError(f"unknown decode mode {name!r}; choose from {ONE_PASS_MODES}")

    @property
    def prefill_outputs(self) -> tuple[str, ...]:
        return gio.AR_PREFILL_OUTPUTS if self.name == AR else gio.PREFILL_OUTPUTS

    @property
    def step_outputs(self) -> tuple[str, ...]:
        return gio.AR_STEP_OUTPUTS if self.name == AR else gio.BLOCK_STEP_OUTPUTS

    def positions(self, j: int) -> np.ndarray:
        """The positions pass j feeds (at a fixed grid; a native image adds its rope delta)."""
        return self.first_positions + j * self.width

    def passes(self, max_new_tokens: int) -> int:
        """Step passes that write `max_new_tokens` new ids (the fused first block's tail included)."""
        return -(-(max_new_tokens + self.tail - self.prefill_ids) // self.width)

    def slots_needed(self, max_new_tokens: int) -> int:
        """KV cache slots for reports of up to `max_new_tokens` ids: the prefill's, then every pass
        stores its first `width` ids but the last one, whose KV no later pass reads."""
        return self.cached + self.width * (-(-(max_new_tokens + self.tail) // self.width) - 1)
