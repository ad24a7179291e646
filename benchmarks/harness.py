"""The benchmark harness: every method on every engine, same studies, one process, one table.

For each cell (method x engine x block size) it decodes the studies one at a time (batch 1,
after warm-up, `repeats` timed passes), then times batched decoding for throughput, then
scores the batch-1 reports. Per engine it measures the ideal one-step speed-up
B x t(1)/t(2B) beside the achieved one. Cells that cannot run say "not available: why".
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from runtime.graph_io import AR_STEP, BLOCK_DENOISE
from runtime.multistep import MultistepOptions
from runtime.schedule import DEFAULT_UNMASK_RULE, UNMASK_THRESHOLD

from .engines import (DEFAULT_BLOCK, METHODS, Decoded, ModelCache, Paths, RuntimeCache, RuntimeRunner, TorchRunner, HFRunner,
                      Unavailable, engine_manifest, engine_manifest_info, select_engines, trt_unavailable_reason)
from .sysinfo import PeakMemory, machine_info
from .tables import NA, results_markdown

DEFAULT_METRICS = ("finding_f1", "bleu", "rouge", "semscore", "validity")


@dataclass
class BenchConfig:
    data: str = "data/synth"
    split: str = "test"
    n: int = 100
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    # the teacher's steps sweep: "teacher@k" cells for each k below B (k = B is the "teacher" row)
    # on the sweep engines; the speed/quality curve the one-step student is judged against
    teacher_steps: list[int] = field(default_factory=list)
    sweep_engines: list[str] = field(default_factory=lambda: ["ort-fp32"])
    engines: str = "all"
    block_sizes: list[int] = field(default_factory=lambda: [DEFAULT_BLOCK])
    paths: Paths = field(default_factory=Paths)
    device: str = "cpu"  # where the PyTorch and HF engines run: cpu or cuda
    bf16: bool = False  # bf16 autocast for the PyTorch / HF engines on CUDA
    repeats: int = 1  # timed passes over the studies at batch 1 (latency = per-report median)
    # onnxruntime / TensorRT cells take a second or two per pass on the demo: more passes there
    # make their speed ratios steady on a busy machine at little cost (None: same as repeats)
    runtime_repeats: Optional[int] = 5
    warmup: int = 2  # untimed reports before each cell
    threads: Optional[int] = 2  # torch intra-op threads and onnxruntime intra_op_num_threads
    throughput_batch: int = 8
    throughput_n: int = 32  # reports decoded for the batched throughput (rounded to whole batches)
    max_new_tokens: Optional[int] = None  # default: the AR checkpoint's max_response_tokens
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    n_boot: int = 200
    seed: int = 0
    ideal_repeats: int = 30
    out: str = "benchmarks/out/latest"
    log: Callable[[str], None] = field(default=lambda s: print(s, flush=True), repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("log", None)
        return d


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _all_cores_for_torch():
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_timings(runs: list[Decoded]) -> Decoded:
    """One report decoded several times: the first run's tokens with each runtime timing's median."""
    first = runs[0]
    med = {}
    for name in ("session_s", "decode_s", "prefill_s", "prefill_session_s"):
        vals = [getattr(r, name) for r in runs]
        if all(v is not None for v in vals):
            med[name] = statistics.median(vals)
    return replace(first, **med)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _read_cfg(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def split_method(method: str) -> tuple[str, Optional[int]]:
    """'teacher@4' -> ('teacher', 4): the teacher at 4 denoising passes per block; 'dcd' -> ('dcd', None)."""
    base, at, steps = method.partition("@")
    if base not in METHODS or (at and (base != "teacher" or not steps.isdigit() or int(steps) < 1)):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} or teacher@<steps>")
    return base, (int(steps) if at else None)


def cell_steps(method: str, B: Optional[int]) -> Optional[int]:
    """Denoising passes per block of a cell: the teacher's steps (B by default), 1 for the one-step
    methods, None for AR (no blocks)."""
    base, steps = split_method(method)
    if base == "ar":
        return None
    return (steps or B) if base == "teacher" else 1


def _engine_kind(engine: str) -> tuple[str, str]:
    """('pytorch'|'ort'|'trt'|'hf', device-or-precision)."""
    kind, _, rest = engine.partition("-")
    return kind, rest


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


class Harness:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.log = cfg.log
        self.models = ModelCache()
        self.runtimes = RuntimeCache(cfg.threads)
        self.engines = select_engines(cfg.engines, cfg.device)
        self.trt_reason = trt_unavailable_reason() if any(e.startswith("trt") for e in self.engines) else None
        self.max_new = cfg.max_new_tokens or int(_read_cfg(Path(cfg.paths.ar_ckpt)).get("max_response_tokens")
                                                 or _read_cfg(Path(cfg.paths.dcd_ckpt)).get("max_response_tokens") or 128)

    # -- cells ------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, str, Optional[int]]]:
        cells = []
        for engine in self.engines:
            for method in self.cfg.methods:
                base, steps = split_method(method)
                for B in ([None] if base == "ar" else self.cfg.block_sizes):
                    if steps is None or steps <= B:
                        cells.append((method, engine, B))
            cells += [c for c in self._sweep_cells(engine) if c not in cells]
        return cells

    def _sweep_cells(self, engine: str) -> list[tuple[str, str, int]]:
        """The steps sweep on one engine: teacher@k for k < B, and the B-step "teacher" row."""
        if engine not in self.cfg.sweep_engines or not self.cfg.teacher_steps:
            return []
        out = []
        for B in self.cfg.block_sizes:
            for k in sorted(set(self.cfg.teacher_steps)):
                if k < 1:
                    raise ValueError(f"--teacher-steps must be >= 1, got {k}")
                if k < B:
                    out.append((f"teacher@{k}", engine, B))
            out.append(("teacher", engine, B))  # k = B: the teacher's own default
        return out

    def _torch_device(self, engine: str) -> str:
        dev = _engine_kind(engine)[1]
        if dev == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise Unavailable("no CUDA GPU visible to torch")
        return dev

    def sources(self, method: str, engine: str, B: Optional[int]) -> dict:
        """Which checkpoint / engine folder a cell uses (for the record and for the runner)."""
        p = self.cfg.paths
        kind = _engine_kind(engine)[0]
        method = split_method(method)[0]
        src: dict[str, Any] = {}
        if kind in ("pytorch", "hf"):
            src["checkpoint"] = str({"ar": Path(p.ar_ckpt), "teacher": Paths.for_block(p.teacher_ckpt, B),
                                     "naive": Paths.for_block(p.teacher_ckpt, B), "dcd": Paths.for_block(p.dcd_ckpt, B)}[method])
        else:
            if method == "ar":
                src["engine_dir"] = str(self._ar_engine_dir())
            elif method in ("naive", "teacher"):
                src["engine_dir"] = str(Paths.for_block(p.naive_engine_dir, B))
            elif method == "dcd":
                src["engine_dir"] = str(Paths.for_block(p.engine_dir, B))
        return src

    def _ar_engine_dir(self) -> Path:
        """AR graphs ride in the one-step engine folder (echo-export build --ar-ckpt)."""
        cands = [Paths.for_block(self.cfg.paths.engine_dir, B) for B in self.cfg.block_sizes]
        cands.append(Path(self.cfg.paths.engine_dir))
        for d in cands:
            m = engine_manifest(d)
            if m is not None and m.graphs.get(AR_STEP):
                return d
        return cands[0]

    def make_runner(self, method: str, engine: str, B: Optional[int], batch: int):
        kind, sub = _engine_kind(engine)
        p = self.cfg.paths
        method, steps = split_method(method)  # steps: the sweep's teacher@k, else None (the teacher: B)
        if kind in ("pytorch", "hf"):
            dev = self._torch_device(engine)
            if kind == "hf":
                if method != "ar":
                    raise Unavailable("transformers generate() decodes autoregressively only (the AR baseline)")
                model, tok = self.models.get(Path(p.ar_ckpt), dev, ("ar",))
                return HFRunner(model, tok, self.max_new, dev, self.cfg.bf16)
            if method == "ar":
                model, tok = self.models.get(Path(p.ar_ckpt), dev, ("ar",))
                return TorchRunner(model, tok, "ar", DEFAULT_BLOCK, None, self.max_new, dev, self.cfg.bf16)
            ck = Paths.for_block(p.dcd_ckpt if method == "dcd" else p.teacher_ckpt, B)
            stages = ("dcd",) if method == "dcd" else ("rad", "dcd")
            model, tok = self.models.get(ck, dev, stages, B)
            mode, steps = {"teacher": ("multistep", steps or B), "naive": ("onestep", None),
                           "dcd": ("onestep", None)}[method]
            return TorchRunner(model, tok, mode, B, steps, self.max_new, dev, self.cfg.bf16)
        # runtime engines
        if kind == "trt" and self.trt_reason:
            raise Unavailable(self.trt_reason)
        backend = "trt" if kind == "trt" else "ort"
        if method == "ar":
            d, mode = self._ar_engine_dir(), "ar"
        elif method in ("naive", "teacher"):  # the teacher's engine: its fused one-step and multi-step graphs
            d, mode = Paths.for_block(p.naive_engine_dir, B), ("fused" if method == "naive" else "multistep")
            if not d.exists():
                raise Unavailable(f"{d} missing (build it: echo-export build --ckpt {Paths.for_block(p.teacher_ckpt, B)} "
                                  f"--out {d})")
        else:
            d, mode = Paths.for_block(p.engine_dir, B), "fused"
        rt = self.runtimes.get(d, backend, sub, batch, mode)
        if mode == "multistep" and not (rt.manifest.graphs.get(BLOCK_DENOISE) or {}).get(f"{sub}.b{batch}"):
            raise Unavailable(f"{d} has no {sub} block_denoise graph at batch {batch} (built before the teacher "
                              "graphs existed, or at int8, which the teacher graphs are not built at)")
        if mode != "ar" and rt.block_size != B:
            raise Unavailable(f"{d} has block size {rt.block_size}, not {B}")
        # the rule the PyTorch rows use (the engine's own default differs for imported checkpoints)
        opts = MultistepOptions(steps=steps or B, rule=DEFAULT_UNMASK_RULE) if mode == "multistep" else None
        return RuntimeRunner(rt, mode, self.max_new, opts)

    def repeats_for(self, engine: str) -> int:
        rr = self.cfg.runtime_repeats
        return max(1, rr if (rr is not None and _engine_kind(engine)[0] in ("ort", "trt")) else self.cfg.repeats)

    def run_cell(self, method: str, engine: str, B: Optional[int], studies) -> dict:
        cfg = self.cfg
        cell: dict[str, Any] = {"method": method, "engine": engine, "block_size": B, "steps": cell_steps(method, B),
                                **self.sources(method, engine, B)}
        cuda = engine.endswith("cuda")
        paths = [s.image_paths[0] for s in studies]
        t_cell = time.perf_counter()
        try:
            with PeakMemory(cuda=cuda and self._cuda_ok()) as mem:
                runner = self.make_runner(method, engine, B, 1)
                for w in range(cfg.warmup):
                    runner.decode([paths[w % len(paths)]])
                lat: list[list[float]] = [[] for _ in paths]
                runs: list[list[Decoded]] = [[] for _ in paths]
                for rep in range(self.repeats_for(engine)):
                    for i, path in enumerate(paths):
                        t = time.perf_counter()
                        d = runner.decode([path])[0]
                        lat[i].append(time.perf_counter() - t)
                        runs[i].append(d)
                decoded = [median_timings(r) for r in runs]
                cell["throughput"] = self.throughput(method, engine, B, paths)
        except Unavailable as e:
            cell["status"] = NA + str(e)
            self.log(f"[bench] {method:9s} B={B or '-':<2} {engine:12s} {cell['status']}")
            return cell
        except Exception as e:  # noqa: BLE001 - one broken engine must not sink the whole table
            import traceback

            cell["status"] = f"failed: {type(e).__name__}: {e}"
            cell["traceback"] = traceback.format_exc(limit=8)
            self.log(f"[bench] {method:9s} B={B or '-':<2} {engine:12s} {cell['status']}")
            return cell
        per = [statistics.median(x) for x in lat]
        gen = [d.n_generated for d in decoded]
        passes = [d.passes for d in decoded]
        cell.update({
            "status": "ok",
            "n_reports": len(paths),
            "max_new_tokens": self.max_new,
            "latency_ms": {"p50": 1e3 * _pct(per, 50), "p95": 1e3 * _pct(per, 95), "mean": 1e3 * float(np.mean(per))},
            "tokens_per_s": sum(gen) / sum(per),
            "tokens_per_report": float(np.mean(gen)),
            "forward_passes_per_report": float(np.mean(passes)),
            "tokens_per_forward": sum(gen) / max(1, sum(passes)),
            "eos_rate": float(np.mean([d.eos for d in decoded])),
            "peak_rss_mb": mem.rss_mb,
            "peak_rss_scope": mem.rss_scope,
            "cuda_max_allocated_mb": mem.cuda_mb,
            "preds": {s.id: d.text for s, d in zip(studies, decoded)},
            "pred_tokens": {s.id: d.tokens for s, d in zip(studies, decoded)},  # engines are compared on tokens
            "wall_s": time.perf_counter() - t_cell,
        })
        cell.update(runtime_figures(decoded, per, gen))
        tp = cell["throughput"]
        tp_s = f"{tp['reports_per_s']:.1f} rep/s @{tp['batch']}" if "reports_per_s" in tp else tp.get("status", "")
        self.log(f"[bench] {method:9s} B={B or '-':<2} {engine:12s} p50 {cell['latency_ms']['p50']:8.1f} ms  "
                 f"{cell['tokens_per_s']:8.1f} tok/s  {cell['forward_passes_per_report']:6.1f} fwd/report  {tp_s}  "
                 f"({cell['wall_s']:.0f} s)")
        return cell

    def _cuda_ok(self) -> bool:
        try:
            import torch

            return torch.cuda.is_available()
        except ImportError:
            return False

    def throughput(self, method: str, engine: str, B: Optional[int], paths: list[str]) -> dict:
        bs = self.cfg.throughput_batch
        if bs <= 1:
            return {"status": "not measured: --throughput-batch 1"}
        try:
            runner = self.make_runner(method, engine, B, bs)
        except Unavailable as e:
            return {"batch": bs, "status": NA + str(e)}
        n = max(bs, (min(self.cfg.throughput_n, len(paths)) // bs) * bs)
        items = [paths[i % len(paths)] for i in range(n)]
        runner.decode(items[:bs])  # warm-up
        t = time.perf_counter()
        gen = 0
        for i in range(0, n, bs):
            gen += sum(d.n_generated for d in runner.decode(items[i : i + bs]))
        dt = time.perf_counter() - t
        return {"batch": bs, "n_reports": n, "seconds": dt, "reports_per_s": n / dt, "tokens_per_s": gen / dt}

    # -- ideal speed-up ---------------------------------------------------------------
    def ideal(self, engine: str, image: Optional[str]) -> dict:
        from .ideal import ideal_speedups, ort_pass_times, torch_pass_times

        kind, sub = _engine_kind(engine)
        Bs = self.cfg.block_sizes
        counts = [1] + [2 * B for B in Bs]
        try:
            if kind == "pytorch":
                dev = self._torch_device(engine)
                p = self.cfg.paths
                for ck, st in [(Paths.for_block(p.dcd_ckpt, Bs[0]), None), (Paths.for_block(p.teacher_ckpt, Bs[0]), None),
                               (Path(p.ar_ckpt), None)]:
                    try:
                        model, tok = self.models.get(ck, dev)
                        break
                    except Unavailable:
                        continue
                else:
                    raise Unavailable("no checkpoint found to time")
                r = torch_pass_times(model, tok, counts, image, dev, self.cfg.ideal_repeats, self.cfg.bf16)
                r["model"] = str(ck)
            elif kind == "ort":
                times: dict[int, float] = {}
                used = {}
                for B in Bs:
                    d = Paths.for_block(self.cfg.paths.engine_dir, B)
                    if not (d / "manifest.json").is_file():
                        continue
                    rr = ort_pass_times(d, sub, [1, 2 * B], image, self.cfg.threads, max(self.cfg.ideal_repeats, 30))
                    for T, v in rr["t"].items():
                        times.setdefault(T, v)
                        used.setdefault(str(T), str(d))
                if not times:
                    raise Unavailable(f"{self.cfg.paths.engine_dir} missing")
                r = {"t": times, "graphs_from": used, "timer": "session.run_with_iobinding (medians of alternating back-to-back runs)"}
            elif kind == "trt":
                raise Unavailable(self.trt_reason or "per-pass TensorRT timings are not measured by the harness")
            else:
                return {"engine": engine, "status": "not applicable: transformers generate() has no one-step path"}
        except Unavailable as e:
            return {"engine": engine, "status": NA + str(e)}
        except Exception as e:  # a timing failure must not sink the run
            return {"engine": engine, "status": f"failed: {type(e).__name__}: {e}"}
        ideal = ideal_speedups(r["t"], Bs)
        return {"engine": engine, "status": "ok", "t_ms": {str(k): 1e3 * v for k, v in r["t"].items()},
                "ideal": {str(k): v for k, v in ideal.items()},
                **{k: v for k, v in r.items() if k not in ("t",)}}

    # -- quality ----------------------------------------------------------------------
    def score(self, cells: list[dict], refs: dict[str, str]) -> None:
        """evaluate_reports on every cell; SemScore through one embedding cache for the whole run.

        SemScore is the mean cosine of all-mpnet-base-v2 mean-pooled embeddings (as
        echo_train.metrics computes it); embedding each distinct text once instead of once per
        cell is what keeps it affordable on a CPU. Identical prediction sets are scored once.
        """
        with _all_cores_for_torch():  # scoring is not timed: the embedding model may use every core
            self._score(cells, refs)

    def _score(self, cells: list[dict], refs: dict[str, str]) -> None:
        from echo_train.metrics.report import EvalConfig, evaluate_reports

        cache: dict[tuple, dict] = {}
        ecfg = EvalConfig(n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        others = [m for m in self.cfg.metrics if m != "semscore"]
        sem = SemScorer(self.cfg.n_boot, self.cfg.seed) if "semscore" in self.cfg.metrics else None
        for c in cells:
            if c.get("status") != "ok":
                continue
            key = tuple(sorted(c["preds"].items()))
            if key not in cache:
                t = time.perf_counter()
                res = evaluate_reports(c["preds"], refs, metrics=others, config=ecfg)
                q = quality_summary(res, self.cfg.metrics)
                if sem is not None:
                    ids = res.ids
                    value, ci, reason = sem.score([c["preds"][i] for i in ids], [refs[i] for i in ids])
                    q["semscore"] = value if reason is None else f"not computed: {reason}"
                    if ci:
                        q["ci95"]["semscore"] = ci
                    if reason is None:
                        q["semscore_model"] = "sentence-transformers/all-mpnet-base-v2 (sha256 verified)"
                cache[key] = q
                self.log(f"[bench] scored {c['method']} B={c['block_size'] or '-'} {c['engine']} "
                         f"({time.perf_counter() - t:.1f} s)")
            c["quality"] = cache[key]

    # -- the run ----------------------------------------------------------------------
    def run(self) -> dict:
        from echo_train.stages.common import load_split

        cfg = self.cfg
        _seed_everything(cfg.seed)
        threads = self._set_threads()
        t0 = time.perf_counter()
        studies = load_split(cfg.data, cfg.split, cfg.n)
        refs = {s.id: s.report for s in studies}
        self.log(f"[bench] {len(studies)} {cfg.split} studies from {cfg.data}; engines: {', '.join(self.engines)}; "
                 f"methods: {', '.join(cfg.methods)}; block sizes: {cfg.block_sizes}; max {self.max_new} new tokens")
        cells = [self.run_cell(m, e, B, studies) for m, e, B in self.plan()]
        add_speedups(cells)
        image = studies[0].image_paths[0]
        ideal = [self.ideal(e, image) for e in self.engines]
        attach_achieved(ideal, cells)
        self.score(cells, refs)
        attach_f1_vs_ar(cells, refs, self.cfg.n_boot, self.cfg.seed)
        result = {
            "schema": 1,
            "command": " ".join(sys.argv),
            "config": cfg.to_dict(),
            # how the teacher rows decode (PyTorch reference decoder defaults; steps = B, the sweep's teacher@k: k)
            "teacher_decoding": {"rule": DEFAULT_UNMASK_RULE, "threshold": UNMASK_THRESHOLD,
                                 "sweep_steps": sorted(set(cfg.teacher_steps)), "sweep_engines": cfg.sweep_engines},
            "machine": machine_info(),
            "threads": threads,
            "studies": {"data": cfg.data, "split": cfg.split, "n": len(studies), "ids": [s.id for s in studies]},
            "engine_folders": {str(d): engine_manifest_info(d) for d in self._engine_dirs() if engine_manifest_info(d)},
            "cells": cells,
            "ideal_speedup": ideal,
            "runtime_overhead": runtime_overhead(cells, cfg.block_sizes[0]),
            "wall_s": time.perf_counter() - t0,
        }
        return result

    def _engine_dirs(self) -> list[Path]:
        p = self.cfg.paths
        return [Paths.for_block(b, B) for b in (p.engine_dir, p.naive_engine_dir) for B in self.cfg.block_sizes]

    def _set_threads(self) -> dict:
        out: dict[str, Any] = {"requested": self.cfg.threads}
        try:
            import torch

            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            out["torch_intra_op"] = torch.get_num_threads()
            out["torch_inter_op"] = torch.get_num_interop_threads()
        except ImportError:
            pass
        out["ort_intra_op"] = self.cfg.threads or "onnxruntime default"
        out["ort_inter_op"] = 1 if self.cfg.threads else "onnxruntime default"
        return out


def runtime_figures(decoded: list[Decoded], per: list[float], gen: list[int]) -> dict:
    """What only the runtime's engines time: the share of time outside session.run, the session time
    per decode pass, and the decode phase without the prefill. {} for engines that time nothing."""
    cell: dict[str, Any] = {}
    if decoded[0].session_s is not None:
        sess = sum(d.session_s for d in decoded)
        dec = sum(d.decode_s for d in decoded)
        cell["runtime_time"] = {
            "session_s": sess, "decode_s": dec, "report_s": sum(per),
            "outside_session_of_decode": (dec - sess) / dec if dec else None,
            "outside_session_of_report": (sum(per) - sess) / sum(per) if sum(per) else None,
        }
        n_dec = sum(d.decode_passes or 0 for d in decoded)
        if n_dec and all(d.prefill_session_s is not None for d in decoded):
            # one decode pass inside the real loop: the check on the isolated t(1) / t(2B)
            cell["runtime_time"]["session_ms_per_decode_pass"] = \
                1e3 * (sess - sum(d.prefill_session_s for d in decoded)) / n_dec
    if decoded[0].prefill_s is not None:
        # the decode phase alone (after prefill): what B x t(1)/t(2B) predicts, and the paper's
        # "tokens/s without prefill"; the prefill is a fixed cost both decoders pay once per report
        after = sum(d.decode_s - d.prefill_s for d in decoded)
        cell["decode_tokens_per_s"] = sum(gen) / after if after > 0 else None
        cell["prefill_ms_mean"] = 1e3 * float(np.mean([d.prefill_s for d in decoded]))
    return cell


# ----------------------------------------------------------------------------- derived figures
QUALITY_KEYS = {  # column -> (metric, score key)
    "finding_f1": ("finding_f1", "finding_micro_f1"),
    "finding_macro_f1": ("finding_f1", "finding_macro_f1"),
    "semscore": ("semscore", "semscore"),
    "bleu4": ("bleu", "bleu4"),
    "rougeL": ("rouge", "rougeL"),
    "valid_sentence_rate": ("validity", "valid_sentence_rate"),
    "valid_report_rate": ("validity", "valid_report_rate"),
}


class SemScorer:
    """SemScore with an embedding cache keyed by text; "not computed: reason" when mpnet is missing."""

    def __init__(self, n_boot: int, seed: int) -> None:
        self.n_boot, self.seed = n_boot, seed
        self.reason: Optional[str] = None
        self.embedder = None
        self.vectors: dict[str, np.ndarray] = {}
        try:
            from echo_train.metrics.semscore import ModelUnavailable, get_embedder, resolve_mpnet

            try:
                self.embedder = get_embedder(str(resolve_mpnet(None)), "mean", None)
            except ModelUnavailable as e:
                self.reason = str(e)
        except ImportError as e:
            self.reason = f"echo_train.metrics.semscore not importable ({e})"

    def score(self, preds: list[str], refs: list[str]) -> tuple[Optional[float], Optional[list[float]], Optional[str]]:
        if self.embedder is None:
            return None, None, self.reason
        todo = list(dict.fromkeys(t for t in preds + refs if t not in self.vectors))
        if todo:
            for t, v in zip(todo, self.embedder.encode(todo)):
                self.vectors[t] = v
        a = np.stack([self.vectors[t] for t in preds])
        b = np.stack([self.vectors[t] for t in refs])
        per = (a * b).sum(-1)
        from echo_train.metrics.bootstrap import bootstrap_ci  # the resamples of every other metric's CI

        cis = bootstrap_ci(lambda idx: {"semscore": float(per[idx].mean())}, len(per), self.n_boot, self.seed)
        return float(per.mean()), (list(cis["semscore"]) if cis else None), None


def quality_summary(res, requested: list[str]) -> dict:
    """Headline numbers (or "not computed: reason") of one EvalResult, plus their CIs."""
    out: dict[str, Any] = {}
    ci: dict[str, list[float]] = {}
    for col, (metric, key) in QUALITY_KEYS.items():
        m = res.metrics.get(metric)
        if metric == "semscore" and metric in requested:
            continue  # filled by SemScorer
        if m is None:
            out[col] = "not computed: not requested (--metrics)" if metric not in requested else "not computed"
        elif not m.computed:
            out[col] = m.status
        else:
            out[col] = m.scores.get(key)
            if key in m.ci:
                ci[col] = [float(m.ci[key][0]), float(m.ci[key][1])]
    out["ci95"] = ci
    return out


def add_speedups(cells: list[dict]) -> None:
    """Speed-up over AR on the same engine (tokens/s ratio, and per-report latency ratio)."""
    ar = {c["engine"]: c for c in cells if c["method"] == "ar" and c.get("status") == "ok"}
    hf = next((c for c in cells if c["engine"].startswith("hf") and c.get("status") == "ok"), None)
    for c in cells:
        if c.get("status") != "ok":
            continue
        a = ar.get(c["engine"])
        if a:
            c["speedup_vs_ar"] = c["tokens_per_s"] / a["tokens_per_s"]
            if c.get("decode_tokens_per_s") and a.get("decode_tokens_per_s"):
                c["decode_speedup_vs_ar"] = c["decode_tokens_per_s"] / a["decode_tokens_per_s"]
            c["latency_ratio_vs_ar"] = a["latency_ms"]["mean"] / c["latency_ms"]["mean"]
        else:
            c["speedup_vs_ar"] = None
        if hf:
            c["speedup_vs_hf_generate"] = c["tokens_per_s"] / hf["tokens_per_s"]


def attach_achieved(ideal: list[dict], cells: list[dict]) -> None:
    """Beside each engine's ideal ratio, the DCD cell's achieved tokens/s ratio over AR: per report
    (prefill included) and for the decode phase alone (the part the ideal ratio models)."""
    for row in ideal:
        ach, ach_dec = {}, {}
        for c in cells:
            if c["engine"] == row["engine"] and c["method"] == "dcd" and c.get("speedup_vs_ar"):
                ach[str(c["block_size"])] = c["speedup_vs_ar"]
                if c.get("decode_speedup_vs_ar"):
                    ach_dec[str(c["block_size"])] = c["decode_speedup_vs_ar"]
        row["achieved_dcd_vs_ar"] = ach
        row["achieved_dcd_vs_ar_decode_only"] = ach_dec
        # the same passes timed inside the decode loops (session time per pass after prefill)
        in_loop = {}
        for c in cells:
            ms = (c.get("runtime_time") or {}).get("session_ms_per_decode_pass")
            if c["engine"] == row["engine"] and ms and c["method"] in ("ar", "dcd"):
                in_loop["1" if c["method"] == "ar" else str(2 * c["block_size"])] = ms
        if in_loop:
            row["in_loop_t_ms"] = in_loop


def attach_f1_vs_ar(cells: list[dict], refs: dict[str, str], n_boot: int, seed: int) -> None:
    """Finding F1 of every non-AR cell minus AR's on the same studies, with a paired bootstrap CI.

    Against the AR cell of the same engine (else PyTorch AR: same weights, same greedy tokens up
    to float noise). On 60 studies each F1 alone has a CI about 12 points wide; the paired
    difference is what says whether a method is within a point of AR.
    """
    from echo_train.metrics.finding_f1 import paired_micro_f1_difference

    ok = [c for c in cells if c.get("status") == "ok" and c.get("preds")]
    ars = {c["engine"]: c for c in ok if c["method"] == "ar"}
    for c in ok:
        ar = ars.get(c["engine"]) or ars.get("pytorch-cpu") or next(iter(ars.values()), None)
        if c["method"] == "ar" or ar is None:
            continue
        d = paired_micro_f1_difference(c["preds"], ar["preds"], refs, n_boot, seed)
        c["finding_f1_vs_ar"] = {**d, "ar_engine": ar["engine"]}


def runtime_overhead(cells: list[dict], block_size: int) -> dict:
    """Batch 1, DCD on ORT fp32: the share of decode time spent outside session.run."""
    for c in cells:
        if c["method"] == "dcd" and c["engine"] == "ort-fp32" and c["block_size"] == block_size and c.get("runtime_time"):
            rt = c["runtime_time"]
            return {"cell": f"dcd B={block_size} ort-fp32 batch 1", **rt}
    return {"status": NA + "no DCD ort-fp32 cell ran"}


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    from .plot import plot_quality_vs_latency, plot_teacher_steps

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "quality_vs_latency.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=_json_default))
    paths["md"].write_text(results_markdown(result))
    plot_quality_vs_latency(result, paths["png"])
    if (result.get("teacher_decoding") or {}).get("sweep_steps"):  # the steps sweep's own plot, beside the others
        paths["sweep_png"] = plot_teacher_steps(result, out / "teacher_steps.png")
    return paths


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def run_benchmark(cfg: BenchConfig) -> tuple[dict, dict[str, Path]]:
    result = Harness(cfg).run()
    return result, write_outputs(result, cfg.out)
