"""The engines a server runs: N EchoRuntime instances of one engine folder, loaded, verified and
warmed up before the server says it is ready, each decoding one batch at a time.

A batch of requests (image bytes) becomes one EchoRuntime.generate call at a batch size the
engine was built for: the smallest built size that holds them all (the runtime pads the rest by
repeating an image), or the largest one, in as many passes as it takes (the runtime splits).
Every request gets exactly one Result, in order; an unreadable image gets its error and
does not stop the others. Imports `runtime` only (no torch, no Triton): tested on its own.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from runtime.engine import BlockEvent, EchoRuntime, Report
from runtime.multistep import MultistepOptions
from runtime.errors import EchoRuntimeError, ImageReadError
from runtime.preprocess import decode_image_bytes
from runtime.report_formats import FORMATS, EngineInfo, ReportFormatError, SourceStudy, render


@dataclass
class Item:
    """One image to report on, as it came over the wire."""

    data: bytes
    name: str = "image"
    fmt: str = ""  # "" (none) or one of runtime.report_formats.FORMATS
    # the multi-step teacher (a teacher's engine): steps per block and the unmask rule; both unset:
    # one-step decoding
    steps: Optional[int] = None
    rule: str = ""

    def teacher(self, block_size: int, layout: str) -> Optional[MultistepOptions]:
        """The request's multi-step settings, checked against the engine (EchoRuntimeError), or None."""
        if self.steps is None and not self.rule:
            return None
        return MultistepOptions(self.steps, self.rule or None).resolved(block_size, layout)


@dataclass
class Result:
    report: Report
    document: bytes = b""  # the report in Item.fmt
    graph_batch: int = 0  # the engine batch size it was decoded at (0: never decoded)
    batch_items: int = 0  # how many images that generate() call decoded together
    instance: int = -1


@dataclass
class _Instance:
    runtime: EchoRuntime
    lock: threading.Lock = field(default_factory=threading.Lock)


def graph_batch_for(n: int, built: Sequence[int]) -> int:
    """The built batch size n images run at: the smallest that holds them, else the largest."""
    if not built:
        raise EchoRuntimeError("the engine folder has no block-step graphs")
    fits = [b for b in sorted(built) if b >= n]
    return fits[0] if fits else max(built)


