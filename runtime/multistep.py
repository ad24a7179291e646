"""The multi-step teacher (ECHO Base) on engine graphs: per block `steps` denoising passes that
read the cache and store nothing, then one commit pass that stores the finished block's KV.

Semantics are the official inference code's multi-step decode and echo_train's
`multistep_generate` (which verify.py holds the graphs to): the block grid and the prompt's tail
as in runtime/schedule.BlockLayout; step s accepts, by the rule (schedule.select_unmask), at least
transfer_schedule(B, steps)[s] masked positions; a block stops early when none is left masked.
The prefill graph stores the prompt's whole blocks but the last; a commit pass stores that one,
whose last position also gives a shifted-prediction model its token 0 of block 0 (the carry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import graph_io as gio
from .errors import EchoRuntimeError
from .schedule import (DEFAULT_UNMASK_RULE, LAYOUT_OFFICIAL, OFFICIAL_DEFAULT_RULE, UNMASK_THRESHOLD, BlockLayout,
                       rule_named, select_unmask, transfer_schedule)


@dataclass(frozen=True)
class MultistepOptions:
    """steps None: the block size (the official default); rule: ours or the official code's name."""

    steps: Optional[int] = None
    rule: Optional[str] = None  # None: the official default for imported checkpoints, ours for ours
    threshold: float = UNMASK_THRESHOLD

    def resolved(self, block_size: int, layout: str = LAYOUT_OFFICIAL) -> "MultistepOptions":
        steps = block_size if self.steps is None else int(self.steps)
        if not 1 <= steps <= block_size:
            raise EchoRuntimeError(f"steps must be in [1, {block_size}] (the block size), got {steps}")
        if not 0.0 <= self.threshold <= 1.0:
            raise EchoRuntimeError(f"threshold must be in [0, 1], got {self.threshold}")
        default = OFFICIAL_DEFAULT_RULE if layout == LAYOUT_OFFICIAL else DEFAULT_UNMASK_RULE
        try:
            rule = rule_named(self.rule or default)
        except ValueError as e:
            raise EchoRuntimeError(str(e)) from None
        return MultistepOptions(steps, rule, float(self.threshold))


