"""Run every built variant with onnxruntime and compare with the PyTorch reference decoders.

Block graphs (vision_prefill + block_step) are compared with `fused_onestep_generate`;
AR graphs (ar_prefill + ar_step) with the same wrapper modules run in PyTorch (the graphs
exclude the mask token from the argmax, as graph_io requires; `ar_generate` does not, so
its agreement is reported as information only). fp32 must reproduce the reference on every
image or the build fails; fp16 and int8 report token agreement and the finding-F1 change.

The decode loop is `echo_export.decode_loop` (minimal, contract-following); the production
runtime is `runtime/` and is not used here so that a runtime bug cannot hide an export bug.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from runtime import graph_io as gio
from runtime import precisions as precision_registry
from runtime.decode_mode import AR, FUSED, GRAPHS, DecodeMode
from runtime.memory import memory_available_bytes
from runtime.schedule import BlockLayout

from .decode_loop import LoopResult, LoopSettings, StepHook, decode, inplace_runner, ort_runner, shared_weights_of, torch_runner
from .timing import alternating_run_medians


@dataclass
class VerifyItem:
    id: str
    pixels: Any  # [1, S, S] float32; a runtime.native_image.NativeImage at native resolution
    report: Optional[str] = None


@dataclass
class VerifyJob:
    """What every verification reads: the folder being built, its graphs ((role, precision, batch)
    -> file), the tokenizer, the held-out images and the variants to check."""
    engine_dir: Path
    files: dict[tuple[str, str, int], str]
    tokenizer: Any  # runtime.text.ReportTokenizer
    items: list[VerifyItem]
    precisions: list[str]
    batch_sizes: list[int]
    capacity: int
    log: Callable[[str], None] = print

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def settings(self, lm: Any, max_new_tokens: int) -> LoopSettings:
        return LoopSettings.of(lm, self.capacity, self.tokenizer, max_new_tokens)

    def graph(self, role: str, precision: str, batch: int) -> Path:
        return self.engine_dir / self.files[(role, precision, batch)]

    def chunks(self, cfg: Any, batch: int, n_image_tokens: int) -> list["_Chunk"]:
        return _chunks_of(self.items, cfg, self.tokenizer, batch, n_image_tokens)


def _chunks(items: list, b: int):
    """Fixed-size batches; the last is padded by repeating its final item (padding is dropped)."""
    for i in range(0, len(items), b):
        part = items[i : i + b]
        yield part, part + [part[-1]] * (b - len(part))


def _agreement(pred: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(position-wise token agreement over the longer sequence, exact-match rate)."""
    same = total = exact = 0
    for p, r in zip(pred, ref):
        n = max(len(p), len(r), 1)
        same += sum(a == b for a, b in zip(p, r))
        total += n
        exact += p == r
    return (same / total if total else 1.0), (exact / len(pred) if pred else 1.0)