class EnginePool:
    """N runtimes of one engine folder. Constructing it loads every graph of every built batch
    size (hashes checked against manifest.json) and decodes a warm-up image at each: when it
    returns, the engines are ready."""

    def __init__(self, engine_dir: str | Path, precision: str = "fp32", instances: int = 1,
                 threads: Optional[int] = None, backend: str = "ort", allow_unverified: bool = False,
                 max_new_tokens: Optional[int] = None) -> None:
        if instances < 1:
            raise EchoRuntimeError(f"instances must be >= 1, got {instances}")
        self.engine_dir = Path(engine_dir)
        t0 = time.perf_counter()
        self.instances = [_Instance(EchoRuntime(engine_dir, backend=backend, precision=precision, batch_size=None,
                                                threads=threads)) for _ in range(instances)]
        rt = self.instances[0].runtime
        if not rt.manifest.verified and not allow_unverified:
            raise EchoRuntimeError(f"{engine_dir}: the manifest says verified=false (the build's token agreement with "
                                   "the PyTorch reference failed or was skipped); --allow-unverified serves it anyway")
        self.built = sorted(rt.built_batch_sizes())
        self.image_size, self.preprocess_mode = rt.image_size, rt.preprocess_mode
        self.prepare = rt.prepare_decoded  # every instance reads one manifest: one preparation
        self.block_size = rt.block_size
        self.decode_layout = (rt.manifest.model_config or {}).get("decode_layout", "echo")
        self.max_new_tokens = max_new_tokens
        self.engine = EngineInfo.of_engine_dir(engine_dir, precision)
        self._next = 0
        self._next_lock = threading.Lock()
        self.warmup()
        self.load_seconds = time.perf_counter() - t0

    @property
    def max_batch(self) -> int:
        return max(self.built)

    def warmup(self) -> None:
        """Load and run every built batch size on every instance (a flat grey image, one block)."""
        img = np.zeros((1, self.image_size, self.image_size), np.float32)
        for inst in self.instances:
            with inst.lock:
                for b in self.built:
                    inst.runtime.batch_size = b
                    rep = inst.runtime.generate([img] * b, max_new_tokens=inst.runtime.block_size)
                    if any(r.error for r in rep):
                        raise EchoRuntimeError(f"{self.engine_dir}: warm-up at batch {b} failed: {rep[0].error}")

    def _pick(self, instance: Optional[int]) -> tuple[int, _Instance]:
        if instance is None:
            with self._next_lock:
                instance, self._next = self._next, (self._next + 1) % len(self.instances)
        i = instance % len(self.instances)
        return i, self.instances[i]

    def _decode_group(self, items: Sequence[Item], group: list[tuple[int, np.ndarray]],
                      teacher: Optional[MultistepOptions], results: list, instance: Optional[int], on_block) -> None:
        """Decode the items of one setting (one-step, or one multi-step setting) together."""
        good = [k for k, _ in group]
        mode = "fused" if teacher is None else "multistep"
        idx, inst = self._pick(instance)
        cb = None if on_block is None else (lambda ev: on_block(good[ev.index], ev))
        with inst.lock:
            try:
                b = graph_batch_for(len(good), inst.runtime.built_batch_sizes(mode) or self.built)
                inst.runtime.batch_size = b
                reports = inst.runtime.generate([a for _, a in group], max_new_tokens=self.max_new_tokens,
                                                on_block=cb, mode=mode, multistep=teacher)
            except EchoRuntimeError as e:  # e.g. steps asked of a student's engine (no teacher graphs)
                reports, b = [Report(path=items[k].name, error=f"{items[k].name}: {e}") for k in good], 0
        for k, r in zip(good, reports):
            r.path = items[k].name
            results[k] = Result(r, graph_batch=b, batch_items=len(good), instance=idx)

    def decode(self, items: Sequence[Item], instance: Optional[int] = None,
               on_block: Optional[Callable[[int, BlockEvent], None]] = None) -> list[Result]:
        """One Result per item, in order. on_block(item index, event) streams each block."""
        results: list[Optional[Result]] = [None] * len(items)
        groups: dict[Optional[MultistepOptions], list[tuple[int, np.ndarray]]] = {}  # one decode per setting
        rt_prepare = self.prepare
        for k, it in enumerate(items):
            t = time.perf_counter()
            if it.fmt and it.fmt not in FORMATS:
                results[k] = Result(Report(path=it.name, error=f"{it.name}: unknown report format {it.fmt!r}; "
                                                               f"choose from {list(FORMATS)}"))
                continue
            try:
                teacher = it.teacher(self.block_size, self.decode_layout)
                # the fixed grid's pixels, or the decoded image itself for a native-resolution engine
                groups.setdefault(teacher, []).append((k, rt_prepare(decode_image_bytes(it.data, it.name), it.name)))
            except ImageReadError as e:
                results[k] = Result(Report(path=it.name, error=str(e), timings={"preprocess": time.perf_counter() - t}))
            except EchoRuntimeError as e:  # steps or rule out of bounds
                results[k] = Result(Report(path=it.name, error=f"{it.name}: {e}"))
        for teacher, group in groups.items():
            self._decode_group(items, group, teacher, results, instance, on_block)
        for it, res in zip(items, results):
            if it.fmt and res.report.error is None:
                try:
                    res.document = render(it.fmt, res.report, SourceStudy.from_bytes(it.data), self.engine)
                except ReportFormatError as e:
                    res.report.error = f"{it.name}: {e}"
        return results  # type: ignore[return-value]