class BlockPasses:
    """The denoise and commit graphs of one batch size, bound to a decoder's KV cache (one graph
    when both roles name one file: a block-causal context makes them the same computation)."""

    def __init__(self, rt, dec, batch: int) -> None:
        B = rt.block_size
        self.B, self.shifted = B, bool((rt.manifest.model_config or {}).get("shifted_prediction"))
        self.input_ids = np.full((batch, B), rt.tokenizer.mask_id, np.int64)
        self.position_ids = np.zeros((batch, B), np.int64)
        self.denoise = rt.graph(gio.BLOCK_DENOISE, batch)
        self.commit = rt.graph(gio.BLOCK_COMMIT, batch)
        self.out = {}
        for g in {id(self.denoise): self.denoise, id(self.commit): self.commit}.values():
            outs = {"tokens": np.zeros((batch, B), np.int64), "confidence": np.zeros((batch, B), np.float32),
                    "present_key": dec.kv(g, "present_key", B), "present_value": dec.kv(g, "present_value", B)}
            g.bind({"input_ids": self.input_ids, "position_ids": self.position_ids, "past_key": dec.cache_k,
                    "past_value": dec.cache_v, "past_len": dec.past_len}, outs)
            self.out[id(g)] = outs

    def run(self, graph, ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """One pass over a block; (each position's argmax, its confidence, seconds in the session)."""
        self.input_ids[:] = ids
        self.position_ids[:] = positions
        secs = graph.run()
        o = self.out[id(graph)]
        return o["tokens"], o["confidence"], secs

    def predictions(self, tokens: np.ndarray, conf: np.ndarray, carry) -> tuple[np.ndarray, np.ndarray]:
        """The block's predictions: each position's own, or (shifted) token j from position j-1 and
        token 0 from the carry, the last position of the pass that stored the token before it."""
        if not self.shifted:
            return tokens, conf
        return (np.concatenate([carry[0][:, None], tokens[:, :-1]], 1),
                np.concatenate([carry[1][:, None], conf[:, :-1]], 1))


@dataclass
class BlockTrace:
    """What the loop hands back: every block's final ids, passes per row, session seconds, per-block
    seconds, and the rows that wrote EOS."""
    blocks: list
    passes: np.ndarray
    session: float
    times: list
    done: np.ndarray


def multistep_blocks(passes: BlockPasses, dec, prefix_ids: np.ndarray, grid: BlockLayout, n_rows: int,
                     max_new: int, opts: MultistepOptions, mask_id: int, eos_id: int, offset: int = 0,
                     on_block: Optional[Callable[[np.ndarray, int, np.ndarray], None]] = None) -> BlockTrace:
    """Decode blocks after a prefill that stored the prompt's first grid.fused_prefill_len tokens."""
    import time

    B, b = grid.block_size, prefix_ids.shape[0]
    past = grid.fused_prefill_len
    dec.past_len[:] = past
    first_pos = grid.block_positions(-1) + offset
    past, carry, session = _commit(passes, dec, prefix_ids[:, past : grid.aligned_len], first_pos, past)
    x = np.full((b, B), mask_id, np.int64)
    x[:, : grid.tail] = prefix_ids[:, grid.aligned_len :]
    schedule = transfer_schedule(B, opts.steps)
    trace = BlockTrace([], np.full(b, 2, np.int64), session, [], np.zeros(b, bool))  # prefill + commit
    n_blocks = grid.num_blocks(max_new)
    for k in range(n_blocks):
        t0 = time.perf_counter()
        positions = grid.block_positions(k) + offset
        x = _denoise(passes, x, positions, carry, schedule, opts, mask_id, n_rows, trace)
        skip = grid.tail if k == 0 else 0
        trace.blocks.append(x.copy())
        writing = ~trace.done
        trace.done |= (x[:, skip:] == eos_id).any(-1)  # generated positions only
        if on_block is not None:  # (the block's ids, how many of them are prompt ids, rows writing before it)
            on_block(x, skip, writing)
        if trace.done[:n_rows].all() or k == n_blocks - 1:
            trace.times.append(time.perf_counter() - t0)
            break
        if past + B > dec.cap:
            raise EchoRuntimeError(f"the KV cache ({dec.cap} slots) cannot hold block {k + 1}")
        past, carry, secs = _commit(passes, dec, x, positions, past)
        trace.session += secs
        trace.passes += ~trace.done
        trace.times.append(time.perf_counter() - t0)
        x = np.full((b, B), mask_id, np.int64)
    return trace


def _denoise(passes: BlockPasses, x: np.ndarray, positions: np.ndarray, carry: tuple[np.ndarray, np.ndarray],
             schedule: list[int], opts: MultistepOptions, mask_id: int, n_rows: int, trace: BlockTrace) -> np.ndarray:
    """The block `x` after its denoising passes: each unmasks the positions opts.rule picks (as many
    as the schedule's step says), until none of the first n_rows rows is masked or the steps end.
    Counts the passes and their session seconds into `trace`."""
    for s in range(opts.steps):
        still = x == mask_id
        if not still[:n_rows].any():
            break
        tokens, conf, secs = passes.run(passes.denoise, x, positions)
        pred, p = passes.predictions(tokens, conf, carry)
        accept = select_unmask(p, still, schedule[s], opts.rule, opts.threshold)
        x = np.where(accept, pred, x)
        trace.session += secs
        # a row counts the passes it needed: one whose block is already whole only rides along (a
        # report's count must not depend on the images batched with it)
        trace.passes += ~trace.done & still.any(-1)
    return x


def _commit(passes: BlockPasses, dec, ids: np.ndarray, positions: np.ndarray,
            past: int) -> tuple[int, tuple[np.ndarray, np.ndarray], float]:
    """The commit pass over clean `ids` at `positions`: its KV stored after the first `past` cache
    slots. Returns the new cache length, the carry (the last position's token and confidence,
    which predict the next block's first) and the pass's session seconds."""
    tokens, conf, secs = passes.run(passes.commit, ids, positions)
    past = _store(dec, passes.commit, past)
    return past, (tokens[:, -1].copy(), conf[:, -1].copy()), secs


def _store(dec, graph, past: int) -> int:
    """The commit pass's KV -> cache slots [past, past + B); returns the new cache length."""
    dec.step.kv_store("past_key", graph, "present_key", past)
    dec.step.kv_store("past_value", graph, "present_value", past)
    n = past + dec.block_size
    dec.past_len[:] = n
    return n
