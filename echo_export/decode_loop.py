"""A minimal decode loop over the graph_io contract, with onnxruntime or PyTorch runners.

Used to verify exported graphs and to collect calibration inputs; the production runtime
(`runtime/engine.py`, preallocated buffers, IO binding) is written separately. One loop over a
mode's description (runtime/decode_mode.DecodeMode), two backends: a runner is any callable
name->array dict -> list of output arrays (in the graph's output order, graph_io).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from runtime import precisions as precision_registry
from runtime.decode_mode import DecodeMode
from runtime.schedule import BlockLayout, cut_rows_at_eos, holds_eos

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
StepHook = Optional[Callable[[dict[str, np.ndarray]], None]]


@dataclass
class LoopResult:
    raw: np.ndarray  # [b, n] every generated id
    tokens: list[list[int]]  # cut before EOS
    passes: int


@dataclass(frozen=True)
class LoopSettings:
    """What a decode loop needs besides its graphs and its prompt: the KV cache's shape (float32 at
    the graphs' IO), the special ids and the report length."""
    capacity: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    mask_id: int
    eos_id: int
    max_new_tokens: int

    @staticmethod
    def of(lm: Any, capacity: int, tokenizer: Any, max_new_tokens: int) -> "LoopSettings":
        """From a model's LMConfig and its ReportTokenizer (mask and EOS ids)."""
        return LoopSettings(capacity, lm.num_hidden_layers, lm.num_key_value_heads, lm.head_dim, tokenizer.mask_id,
                            tokenizer.eos_id, max_new_tokens)

    def empty_cache(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed key and value caches [L, b, kvH, CAP, dh]: unwritten slots are masked, yet multiplied."""
        kc = np.zeros((self.n_layers, batch, self.n_kv_heads, self.capacity, self.head_dim), np.float32)
        return kc, np.zeros_like(kc)


def prefill_feeds(pixel_values: np.ndarray, prefix_ids: np.ndarray) -> dict[str, np.ndarray]:
    """A fixed-grid prefill's inputs (vision_prefill and ar_prefill alike)."""
    return {"pixel_values": pixel_values, "prefix_ids": prefix_ids}


def decode(mode: DecodeMode, prefill: Runner, step: Runner, prompt_ids: np.ndarray, feeds: dict[str, np.ndarray],
           settings: LoopSettings, *, on_step: StepHook = None, position_offset: int = 0) -> LoopResult:
    """Decode a batch over one mode's prefill and step graphs: the semantics of
    `fused_onestep_generate` (mode "fused") or `ar_generate` (mode "ar"). `feeds` are the
    prefill's inputs (prefill_feeds, or a native-resolution image's arrays and ids); a native
    image's passes sit at their canvas index + `position_offset` (its rope delta). `on_step`
    sees every step pass's feeds before it runs."""
    b, s = prompt_ids.shape[0], settings
    _check_fits(mode, prompt_ids, s)
    pre, (kc, vc) = dict(zip(mode.prefill_outputs, prefill(feeds))), s.empty_cache(b)
    kc[:, :, :, : mode.cached], vc[:, :, :, : mode.cached] = pre["present_key"], pre["present_value"]
    # pass 0 is fed the prefill's own ids (AR), else the prompt ids the prefill did not store (fused)
    written = [pre["tokens"].astype(np.int64)] if mode.prefill_ids else []
    carry = written[0] if written else prompt_ids[:, mode.cached : mode.cached + mode.width].astype(np.int64)
    done = holds_eos(carry, s.eos_id) if written else np.zeros(b, bool)
    opening = prompt_ids[:, mode.prefix_len - mode.tail :].astype(np.int64)
    past = mode.cached
    for j in range(mode.passes(s.max_new_tokens)):
        if done.all():
            break
        fresh = np.full((b, mode.feed - mode.width), s.mask_id, np.int64)
        if j == 0:  # block 0 opens with the prompt's tail
            fresh[:, : mode.tail] = opening
        step_feeds = _step_feeds(np.concatenate([carry, fresh], 1), mode.positions(j) + position_offset, kc, vc, past)
        if on_step is not None:
            on_step(step_feeds)
        out = dict(zip(mode.step_outputs, step(step_feeds)))
        if past + mode.width <= s.capacity:  # the last pass's KV: no later pass reads it
            kc[:, :, :, past : past + mode.width] = out["present_key"]
            vc[:, :, :, past : past + mode.width] = out["present_value"]
        past += mode.width
        carry = out["tokens"].astype(np.int64)
        skip = mode.tail if j == 0 else 0
        if skip:  # the prompt's tail ids are kept, whatever the graph read there
            carry[:, :skip] = opening
        written.append(carry)
        done |= holds_eos(carry[:, skip:], s.eos_id)  # generated positions only
    raw = np.concatenate(written, 1)[:, mode.tail :]
    # cut at a mask a block left unfilled (the official decoders' rule; the AR graphs never predict it)
    return LoopResult(raw, cut_rows_at_eos(raw, s.eos_id, s.mask_id), 1 + len(written) - mode.prefill_ids)


def _check_fits(mode: DecodeMode, prompt_ids: np.ndarray, settings: LoopSettings) -> None:
    if prompt_ids.shape[1] != mode.prefix_len:
        raise ValueError(f"a {prompt_ids.shape[1]}-id prompt, a mode described for {mode.prefix_len}")
    if (need := mode.slots_needed(settings.max_new_tokens)) > settings.capacity:
        raise ValueError(f"cache capacity {settings.capacity} holds fewer than the {need} slots a "
                         f"{mode.prefix_len}-id prompt and {settings.max_new_tokens} new tokens need")


def _step_feeds(ids: np.ndarray, positions: np.ndarray, kc: np.ndarray, vc: np.ndarray, past: int) -> dict:
    """A step pass's inputs (graph_io STEP_INPUTS): every row at the same positions and past length."""
    return {"input_ids": ids.astype(np.int64), "position_ids": np.broadcast_to(positions, ids.shape).astype(np.int64),
            "past_key": kc, "past_value": vc, "past_len": np.full((ids.shape[0],), past, np.int64)}


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

    path = Path(engine_dir) / f"weights.{precision}.bin"
    if precision not in precision_registry.shared_names() or not path.is_file() or path.stat().st_size == 0 or ort_capi.api() is None:
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


def inplace_runner(path, capacity: int, threads: int = 0, weights=None) -> Runner:
    """An in-place step (graph_io ar_step_inplace / block_step_inplace) as a runner with its standard
    role's IO (stacked caches of `capacity` slots in, the stored tokens' KV out: the AR token's, the
    one-step pass's previous block's), so that this loop and verification run it as they run the
    standard step. It keeps its own per-layer buffers (spare slots after `capacity`) bound once, as
    the runtime binds them; each pass copies the caller's cache in and reads back what the graph
    wrote at past_len. Every row must have the same past_len (the loops')."""
    from runtime import graph_io as gio
    from runtime.ort_backend import OrtGraph

    g = OrtGraph(path, threads=threads or None, shared_weights=weights)
    b, kvH, cap, dh = g.shape("past_key.0")
    t = g.shape("input_ids")[1]
    if cap != capacity + gio.inplace_spare_slots(t):
        raise ValueError(f"{path}: {cap} cache slots, for a loop of {capacity} (+{gio.inplace_spare_slots(t)} spare)")
    L = sum(n.startswith("past_key.") for n in g.inputs)
    kc, vc = np.zeros((L, b, kvH, cap, dh), np.float32), np.zeros((L, b, kvH, cap, dh), np.float32)
    ids, pos, past = np.zeros((b, t), np.int64), np.zeros((b, t), np.int64), np.zeros((b,), np.int64)
    ids_out = {n: np.zeros(shape, dt) for n, (shape, dt) in g.outputs.items() if not n.startswith("present_")}
    width = ids_out["tokens"].shape[1]  # the tokens a pass stores: the AR token, the previous block
    ins, outs = gio.inplace_cache_bindings(kc, vc)
    g.bind({"input_ids": ids, "position_ids": pos, "past_len": past, **ins}, {**ids_out, **outs})

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        p = feeds["past_len"]
        if (p != p[0]).any():
            raise ValueError("an in-place step writes every row at one past_len; these rows differ")
        ids[:], pos[:], past[:] = feeds["input_ids"], feeds["position_ids"], p
        kc[:, :, :, :capacity], vc[:, :, :, :capacity] = feeds["past_key"], feeds["past_value"]
        g.run()
        s = int(p[0])
        return [*(a.copy() for a in ids_out.values()), kc[:, :, :, s : s + width].copy(), vc[:, :, :, s : s + width].copy()]

    run.session = g  # type: ignore[attr-defined]
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

    def predictions(self, tokens: np.ndarray, conf: np.ndarray, carry) -> tuple[np.ndarray, np.ndarray]:
        """A denoise pass's predictions: each position's own, or (shifted) token j from position
        j-1 and token 0 from the carry, the last position of the pass that stored the block before."""
        if not self.shifted:
            return tokens, conf
        return (np.concatenate([carry[0][:, None], tokens[:, :-1]], 1),
                np.concatenate([carry[1][:, None], conf[:, :-1]], 1))


def multistep_decode(mode: DecodeMode, prefill: Runner, denoise: Runner, commit: Runner, prompt_ids: np.ndarray,
                     feeds: dict[str, np.ndarray], settings: LoopSettings, teacher: TeacherDecode, *,
                     position_offset: int = 0) -> LoopResult:
    """The teacher over block_denoise / block_commit graphs: the semantics of `multistep_generate`.
    `mode` is the fused one of the prompt (its prefill, block size and tail). The prefill stores the
    prompt's whole blocks but the last; a commit pass stores that one (and gives the carry, token
    0's prediction, of a shifted-prediction model)."""
    from runtime.schedule import select_unmask, transfer_schedule

    b, B, s = prompt_ids.shape[0], mode.width, settings
    grid = BlockLayout(mode.prefix_len, B)
    cache = _TeacherCache(s, b, B, position_offset, dict(zip(mode.prefill_outputs, prefill(feeds))), mode.cached)
    carry = cache.store(cache.run(commit, prompt_ids[:, mode.cached : grid.aligned_len], grid.block_positions(-1)))
    schedule = transfer_schedule(B, teacher.steps)
    x = np.full((b, B), s.mask_id, np.int64)
    x[:, : grid.tail] = prompt_ids[:, grid.aligned_len :]
    written, done, passes = [], np.zeros(b, bool), 2
    n_blocks = grid.num_blocks(s.max_new_tokens)
    for k in range(n_blocks):
        pos = grid.block_positions(k)
        for step in range(teacher.steps):
            still = x == s.mask_id
            if not still.any():
                break
            tok, conf = teacher.predictions(*cache.run(denoise, x, pos)[:2], carry)
            x = np.where(select_unmask(conf, still, schedule[step], teacher.rule, teacher.threshold), tok, x)
            passes += 1
        written.append(x.copy())
        done |= holds_eos(x[:, grid.tail if k == 0 else 0 :], s.eos_id)
        if done.all() or k == n_blocks - 1:
            break
        carry = cache.store(cache.run(commit, x, pos))
        passes += 1
        x = np.full((b, B), s.mask_id, np.int64)
    raw = np.concatenate(written, 1)[:, grid.tail :]
    return LoopResult(raw, cut_rows_at_eos(raw, s.eos_id, s.mask_id), passes)


class _TeacherCache:
    """The teacher's KV cache: the prefill's, then one block per commit pass."""

    def __init__(self, settings: LoopSettings, batch: int, block_size: int, position_offset: int,
                 prefill_out: dict[str, np.ndarray], cached: int) -> None:
        self.kc, self.vc = settings.empty_cache(batch)
        self.kc[:, :, :, :cached], self.vc[:, :, :, :cached] = prefill_out["present_key"], prefill_out["present_value"]
        self.past, self.B, self.offset = cached, block_size, position_offset

    def run(self, graph: Runner, ids: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
        """One pass over a block at `positions`, reading the cache (outputs: gio.BLOCK_PASS_OUTPUTS)."""
        return graph(_step_feeds(ids, positions + self.offset, self.kc, self.vc, self.past))

    def store(self, out: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A commit pass's KV into the cache; its last position's (token, confidence): the carry."""
        self.kc[:, :, :, self.past : self.past + self.B] = out[2]
        self.vc[:, :, :, self.past : self.past + self.B] = out[3]
        self.past += self.B
        return out[0][:, -1], out[1][:, -1]