def _per_pass_agreement(step, passes: list[tuple[dict, np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Share of block tokens a variant's block step gives on exactly the fp32 run's inputs, and
    how sure fp32 itself was where they differ. `passes`: (feeds, fp32 tokens, rows still
    writing, fp32 confidence) of every fp32 pass, recorded as the fp32 graph ran, so the fp32
    session is gone before the variant's opens (at real size they do not fit side by side).

    Free-running agreement (`token_agreement`) counts every token after a report's first
    difference as a miss, so one near-tie flip early in a report weighs like dozens of errors;
    this measure isolates the graph's own numerical fidelity, pass by pass. The fp32 confidence
    (top probability) at the flipped positions against all positions says whether the flips are
    near-ties of the model or real numerical damage.
    """
    same = total = 0
    conf_all: list[np.ndarray] = []
    conf_flip: list[np.ndarray] = []
    for feeds, ref, active, ref_conf in passes:
        got = np.asarray(step(feeds)[0])
        same += int((got[active] == ref[active]).sum())
        total += int(active.sum()) * ref.shape[1]
        conf_all.append(ref_conf[active].ravel())
        conf_flip.append(ref_conf[active][got[active] != ref[active]])
    flips = np.concatenate(conf_flip) if conf_flip else np.zeros(0)
    every = np.concatenate(conf_all) if conf_all else np.zeros(0)
    return {
        "agreement": same / total if total else 1.0,
        "flips": int(flips.size),
        "fp32_confidence_median_at_flips": float(np.median(flips)) if flips.size else None,
        "fp32_confidence_median_all": float(np.median(every)) if every.size else None,
    }


def _f1(texts: dict[str, str], refs: dict[str, str]):
    try:
        from echo_train.metrics import finding_f1
    except ImportError:
        return None, "F1 not computed: metrics package missing"
    if not refs:
        return None, "F1 not computed: no reference reports"
    return float(finding_f1(texts, refs)["micro_f1"]), None


def _f1_change(texts: dict[str, str], ref_texts: dict[str, str], refs: dict[str, str]) -> Optional[dict]:
    """Finding F1 of `texts` minus that of the reference decoder's `ref_texts`, on the same images,
    with a paired bootstrap 95% CI: a flip changes a report's findings either way, so on a few
    hundred images the change moves by about a point from flips alone; the interval says how much
    of a change is that noise."""
    try:
        from echo_train.metrics.finding_f1 import paired_micro_f1_difference
    except ImportError:
        return None
    ids = [i for i in texts if i in refs]
    if not ids:
        return None
    d = paired_micro_f1_difference({i: texts[i] for i in ids}, ref_texts, refs, n_boot=1000, seed=0)
    return {"delta": float(d["delta"]), "ci95": [float(x) for x in d["ci95"]] if d["ci95"] else None}


def _timing_memory(engine_dir: Path, precisions: list[str]) -> int:
    """About what block_step sessions of every precision side by side hold: the fp32 / int8 weights
    once, fp16's file and its fp32 copy (fp16_cpu_session_bytes)."""
    total = 0
    for p in precisions:
        f = Path(engine_dir) / f"weights.{p}.bin"
        size = f.stat().st_size if f.is_file() else 0
        entry = precision_registry.get(p)  # fp16: the file and its fp32 copy (cpu_memory_factor 2)
        total += size + (entry.cpu_session_bytes(size) if entry.cpu_memory_factor > 1 else 0)
    return total


def _side_by_side(engine_dir: Path, precision: str, log: Callable[[str], None]) -> bool:
    """Whether this precision's prefill and step sessions fit in memory together, as the runtime
    opens them. fp16 on a CPU does not share weights, and onnxruntime folds a cast to fp32 of every
    fp16 weight at load: each session holds about the fp32 weights (a 3.75B model: about 15 GB
    each). Where two do not fit, verification opens one at a time (`_prefill_first`)."""
    entry = precision_registry.get(precision)
    if entry.cpu_memory_factor <= 1:
        return True
    f = Path(engine_dir) / f"weights.{precision}.bin"
    avail = memory_available_bytes()
    if not f.is_file() or avail is None or entry.cpu_session_bytes(f.stat().st_size, sessions=2) < 0.7 * avail:
        return True
    log(f"  {precision}: one session at a time (two sessions, each with an fp32 copy of {f.stat().st_size / 1e9:.1f} "
        f"GB of fp16 weights, do not fit in {avail / 1e9:.1f} GB available): every prefill first, then the steps")
    return False


@dataclass
class _Chunk:
    """One decode of the verification loop: its items, the prefill's feeds, the prompt ids of every
    row and the rope delta of its passes (a native-resolution image's; 0 at a fixed grid)."""
    part: list
    feeds: dict
    prompt_ids: np.ndarray
    offset: int = 0


def _prefill_chunks(items: list[VerifyItem], b: int, prefix: np.ndarray) -> list[_Chunk]:
    """Every chunk of `b` images (the last one padded) at the fixed grid."""
    out = []
    for part, padded in _chunks(items, b):
        ids = np.broadcast_to(prefix, (b, prefix.size)).copy()
        out.append(_Chunk(part, {"pixel_values": np.stack([it.pixels for it in padded]).astype(np.float32),
                                 "prefix_ids": ids}, ids))
    return out


def _chunks_of(items: list[VerifyItem], cfg: Any, tokenizer: Any, batch: int, n_image_tokens: int) -> list[_Chunk]:
    """The decodes of the verification loop: one per image at native resolution, else batches."""
    if cfg.vision.native:
        return native_chunks(items, cfg, tokenizer)
    return _prefill_chunks(items, batch, np.array(tokenizer.prefix_ids(n_image_tokens), np.int64))


def native_chunks(items: list[VerifyItem], model_cfg, tokenizer) -> list[_Chunk]:
    """One chunk per image at its own grid (native resolution decodes at batch 1)."""
    from runtime.native_image import mrope_position_ids
    from runtime.schedule import BlockLayout

    out = []
    for it in items:
        img = it.pixels
        ids = np.asarray([tokenizer.prefix_ids(img.n_tokens)], np.int64)
        pos, delta = mrope_position_ids(ids.shape[1], model_cfg.image_start, *img.llm_grid)
        n = BlockLayout(ids.shape[1], model_cfg.block_size).fused_prefill_len
        feeds = {"pixel_patches": img.patches, "patch_rc": img.patch_rc, "window_gather": img.window_gather,
                 "window_valid": img.window_valid, "window_inverse": img.window_inverse,
                 "prefix_ids": np.ascontiguousarray(ids[:, :n]), "position_ids": np.ascontiguousarray(pos[:, None, :n])}
        out.append(_Chunk([it], feeds, ids, delta))
    return out


def _feed_key(feeds: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(feeds):
        h.update(k.encode())
        h.update(np.ascontiguousarray(feeds[k]).tobytes())
    return h.hexdigest()


def _prefill_first(path: Path, feeds: list[dict[str, np.ndarray]]):
    """Run a prefill graph on every chunk's feeds now, let its session go, and return a runner that
    hands the outputs back in the same order (checking that each feed is the one computed), so the
    step session opens alone. The outputs are KV caches of the prefix (a 3.75B model: 23 MB per
    image)."""
    from collections import deque

    run = ort_runner(path)
    done = deque((_feed_key(f), run(f)) for f in feeds)
    run = None

    def replay(f: dict[str, np.ndarray]) -> list[np.ndarray]:
        key, out = done.popleft()
        if key != _feed_key(f):
            raise RuntimeError(f"{path}: prefill outputs replayed for another input")
        return out

    return replay


def _open_pair(job: VerifyJob, mode: str, precision: str, batch: int, chunks: list[_Chunk], weights=None):
    """(prefill runner, step runner) of one mode's graphs in one precision: side by side where they
    fit (fp32/int8 sharing one copy of the weights), else the prefill run first on every chunk.
    `weights`: the precision's shared_weights_of, where the caller opens more of its graphs."""
    pre_role, step_role = GRAPHS[mode]
    if weights is None:  # fp32/int8: prefill and step hold the weights once
        weights = shared_weights_of(job.engine_dir, precision)
    feeds = [c.feeds for c in chunks]
    native = any("pixel_patches" in f for f in feeds)  # dynamic shapes: no preallocated shared session
    if not native and _side_by_side(job.engine_dir, precision, job.log):
        pre = ort_runner(job.graph(pre_role, precision, batch), weights=weights)
    else:
        pre = _prefill_first(job.graph(pre_role, precision, batch), feeds)
    return pre, ort_runner(job.graph(step_role, precision, batch), weights=weights)


def _decode_chunks(mode: str, pre, step, chunks: list[_Chunk], settings: LoopSettings, block_size: int,
                   on_step: StepHook = None, after: Optional[Callable[[_Chunk, LoopResult], None]] = None):
    """Every chunk through decode_loop.decode: (image id -> tokens, passes in all)."""
    got: dict[str, list[int]] = {}
    passes = 0
    for c in chunks:
        md = DecodeMode.of(mode, c.prompt_ids.shape[1], block_size)
        r = decode(md, pre, step, c.prompt_ids, c.feeds, settings, on_step=on_step, position_offset=c.offset)
        if after is not None:
            after(c, r)
        passes += r.passes
        got.update({it.id: t for it, t in zip(c.part, r.tokens)})
    return got, passes


def time_graphs(paths: dict[str, Path], feeds: dict[str, np.ndarray], repeat: int = 100, threads: int = 0) -> dict[str, float]:
    """Median milliseconds of one run of each graph on the same feeds, timed in alternating back-to-back runs
    (so that a busy machine slows every variant alike and their ratio stays meaningful)."""
    runners = {name: ort_runner(path, threads, weights=shared_weights_of(Path(path).parent, name))
               for name, path in paths.items()}
    fns = {name: (lambda run=run: run(feeds)) for name, run in runners.items()}
    return {name: 1e3 * t for name, t in alternating_run_medians(fns, repeat, warmup=10).items()}


@dataclass
class BlockReference:
    """`fused_onestep_generate`'s tokens for every verification image at every batch size, computed
    while the PyTorch model is loaded, so that verification itself runs without it."""
    cfg: Any  # echo_train.model.config.EchoConfig
    n_image_tokens: int
    tokens: dict[int, dict[str, list[int]]]  # batch -> image id -> token ids
    max_new_tokens: int
    # batch -> the PyTorch graph wrappers' passes (graph_reference): the per-pass base of a build
    # with no fp32 graphs; None where fp32 graphs give it
    passes: Optional[dict[int, list["Pass"]]] = None


def block_reference(model, tokenizer, items: list[VerifyItem], batch_sizes: list[int], max_new_tokens: int) -> BlockReference:
    """The PyTorch reference tokens `verify_block` compares every block variant with."""
    from echo_train.decoding import fused_onestep_generate

    B = model.cfg.block_size
    tokens: dict = {}
    if model.cfg.vision.native:
        from echo_train.decoding.native import native_onestep_generate

        one = {it.id: native_onestep_generate(model, tokenizer, it.pixels, max_new_tokens).tokens[0] for it in items}
        return BlockReference(model.cfg, model.n_image_tokens, {b: one for b in batch_sizes}, max_new_tokens)
    for b in batch_sizes:
        ref_tokens: dict[str, list[int]] = {}
        for part, padded in _chunks(items, b):
            px = torch.from_numpy(np.stack([it.pixels for it in padded]))
            r = fused_onestep_generate(model, tokenizer, px, B, max_new_tokens)
            for it, toks in zip(part, r.tokens):
                ref_tokens[it.id] = toks
        tokens[b] = ref_tokens
    return BlockReference(model.cfg, model.n_image_tokens, tokens, max_new_tokens)


def _teacher_run(cfg):
    """The teacher's verification settings: B steps, the layout's default rule (the official code's for
    imported checkpoints, ours for ours), the default threshold."""
    from echo_train.decoding.block_diffusion import MultistepRun
    from runtime.multistep import MultistepOptions

    o = MultistepOptions().resolved(cfg.block_size, cfg.decode_layout)
    return MultistepRun(o.steps, o.rule, o.threshold)


def teacher_reference(model, tokenizer, items: list[VerifyItem], batch_sizes: list[int],
                      max_new_tokens: int) -> BlockReference:
    """`multistep_generate`'s tokens (B steps per block) that `verify_teacher` compares the
    block_denoise / block_commit graphs with."""
    from echo_train.decoding import multistep_generate

    run = _teacher_run(model.cfg)
    tokens: dict = {}
    if model.cfg.vision.native:
        from echo_train.decoding.native import native_multistep_generate

        one = {it.id: native_multistep_generate(model, tokenizer, it.pixels, run, max_new_tokens).tokens[0]
               for it in items}
        return BlockReference(model.cfg, model.n_image_tokens, {b: one for b in batch_sizes}, max_new_tokens)
    for b in batch_sizes:
        tokens[b] = {}
        for part, padded in _chunks(items, b):
            px = torch.from_numpy(np.stack([it.pixels for it in padded]))
            r = multistep_generate(model, tokenizer, px, model.cfg.block_size, run.steps, max_new_tokens, run.rule,
                                   run.threshold)
            tokens[b].update({it.id: t for it, t in zip(part, r.tokens)})
    return BlockReference(model.cfg, model.n_image_tokens, tokens, max_new_tokens)


def verify_teacher(job: VerifyJob, reference: BlockReference) -> dict:
    """Token agreement of the teacher's graphs (vision_prefill + block_denoise + block_commit, run by
    decode_loop.multistep_decode) with `multistep_generate`, per precision and batch."""
    from .decode_loop import TeacherDecode, multistep_decode

    cfg = reference.cfg
    run = _teacher_run(cfg)
    teacher = TeacherDecode(run.steps, run.rule, run.threshold, bool(cfg.shifted_prediction))
    settings = job.settings(cfg.lm, reference.max_new_tokens)
    out: dict = {}
    for (role, p, b) in sorted(job.files):
        if role != gio.BLOCK_DENOISE:
            continue
        chunks = job.chunks(cfg, b, reference.n_image_tokens)
        pre = _prefill_first(job.graph(gio.VISION_PREFILL, p, b), [c.feeds for c in chunks])
        denoise, commit = ort_runner(job.graph(gio.BLOCK_DENOISE, p, b)), ort_runner(job.graph(gio.BLOCK_COMMIT, p, b))
        got: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        for c in chunks:
            md = DecodeMode.of(FUSED, c.prompt_ids.shape[1], cfg.block_size)
            r = multistep_decode(md, pre, denoise, commit, c.prompt_ids, c.feeds, settings, teacher,
                                 position_offset=c.offset)
            got.update({it.id: t for it, t in zip(c.part, r.tokens)})
        agree, exact = _agreement([got[i] for i in job.ids], [reference.tokens[b][i] for i in job.ids])
        out[f"multistep.{p}.b{b}"] = {"role": "multistep", "precision": p, "batch": b, "n_images": len(job.items),
                                      "steps": run.steps, "rule": run.rule, "token_agreement": agree,
                                      "exact_match": exact, "identical": exact == 1.0,
                                      "decode_seconds": time.perf_counter() - t0}
        job.log(f"  multistep {p:>4} b{b} ({run.steps} steps, {run.rule}): agreement {100 * agree:6.2f}%  "
                f"exact {100 * exact:6.2f}%")
    return out


@dataclass
class ArReference:
    """The AR graphs' PyTorch reference (the same wrapper modules through the same loop) and, for
    information, `ar_generate`'s tokens, per batch size and image."""
    cfg: Any  # echo_train.model.config.EchoConfig of the AR model
    n_image_tokens: int
    tokens: dict[int, dict[str, list[int]]]  # batch -> image id -> token ids (the wrappers)
    ar_generate: dict[int, dict[str, list[int]]]  # batch -> image id -> token ids
    max_new_tokens: int


def ar_reference(model, tokenizer, items: list[VerifyItem], batch_sizes: list[int], capacity: int,
                 max_new_tokens: int) -> ArReference:
    """What `verify_ar` compares the AR graphs with, computed with the PyTorch model."""
    from echo_train.decoding import ar_generate

    from .graphs import make_graph

    prefix = np.array(tokenizer.prefix_ids(model.n_image_tokens), np.int64)
    mode = DecodeMode.of(AR, prefix.size, model.cfg.block_size)
    settings = LoopSettings.of(model.cfg.lm, capacity, tokenizer, max_new_tokens)
    t_pre, t_step = (torch_runner(make_graph(role, model, capacity, prefix.size, tokenizer.mask_id))
                     for role in GRAPHS[AR])
    tokens: dict = {}
    hf_tokens: dict = {}
    for b in batch_sizes:
        ref, hf = {}, {}
        for c in _prefill_chunks(items, b, prefix):
            r = decode(mode, t_pre, t_step, c.prompt_ids, c.feeds, settings)
            g = ar_generate(model, tokenizer, torch.from_numpy(c.feeds["pixel_values"]), max_new_tokens)
            for it, toks, gt in zip(c.part, r.tokens, g.tokens):
                ref[it.id], hf[it.id] = toks, gt
        tokens[b], hf_tokens[b] = ref, hf
    return ArReference(model.cfg, model.n_image_tokens, tokens, hf_tokens, max_new_tokens)


Pass = tuple[dict, np.ndarray, np.ndarray, np.ndarray]  # (feeds, tokens, rows still writing, confidence)


class _PassRecord:
    """Every block pass of one batch size, recorded as the base graph runs (fp32, or in a build
    with no fp32 graphs the PyTorch graph wrappers: graph_reference): its feeds, tokens,
    confidence and the rows still writing there. Each other precision's block step is re-run on
    exactly these inputs (per-pass agreement, no divergence carried over). Also the batch's first
    pass feeds, on which the block steps are timed."""

    def __init__(self, batch: int, block_size: int) -> None:
        self.batch, self.block_size = batch, block_size
        self.passes: list[Pass] = []
        self.first_feed: Optional[dict[str, np.ndarray]] = None
        self._feeds: list[dict] = []
        self._outputs: list[tuple[np.ndarray, np.ndarray]] = []

    def hook(self, record: bool) -> StepHook:
        """The loop's on_step: the first feed always, every feed where this run is the base (`record`)."""
        def on_step(feeds: dict[str, np.ndarray]) -> None:
            if self.first_feed is None:
                self.first_feed = {k: v.copy() for k, v in feeds.items()}
            if record:
                self._feeds.append({k: v.copy() for k, v in feeds.items()})
        return on_step

    def recording(self, step):
        """The base's block step runner, also keeping each pass's tokens and confidence outputs."""
        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            res = step(feeds)
            self._outputs.append((np.array(res[0], copy=True), np.array(res[1], copy=True)))
            return res
        return run

    def chunk_done(self, chunk: _Chunk, result: LoopResult) -> None:
        """File the chunk's passes with the rows still writing at each (through the EOS block)."""
        tail = BlockLayout(chunk.prompt_ids.shape[1], self.block_size).tail  # prompt ids opening the first block
        n = len(chunk.part)
        for k, f in enumerate(self._feeds):
            active = np.array([k * self.block_size - tail <= len(t) for t in result.tokens[:n]]
                              + [False] * (self.batch - n))
            self.passes.append((f, self._outputs[k][0], active, self._outputs[k][1]))
        self._feeds.clear()
        self._outputs.clear()


def graph_reference(model, tokenizer, items: list[VerifyItem], batch_sizes: list[int], capacity: int,
                    max_new_tokens: int) -> BlockReference:
    """The reference of a build with no fp32 graphs (from the checkpoint's dtype), from one decode
    of the PyTorch graph wrappers (fp32 arithmetic) per batch size: its tokens, and every pass's
    inputs and answers, on which each precision's block step is re-run for its per-pass agreement
    (as on the fp32 graph's passes otherwise). One decode where `block_reference` + the passes
    would take two: at 7B on a CPU each is minutes per image. The wrappers decode the tokens
    `fused_onestep_generate` does (the fp32 build holds its graphs, their export, to that)."""
    from .graphs import make_graph

    cfg, P = model.cfg, len(tokenizer.prefix_ids(model.n_image_tokens))
    pre, step = (torch_runner(make_graph(role, model, capacity, P, tokenizer.mask_id)) for role in GRAPHS[FUSED])
    settings = LoopSettings.of(cfg.lm, capacity, tokenizer, max_new_tokens)
    passes: dict[int, list[Pass]] = {}
    tokens: dict[int, dict[str, list[int]]] = {}
    for b in batch_sizes:
        record = _PassRecord(b, cfg.block_size)
        chunks = _chunks_of(items, cfg, tokenizer, b, model.n_image_tokens)
        tokens[b], _ = _decode_chunks(FUSED, pre, record.recording(step), chunks, settings, cfg.block_size,
                                      on_step=record.hook(True), after=record.chunk_done)
        passes[b] = record.passes
    return BlockReference(cfg, model.n_image_tokens, tokens, max_new_tokens, passes)


def verify_block(job: VerifyJob, reference: BlockReference) -> dict:
    """Token agreement of every (precision, batch) block variant with `fused_onestep_generate`
    (its tokens: `reference`, block_reference), finding F1, per-pass agreement with fp32, speed."""
    cfg = reference.cfg
    settings = job.settings(cfg.lm, reference.max_new_tokens)
    refs = {it.id: it.report for it in job.items if it.report}
    out: dict = {"variants": {}, "speed": {}}
    for b in job.batch_sizes:
        ref_texts = {i: job.tokenizer.decode(t) for i, t in reference.tokens[b].items()}
        fp32 = _PassRecord(b, cfg.block_size)
        chunks = job.chunks(cfg, b, reference.n_image_tokens)
        for p in job.precisions:
            weights = shared_weights_of(job.engine_dir, p)
            pre, step = _open_pair(job, FUSED, p, b, chunks, weights)
            t0 = time.perf_counter()
            got, passes = _decode_chunks(FUSED, pre, fp32.recording(step) if p == "fp32" else step, chunks, settings,
                                         cfg.block_size, on_step=fp32.hook(p == "fp32"), after=fp32.chunk_done)
            entry, change = _block_entry(job, p, b, got, reference.tokens[b], ref_texts, refs)
            entry.update({"decode_seconds": time.perf_counter() - t0, "passes": passes})
            base_passes = fp32.passes or (reference.passes or {}).get(b)  # fp32's, else PyTorch's own
            if p != "fp32" and base_passes:
                entry.update(_per_pass_entry(p, step, base_passes))
            out["variants"][f"block.{p}.b{b}"] = entry
            job.log(_block_line(entry, change))
            step = None
            if (gio.BLOCK_STEP_INPLACE, p, b) in job.files:  # the step the runtime takes on the CPU
                step = inplace_runner(job.graph(gio.BLOCK_STEP_INPLACE, p, b), job.capacity, weights=weights)
                out["variants"][f"block_inplace.{p}.b{b}"] = _block_inplace_entry(
                    job, p, b, pre, step, chunks, settings, cfg.block_size, reference.tokens[b], ref_texts, refs)
            pre = step = weights = None  # this precision's sessions go before the next one's open
        fp32.passes.clear()
        if fp32.first_feed is not None:
            out["speed"][f"block_step.b{b}.ms"] = _block_step_speed(job, b, fp32.first_feed)
    return out


def _block_inplace_entry(job: VerifyJob, p: str, b: int, pre, step, chunks: list[_Chunk], settings: LoopSettings,
                         block_size: int, ref_tokens: dict[str, list[int]], ref_texts: dict[str, str],
                         refs: dict[str, str]) -> dict:
    """The one-step loop over block_step_inplace (the runtime's choice on the CPU: `step`, an
    inplace_runner) against the reference."""
    t0 = time.perf_counter()
    got, passes = _decode_chunks(FUSED, pre, step, chunks, settings, block_size)
    entry, change = _block_entry(job, p, b, got, ref_tokens, ref_texts, refs)
    entry.update({"role": "block_inplace", "decode_seconds": time.perf_counter() - t0, "passes": passes})
    job.log(_block_line(entry, change).replace("  block ", "  block_inplace ", 1))
    return entry


def _block_entry(job: VerifyJob, p: str, b: int, got: dict[str, list[int]], ref_tokens: dict[str, list[int]],
                 ref_texts: dict[str, str], refs: dict[str, str]) -> tuple[dict, Optional[dict]]:
    """A block variant's verify.json entry (agreement, exact match, finding F1 and its change against
    the reference decoder's), and the paired F1 change with its interval (None without F1)."""
    agree, exact = _agreement([got[i] for i in job.ids], [ref_tokens[i] for i in job.ids])
    texts = {i: job.tokenizer.decode(t) for i, t in got.items()}
    f1, why = _f1(texts, refs)
    ref_f1, _ = _f1(ref_texts, refs)
    change = _f1_change(texts, ref_texts, refs) if f1 is not None and ref_f1 is not None else None
    entry = {
        "role": "block", "precision": p, "batch": b, "n_images": len(job.items),
        "token_agreement": agree, "exact_match": exact, "identical": exact == 1.0,
        "finding_f1": f1, "finding_f1_reference": ref_f1,
        "finding_f1_change": (None if f1 is None or ref_f1 is None else f1 - ref_f1),
        "finding_f1_change_ci95": change["ci95"] if change else None,
    }
    if why:
        entry["finding_f1_note"] = why
    return entry, change


def _per_pass_entry(p: str, step, fp32_passes: list) -> dict:
    """A variant's per-pass agreement with fp32 and whether it is within the registry's tolerance."""
    pp = _per_pass_agreement(step, fp32_passes)
    agreement = pp.pop("agreement")
    tol = precision_registry.get(p).tolerances.min_per_pass_agreement  # the registry's bar
    return {"per_pass_token_agreement": agreement, "per_pass_flips": pp, "min_per_pass_agreement": tol,
            "within_tolerance": agreement >= tol}


def _block_line(entry: dict, change: Optional[dict]) -> str:
    """The build log's line of one block variant."""
    p, b = entry["precision"], entry["batch"]
    per_pass, f1 = entry.get("per_pass_token_agreement"), entry["finding_f1"]
    flips = entry.get("per_pass_flips") or {}
    return (f"  block {p:>4} b{b}: agreement {100 * entry['token_agreement']:6.2f}%  "
            f"exact {100 * entry['exact_match']:6.2f}%  "
            + (f"per-pass {100 * per_pass:6.2f}%  " if per_pass is not None else "")
            + (f"(fp32 conf. {flips['fp32_confidence_median_at_flips']:.2f} at flips, "
               f"{flips['fp32_confidence_median_all']:.2f} overall)  " if flips.get("flips") else "")
            + f"F1 {'-' if f1 is None else f'{f1:.3f}'}"
            + (f" (change {100 * change['delta']:+.2f} [{100 * change['ci95'][0]:+.2f}, "
               f"{100 * change['ci95'][1]:+.2f}] points)" if change and change["ci95"] and p != "fp32" else "")
            + f" ({entry['decode_seconds']:.1f}s)"
            + ("" if entry.get("within_tolerance", True) else
               f"  BELOW the {p} tolerance (per-pass >= {100 * entry['min_per_pass_agreement']:.0f}%)"))


def _block_step_speed(job: VerifyJob, b: int, feeds: dict[str, np.ndarray]) -> dict:
    """Every precision's block_step timed on the same feeds, where their sessions fit side by side."""
    need, avail = _timing_memory(job.engine_dir, job.precisions), memory_available_bytes()
    if avail is not None and need > 0.7 * avail:
        why = (f"the {len(job.precisions)} block_step graphs side by side need about {need / 1e9:.1f} GB, "
               f"{avail / 1e9:.1f} GB available (echo-bench times each precision on its own)")
        job.log(f"  block_step b{b} speed not timed: {why}")
        return {"not_timed": why}
    speed = time_graphs({p: job.graph(gio.BLOCK_STEP, p, b) for p in job.precisions}, feeds)
    for p in [p for p in job.precisions if p != "fp32" and p in speed and "fp32" in speed]:
        speed[f"{p}_over_fp32"] = speed[p] / speed["fp32"]
    return speed


def verify_ar(job: VerifyJob, reference: ArReference) -> dict:
    """AR graphs against the same wrapper modules in PyTorch (its tokens: `reference`, ar_reference)
    and, for information, ar_generate."""
    settings = job.settings(reference.cfg.lm, reference.max_new_tokens)
    out: dict = {"variants": {}}
    for b in job.batch_sizes:
        ref, hf = reference.tokens[b], reference.ar_generate[b]
        info_agree, _ = _agreement([ref[i] for i in job.ids], [hf[i] for i in job.ids])
        chunks = _prefill_chunks(job.items, b, np.array(job.tokenizer.prefix_ids(reference.n_image_tokens), np.int64))
        for p in job.precisions:
            weights = shared_weights_of(job.engine_dir, p)
            pre, step = _open_pair(job, AR, p, b, chunks, weights)
            steps = {"ar": step}
            if (gio.AR_STEP_INPLACE, p, b) in job.files:  # the step the runtime takes on the CPU
                steps["ar_inplace"] = inplace_runner(job.graph(gio.AR_STEP_INPLACE, p, b), job.capacity, weights=weights)
            for name, step in steps.items():
                got, _ = _decode_chunks(AR, pre, step, chunks, settings, reference.cfg.block_size)
                agree, exact = _agreement([got[i] for i in job.ids], [ref[i] for i in job.ids])
                out["variants"][f"{name}.{p}.b{b}"] = {
                    "role": name, "precision": p, "batch": b, "n_images": len(job.items), "token_agreement": agree,
                    "exact_match": exact, "identical": exact == 1.0, "reference_vs_ar_generate": info_agree,
                }
                job.log(f"  {name:<10} {p:>7} b{b}: agreement {100 * agree:6.2f}%  exact {100 * exact:6.2f}%")
            pre = step = steps = weights = None
    return out
