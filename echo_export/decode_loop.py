"""A minimal decode loop over the graph_io contract, with onnxruntime or PyTorch runners.

Used to verify exported graphs and to collect calibration inputs; the production runtime
(`runtime/engine.py`, preallocated buffers, IO binding) is written separately. One loop,
two backends: a runner is any callable name->array dict -> list of output arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from runtime.schedule import BlockLayout, cut_rows_at_eos, holds_eos

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
StepHook = Optional[Callable[[dict[str, np.ndarray]], None]]


@dataclass
class LoopResult:
    raw: np.ndarray  # [b, n] every generated id
    tokens: list[list[int]]  # cut before EOS
    passes: int


def fused_decode(
    prefill: Runner,
    step: Runner,
    pixel_values: np.ndarray,
    prefix_ids: np.ndarray,
    *,
    block_size: int,
    capacity: int,
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    mask_id: int,
    eos_id: int,
    max_new_tokens: int,
    on_step: StepHook = None,
    prefill_feeds: Optional[dict[str, np.ndarray]] = None,
    position_offset: int = 0,
) -> LoopResult:
    """Fused one-step decoding, the semantics of `fused_onestep_generate`, over fixed-shape graphs.
    A native-resolution prefill takes `prefill_feeds` (its image arrays and ids) instead of
    pixel_values; its passes sit at their canvas index + `position_offset` (the image's rope delta)."""
    b, P = prefix_ids.shape
    B = block_size
    grid = BlockLayout(P, B)
    n_pre, t, n_blocks = grid.fused_prefill_len, grid.tail, grid.num_blocks(max_new_tokens)
    if n_pre + (n_blocks - 1) * B > capacity:
        raise ValueError(f"cache capacity {capacity} holds fewer than the tokens {max_new_tokens} new tokens need")
    kc = np.zeros((n_layers, b, n_kv_heads, capacity, head_dim), np.float32)
    vc = np.zeros_like(kc)
    pk, pv = prefill(prefill_feeds or {"pixel_values": pixel_values, "prefix_ids": prefix_ids})[:2]
    kc[:, :, :, :n_pre], vc[:, :, :, :n_pre] = pk, pv
    past_len = n_pre
    prev = prefix_ids[:, n_pre : grid.aligned_len].astype(np.int64)
    masks = np.full((b, B), mask_id, np.int64)
    cur = np.concatenate([prefix_ids[:, grid.aligned_len :].astype(np.int64), masks[:, t:]], 1)  # block 0: tail + masks
    blocks, done = [], np.zeros(b, bool)
    passes = 1
    for k in range(n_blocks):
        feeds = {
            "input_ids": np.concatenate([prev, cur], 1),
            "position_ids": np.broadcast_to(grid.fused_positions(k) + position_offset, (b, 2 * B)).astype(np.int64).copy(),
            "past_key": kc,
            "past_value": vc,
            "past_len": np.full((b,), past_len, np.int64),
        }
        if on_step is not None:
            on_step(feeds)
        tokens, _conf, pk, pv = step(feeds)
        passes += 1
        if past_len + B <= capacity:
            kc[:, :, :, past_len : past_len + B], vc[:, :, :, past_len : past_len + B] = pk, pv
        past_len += B
        prev = np.where(cur == mask_id, tokens.astype(np.int64), cur)  # the prompt's tail ids are kept
        blocks.append(prev)
        done |= holds_eos(prev[:, t if k == 0 else 0 :], eos_id)  # generated positions only
        if done.all():
            break
        cur = masks
    raw = np.concatenate(blocks, 1)[:, t:]
    return LoopResult(raw, cut_rows_at_eos(raw, eos_id, mask_id), passes)


def ar_decode(
    prefill: Runner,
    step: Runner,
    pixel_values: np.ndarray,
    prefix_ids: np.ndarray,
    *,
    capacity: int,
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    eos_id: int,
    max_new_tokens: int,
    on_step: StepHook = None,
) -> LoopResult:
    """Greedy AR decoding over ar_prefill + ar_step."""
    b, P = prefix_ids.shape
    if P + max_new_tokens - 1 > capacity:
        raise ValueError(f"cache capacity {capacity} < prefix {P} + {max_new_tokens - 1} tokens")
    kc = np.zeros((n_layers, b, n_kv_heads, capacity, head_dim), np.float32)
    vc = np.zeros_like(kc)
    tok, pk, pv = prefill({"pixel_values": pixel_values, "prefix_ids": prefix_ids})
    kc[:, :, :, :P], vc[:, :, :, :P] = pk, pv
    out, done, passes = [tok.astype(np.int64)], (tok[:, 0] == eos_id), 1
    for i in range(1, max_new_tokens):
        if done.all():
            break
        pos = P + i - 1
        feeds = {
            "input_ids": out[-1],
            "position_ids": np.full((b, 1), pos, np.int64),
            "past_key": kc,
            "past_value": vc,
            "past_len": np.full((b,), pos, np.int64),
        }
        if on_step is not None:
            on_step(feeds)
        tok, pk, pv = step(feeds)
        passes += 1
        kc[:, :, :, pos : pos + 1], vc[:, :, :, pos : pos + 1] = pk, pv
        out.append(tok.astype(np.int64))
        done |= tok[:, 0] == eos_id
    raw = np.concatenate(out, 1)
    return LoopResult(raw, cut_rows_at_eos(raw, eos_id), passes)


def ort_runner(path, threads: int = 0, weights=None) -> Runner:
    """An onnxruntime CPU session as a runner. `weights` (a runtime.ort_capi.SharedWeights of the
    graph's weights file, see shared_weights_of) makes it the way the runtime opens graphs: every
    session of that precision borrows one map of the file and one set of packed weights, so a
    verification that opens prefill and step graphs side by side holds the weights once."""
    if weights is not None:
        return _shared_runner(path, weights, threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return sess.run(None, {n: feeds[n] for n in names})

    run.session = sess  # type: ignore[attr-defined]
    return run


def shared_weights_of(engine_dir, precision: str):
    """The runtime's SharedWeights of `engine_dir`/weights.<precision>.bin, or None where the runtime
    would not share either (no such file, fp16, an onnxruntime without a usable C API)."""
    from pathlib import Path

    from runtime import ort_capi
    from runtime.engine import SHARED_PRECISIONS

    path = Path(engine_dir) / f"weights.{precision}.bin"
    if precision not in SHARED_PRECISIONS or not path.is_file() or path.stat().st_size == 0 or ort_capi.api() is None:
        return None
    return ort_capi.SharedWeights(path)


def _shared_runner(path, weights, threads: int) -> Runner:
    from runtime.ort_capi import CapiSession

    sess = CapiSession(path, weights, threads or None)
    if any(d is None for shape, _ in sess.outputs.values() for d in shape):
        raise ValueError(f"{path}: an output without a fixed shape cannot be preallocated")

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ins = {n: np.ascontiguousarray(feeds[n], dtype=dt) for n, (_, dt) in sess.inputs.items()}
        outs = {n: np.empty(shape, dt) for n, (shape, dt) in sess.outputs.items()}
        sess.bind(ins, outs)
        sess.run()
        return list(outs.values())

    run.session = sess  # type: ignore[attr-defined]
    return run


def torch_runner(module) -> Runner:
    """Run a graph wrapper module (graphs.py) in PyTorch with the same IO as its ONNX file."""
    import torch

    names = list(module.input_names)

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
        return [o.numpy() for o in outs]

    return run


@dataclass(frozen=True)
class TeacherDecode:
    """The multi-step teacher's settings for `multistep_decode` (runtime/multistep.MultistepOptions)."""
    steps: int
    rule: str
    threshold: float
    shifted: bool


def multistep_decode(prefill: Runner, denoise: Runner, commit: Runner, prefix_ids: np.ndarray, *,
                     teacher: TeacherDecode, block_size: int, capacity: int, n_layers: int, n_kv_heads: int,
                     head_dim: int, mask_id: int, eos_id: int, max_new_tokens: int,
                     prefill_feeds: dict[str, np.ndarray], position_offset: int = 0) -> LoopResult:
    """The teacher over block_denoise / block_commit graphs: the semantics of `multistep_generate`.
    The prefill stores the prompt's whole blocks but the last; a commit pass stores that one (and
    gives the carry, token 0's prediction, of a shifted-prediction model)."""
    from runtime.schedule import select_unmask, transfer_schedule

    b, P = prefix_ids.shape
    B = block_size
    grid = BlockLayout(P, B)
    kc = np.zeros((n_layers, b, n_kv_heads, capacity, head_dim), np.float32)
    vc = np.zeros_like(kc)
    pk, pv = prefill(prefill_feeds)[:2]
    past = grid.fused_prefill_len
    kc[:, :, :, :past], vc[:, :, :, :past] = pk, pv

    def run(graph: Runner, ids: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
        return graph({"input_ids": ids.astype(np.int64), "past_key": kc, "past_value": vc,
                      "position_ids": np.broadcast_to(positions + position_offset, (b, B)).astype(np.int64).copy(),
                      "past_len": np.full((b,), past, np.int64)})

    def store(out: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        nonlocal past
        kc[:, :, :, past : past + B], vc[:, :, :, past : past + B] = out[2], out[3]
        past += B
        return out[0][:, -1], out[1][:, -1]

    carry = store(run(commit, prefix_ids[:, past : grid.aligned_len], grid.block_positions(-1)))
    schedule = transfer_schedule(B, teacher.steps)
    x = np.full((b, B), mask_id, np.int64)
    x[:, : grid.tail] = prefix_ids[:, grid.aligned_len :]
    blocks, done, passes = [], np.zeros(b, bool), 2
    n_blocks = grid.num_blocks(max_new_tokens)
    for k in range(n_blocks):
        pos = grid.block_positions(k)
        for s in range(teacher.steps):
            still = x == mask_id
            if not still.any():
                break
            tok, conf = run(denoise, x, pos)[:2]
            if teacher.shifted:
                tok = np.concatenate([carry[0][:, None], tok[:, :-1]], 1)
                conf = np.concatenate([carry[1][:, None], conf[:, :-1]], 1)
            x = np.where(select_unmask(conf, still, schedule[s], teacher.rule, teacher.threshold), tok, x)
            passes += 1
        blocks.append(x.copy())
        done |= holds_eos(x[:, grid.tail if k == 0 else 0 :], eos_id)
        if done.all() or k == n_blocks - 1:
            break
        carry = store(run(commit, x, pos))
        passes += 1
        x = np.full((b, B), mask_id, np.int64)
    raw = np.concatenate(blocks, 1)[:, grid.tail :]
    return LoopResult(raw, cut_rows_at_eos(raw, eos_id, mask_id), passes)
