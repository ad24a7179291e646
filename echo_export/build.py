"""`echo-export build`: checkpoint -> verified engine folder with a manifest written last.

Phases: check inputs (nothing is written before all pass) -> export fp32 -> reference (the
PyTorch decodes: verification tokens and int8 calibration feeds) -> fp16 -> int8 (calibrated
on real training images) -> optional TensorRT plans -> verify against the PyTorch reference
-> manifest. Memory: one PyTorch model at a time, and none after the reference phase. The
student is exported and decoded, then let go; the AR model is loaded again (the input checks
loaded it once and let it go), exported and decoded, then let go. Calibration feeds (each
with its KV cache) wait on disk, so the fp16, int8 and verify phases hold only ONNX graphs
and onnxruntime sessions (with --trt the student stays for the TensorRT comparison). The folder
is built as a hidden sibling and renamed into place at the end, so an interrupted build never
leaves a folder the runtime accepts.

`build` reads top to bottom as those phases, each over a typed state: _Request (the options
parsed) -> _Checked (the inputs checked, the student loaded) -> _Build (what the phases in the
hidden folder share and write; a precision's converter takes it) -> _Outcome (the manifest's part).

Checkpoint stages: `dcd` (the one-step student) is what block_step is for. `rad` (the
multi-step teacher) is accepted with a warning: its one-step decoding is the naive
baseline, useful for ablations, not for serving. `ar` is refused as --ckpt (it has no
block-diffusion training) and required as --ar-ckpt.

manifest.graphs layout: graphs[role][f"{precision}.b{batch}"] = filename, for every role
built, e.g. graphs["block_step"]["int8.b8"] = "block_step.int8.b8.onnx". TensorRT plans
(when built) sit under graphs[role][f"trt-{precision}.b{batch}"].
"""
from __future__ import annotations

import gc
import importlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from runtime import graph_io as gio
from runtime import precisions as precision_registry
from runtime.cpu_features import (INT8_AUTO, INT8_MODE_FOR_KIND, INT8_MODES, CpuFeatures, detect_cpu_features,
                                  int8_mode_target)
from runtime.decode_mode import AR, FUSED, GRAPHS, DecodeMode
from runtime.errors import ImageReadError
from runtime.manifest import Manifest, write_manifest
from runtime.preprocess import preprocess_image
from runtime.schedule import BlockLayout

from .external_weights import file_size_text
from .phase_meter import PhaseMeter

if TYPE_CHECKING:  # the build imports torch and the converters only when a phase needs them
    from echo_train.model.config import EchoConfig
    from echo_train.model.echo_model import EchoModel
    from runtime.text import ReportTokenizer

    from .external_weights import WeightsFile
    from .memory_plan import MemoryPlan
    from .precision import FeedStore
    from .stream_export import DeferredWeights
    from .verify import ArReference, BlockReference

DEFAULT_DATA = Path("data/synth")


class BuildError(Exception):
    """The build cannot proceed (bad input) or its result failed verification."""


@dataclass
class BuildOptions:
    ckpt: Path
    out: Path
    precisions: list[str] = field(default_factory=lambda: list(precision_registry.NAMES))
    ar_ckpt: Optional[Path] = None
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    capacity: Optional[int] = None  # KV cache slots; None: what the prefix and max_response_tokens need
    calib_size: int = 32
    verify_n: int = 50
    data: Optional[Path] = None
    # verification images from another dataset (its test split, else val); default: --data's.
    # Lets a large fresh test set check the F1 change while int8 calibrates on the training images.
    verify_data: Optional[Path] = None
    trt: bool = False
    force: bool = False
    opset: int = 18
    max_new_tokens: Optional[int] = None  # verification length; default: the model's max_response_tokens
    # int8 quantisation mode (runtime/cpu_features.py INT8_MODES); "auto" picks it for this CPU
    int8_mode: str = "auto"
    # int8: quantise only weight matrices at least this large; below it the quantize/dequantize
    # pair around a MatMul costs more than int8 arithmetic saves on onnxruntime CPU
    int8_min_weight: int = 0
    # int8: keep the MLP down projections fp32 (see echo_export/precision.py)
    int8_down_proj_fp32: bool = True
    timing_cache: Optional[Path] = None
    # every graph of one precision reads its weights from one weights.<precision>.bin, each tensor
    # once (echo_export/external_weights.py); tensors under this many bytes stay inside the graphs
    weights_min_bytes: int = 1024
    # where to write the build's phases (seconds, peak RSS), file sizes and weight bytes as JSON
    summary_json: Optional[Path] = None
    # per-precision converter options, e.g. {"int4": {"block_size": "64"}} (--precision-opt int4.block_size=64);
    # each converter checks its own and names the ones it knows
    precision_options: dict[str, dict[str, str]] = field(default_factory=dict)
    # every graph's TensorRT form against the ONNX-TensorRT operator matrix (echo_export/trt_ops.py):
    # "fail" the build on a node TensorRT would refuse, or "warn" (recorded: tensorrt_ready false)
    tensorrt_check: str = "fail"
    # the AR step (ar_inplace) and the batch-1 one-step pass (block_inplace) also in the in-place form
    # for onnxruntime's CPU (echo_export/inplace_steps.py: one GroupQueryAttention per layer over caches
    # updated in place); the runtime takes them on the CPU
    ar_inplace: bool = True
    block_inplace: bool = True
    # its fp32 form's argmax screened by an 8-bit copy of the lm_head, fp32 logits for the rows that
    # can still win (echo_export/screened_argmax.py): the same tokens, a fraction of the head's bytes
    screened_argmax: bool = True


@dataclass
class _Sample:
    id: str
    path: str
    report: Optional[str]


def parse_precisions(text: str | list[str]) -> list[str]:
    """Registry names in registry order; fp32 too (the verified base every other variant derives
    from), except where every precision asked converts from the checkpoint's own dtype (fp16,
    int4): that build streams from the stored weights and makes no fp32 graphs."""
    try:
        names = precision_registry.parse_list(text)
    except precision_registry.UnknownPrecision as e:
        raise BuildError(str(e)) from None
    return [p for p in names if p != "fp32"] if _streams_list(text) else names


def _streams(opts: BuildOptions) -> bool:
    """Whether the build exports in the checkpoint's dtype, keeping no fp32 graphs: when every
    precision asked is one the registry can convert from it (fp32 asked is fp32 built; int8's
    calibration runs the fp32 graphs)."""
    return _streams_list(opts.precisions)


def _streams_list(text: str | list[str]) -> bool:
    items = {p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()}
    return bool(items) and items <= set(precision_registry.stored_dtype_names())


def _stored_dtype(ckpt: Path):
    from echo_train.model.checkpoint import checkpoint_dtype

    return checkpoint_dtype(ckpt)


def _plan_memory(opts: BuildOptions, precisions: list[str], stream: bool, log: Callable[[str], None]):
    """The memory estimate, before the model loads: refuse (BuildError) with it and what would fit
    when the heavy phases cannot fit MemAvailable; else the plan (which sessions verify can open)."""
    from . import memory_plan

    try:
        plan = memory_plan.plan_build(Path(opts.ckpt), precisions, stream, verify=opts.verify_n > 0)
    except Exception as e:  # an unreadable header is the load's refusal to make, with its message
        log(f"  memory estimate skipped ({type(e).__name__}: {e})")
        return None
    log(f"  memory estimate: {plan.n_params / 1e9:.2f}B parameters stored {plan.stored_dtype}"
        + (" (exported in that dtype: no fp32 weights)" if stream else " (loaded as fp32)"))
    for line in plan.lines():
        log(line)
    why = memory_plan.refusal(plan, precisions, stream)
    if why is not None:
        raise BuildError(f"not enough memory: {why}")
    for p, reason in plan.not_verified.items():
        log(f"  {p} will not be verified: {reason}")
    return plan


def parse_precision_options(items: list[str]) -> dict[str, dict[str, str]]:
    """['int4.block_size=64', ...] -> {'int4': {'block_size': '64'}}; the precision must be in the registry."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        prec, dot, name = key.strip().partition(".")
        if not (eq and dot and name):
            raise BuildError(f"--precision-opt {item!r}: expected PRECISION.OPTION=VALUE, e.g. int4.block_size=64")
        try:
            precision_registry.get(prec)
        except precision_registry.UnknownPrecision as e:
            raise BuildError(f"--precision-opt {item!r}: {e}") from None
        out.setdefault(prec, {})[name.strip()] = value.strip()
    return out


def _converter(precision: str) -> Optional[Callable]:
    """The registry's converter of a precision (imported by its "module:function" name), or None (fp32)."""
    spec = precision_registry.get(precision).converter
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_precision_options(options: dict[str, dict[str, str]], precisions: list[str]) -> None:
    """Converter options are checked before any work (a 7B export takes minutes): each precision's
    converter module may offer `check_options(dict)`, raising PrecisionError."""
    from .precision import PrecisionError

    for precision, opts in options.items():
        if precision not in precisions:
            raise BuildError(f"--precision-opt {precision}.*: {precision} is not built (--precision {','.join(precisions)})")
        spec = precision_registry.get(precision).converter
        check = getattr(importlib.import_module(spec.partition(":")[0]), "check_options", None) if spec else None
        try:
            if check is not None:
                check(opts)
        except PrecisionError as e:
            raise BuildError(f"--precision-opt: {e}") from None


def _needs_calibration(precisions: list[str]) -> list[str]:
    return [p for p in precisions if precision_registry.get(p).needs_calibration]


def parse_batch_sizes(text: str | list[int]) -> list[int]:
    try:
        items = [int(x) for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
    except ValueError:
        raise BuildError(f"batch sizes must be positive integers, got {text!r}") from None
    if not items or any(b < 1 for b in items):
        raise BuildError(f"batch sizes must be positive integers, got {text!r}")
    return sorted(set(items))


def required_capacity(prefix_len: int, block_size: int, max_new: int, ar: Optional[tuple[int, int]] = None,
                      teacher: bool = False) -> int:
    """KV slots the graphs need for reports of up to `max_new` tokens (DecodeMode.slots_needed): fused
    one-step decoding stores the prefix's first P - B tokens at prefill, then one block per pass,
    and never the last block's; the multi-step teacher (`teacher`) also commits the prompt's last
    whole block (one block more); AR (prefix length, max new tokens) stores every token but the last."""
    fused = DecodeMode.of(FUSED, prefix_len, block_size).slots_needed(max_new) + (block_size if teacher else 0)
    need = max(prefix_len, fused)
    if ar is not None:
        need = max(need, DecodeMode.of(AR, ar[0], block_size).slots_needed(ar[1]))
    return need


def resolve_int8_mode(requested: str, cpu: Optional[CpuFeatures] = None) -> dict:
    """The int8 mode to build ("auto": the one for this CPU) and what goes in manifest/verify.json."""
    cpu = cpu or detect_cpu_features()
    if requested != INT8_AUTO and requested not in INT8_MODES:
        raise BuildError(f"unknown --int8-mode {requested!r}; choose from {INT8_AUTO}, {', '.join(INT8_MODES)}")
    mode = INT8_MODE_FOR_KIND[cpu.int8_kind] if requested == INT8_AUTO else requested
    return {"mode": mode, "requested": requested, "chosen_for": int8_mode_target(mode), "build_cpu": cpu.to_dict()}


# ------------------------------------------------------------------ input checks


def _load_model(path: Path, what: str, dtype=None):
    """`dtype`: the parameters' (None: fp32; a streaming build passes the checkpoint's own, and its
    parameters are then views of the mapped file: evictable page cache, not the process's own)."""
    from echo_train.model.checkpoint import CheckpointError, check_checkpoint_dir, load_checkpoint
    from echo_train.model.config import EchoConfig

    try:
        check_checkpoint_dir(path)
        cfg = EchoConfig.load(path / "config.json")
    except CheckpointError as e:
        raise BuildError(f"{what}: {e}") from None
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise BuildError(f"{what}: {path / 'config.json'} is not an ECHO config ({e})") from None
    try:
        model, tok = load_checkpoint(path, dtype=dtype, mapped=dtype is not None)
    except Exception as e:  # safetensors / shape mismatches
        raise BuildError(f"{what}: {path} does not load ({type(e).__name__}: {e})") from None
    return cfg, model, tok


def _split_samples(data: Path, split: str, n: int, strict: bool, option: str = "--data") -> list[_Sample]:
    from echo_train.data.loaders import load_studies

    try:
        res = load_studies(data, split=split, check_images=True)
    except (FileNotFoundError, ValueError) as e:
        raise BuildError(f"{option} {data}: {e}") from None
    bad = [p for p in res.problems if p.reason not in ("empty report", "study lists no images")]
    if strict and bad:
        lines = "\n  ".join(f"{p.id}: {p.reason}" for p in bad[:10])
        raise BuildError(f"{option} {data}: the {split} split has {len(bad)} unreadable images:\n  {lines}")
    out = [_Sample(s.id, s.image_paths[0], s.report) for s in res.studies if s.image_paths]
    return out[:n]


def _pixels(samples: list[_Sample], cfg, what: str) -> list:
    """Images prepared as the model's config says, as the runtime will: at the fixed grid
    (vision.preprocess), or each at its own grid (vision.native: runtime/native_image.NativeImage)."""
    from runtime.native_image import VisionGridSpec, native_image_from_path

    v = cfg.vision
    spec = VisionGridSpec.from_config(cfg.to_dict()["vision"]) if v.native else None
    out = []
    for s in samples:
        try:
            out.append(native_image_from_path(s.path, spec) if spec else preprocess_image(s.path, v.image_size,
                                                                                         v.preprocess))
        except ImageReadError as e:
            raise BuildError(f"{what}: {e}") from None
    return out


def _native_capacity(cfg, tok, max_new: int, log: Callable[[str], None], teacher: bool = False) -> tuple[int, int]:
    """(the longest prompt, the KV slots it and max_new tokens need) of a native-resolution model: an
    image takes at most max_pixels / (patch x merge)^2 tokens."""
    from runtime.native_image import VisionGridSpec

    spec = VisionGridSpec.from_config(cfg.to_dict()["vision"])
    most = spec.max_pixels // spec.factor ** 2
    P = len(tok.prefix_ids(most))
    log(f"  native resolution: up to {spec.max_pixels} pixels -> {most} image tokens, a {P}-token prompt")
    return P, required_capacity(P, cfg.block_size, max_new, teacher=teacher)


def _check_native(cfg, precisions: list[str], batch_sizes: list[int], ar_load) -> None:
    """What a native-resolution build cannot do yet, refused before anything is written."""
    if batch_sizes != [1]:
        raise BuildError(f"--batch-sizes {','.join(map(str, batch_sizes))}: a native-resolution model decodes one "
                         "image at a time (each image has its own prompt length); build with --batch-sizes 1")
    if "int8" in precisions:
        raise BuildError("int8 of a native-resolution model is not built yet (its calibration feeds have per-image "
                         "shapes); build fp32 / fp16")
    if ar_load is not None:
        raise BuildError("--ar-ckpt with a native-resolution model is not built yet; build the AR baseline apart")


# ------------------------------------------------------------------ helpers


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "transformers": transformers.__version__}


# ------------------------------------------------------------------ the build, phase by phase


def build(opts: BuildOptions, log: Callable[[str], None] = print) -> Path:
    """Build and verify an engine folder; returns its path. Raises BuildError on bad input or failure."""
    from echo_train.model.checkpoint import swap_into_place

    t_all = time.perf_counter()
    meter = PhaseMeter()
    request = _parse_request(opts)
    checked = _check_inputs(request, meter, log)  # nothing is written before every check passes
    tmp, outcome = _build_hidden(checked, meter, log)
    _refuse_unreproduced(outcome, tmp, request.out)
    write_manifest(tmp, _manifest(checked, outcome), outcome.files)  # last: a folder without one is refused
    swap_into_place(tmp, request.out)
    _summarise(checked, outcome, meter, time.perf_counter() - t_all, log)
    return request.out


@dataclass
class _Request:
    """The options, parsed and checked before anything is loaded."""
    opts: BuildOptions
    out: Path
    precisions: list[str]
    batch_sizes: list[int]
    # exported in the checkpoint's dtype: the fp32 graphs are staged (the converters' source only,
    # their weights never written) and removed before the manifest
    stream: bool


def _parse_request(opts: BuildOptions) -> _Request:
    out = Path(opts.out)
    precisions = parse_precisions(opts.precisions)
    stream = _streams(opts)
    batch_sizes = parse_batch_sizes(opts.batch_sizes)
    _check_precision_options(opts.precision_options, precisions)
    if out.exists() and not opts.force:
        raise BuildError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} exists and is not a folder")
    if opts.calib_size < 1 and _needs_calibration(precisions):
        raise BuildError(f"--calib-size must be at least 1 for {', '.join(_needs_calibration(precisions))}")
    if opts.verify_n < 0:
        raise BuildError("--verify-n must be >= 0")
    return _Request(opts, out, precisions, batch_sizes, stream)


@dataclass
class _Family:
    """One decode family the build exports: a decode mode's graphs (runtime/decode_mode.py) of one model."""
    mode: str  # FUSED: the student's block graphs; AR: the baseline's
    cfg: EchoConfig
    prefix_len: int
    max_new: int
    ckpt: Optional[Path] = None  # the AR model is loaded again from it for its export and decodes
    inplace: bool = False  # also its step's in-place form for onnxruntime's CPU (graph_io.CPU_ONLY_ROLES)

    @property
    def prefill_role(self) -> str:
        return GRAPHS[self.mode][0]

    @property
    def step_role(self) -> str:
        return GRAPHS[self.mode][1]

    @property
    def roles(self) -> tuple[str, ...]:
        """Its graphs: a multi-step teacher (stage rad) also gets its denoise and commit passes."""
        teacher = gio.MULTISTEP_ROLES if self.mode == FUSED and self.cfg.stage == "rad" else ()
        # a teacher's multi-step passes read the one-step decoder's stacked cache: it keeps block_step
        inplace = tuple(r for r, std in gio.CPU_ONLY_ROLES.items() if std == self.step_role) \
            if self.inplace and not teacher else ()
        return GRAPHS[self.mode] + teacher + inplace

    def graphs(self, batch_sizes: list[int]) -> list[tuple[str, int]]:
        """(role, batch) of every graph it exports: the one-step pass's in-place form at batch 1 only
        (onnxruntime's GroupQueryAttention takes several new tokens with a past for one row at a time)."""
        return [(r, bs) for r in self.roles for bs in batch_sizes if not (r == gio.BLOCK_STEP_INPLACE and bs > 1)]


@dataclass
class _ArCheck:
    """The AR checkpoint as the input checks saw it (its model loaded once and let go)."""
    cfg: EchoConfig
    tok: ReportTokenizer
    n_image_tokens: int


@dataclass
class _Checked:
    """What the input checks established, nothing written yet: the student (loaded; the build takes
    it over), the AR family, the KV capacity (in opts) and the images."""
    request: _Request
    opts: BuildOptions  # capacity resolved
    plan: Optional[MemoryPlan]
    cfg: EchoConfig
    model: Optional[EchoModel]
    tok: ReportTokenizer
    prefix_len: int
    max_new: int
    ar: Optional[_Family]
    int8_info: dict
    calib_px: list[np.ndarray]
    verify_samples: list[_Sample]
    verify_px: list  # [1, S, S] arrays, or NativeImages at native resolution


def _check_inputs(request: _Request, meter: PhaseMeter, log: Callable[[str], None]) -> _Checked:
    meter.start("check")
    opts = request.opts
    ar_seen = _check_ar_checkpoint(opts, request.stream, log)
    log(f"[check] checkpoint {opts.ckpt}")
    plan = _plan_memory(opts, request.precisions, request.stream, log)
    cfg, model, tok = _load_student(opts, request.stream, log)
    P = len(tok.prefix_ids(model.n_image_tokens))
    try:
        BlockLayout(P, cfg.block_size)
    except ValueError as e:
        raise BuildError(f"--ckpt: {e}") from None
    opts, max_new, ar_need = _resolve_capacity(request, cfg, tok, P, ar_seen, log)
    ar = _ar_family(opts, ar_seen, tok, ar_need)
    data = Path(opts.data) if opts.data else (DEFAULT_DATA if DEFAULT_DATA.exists() else None)
    int8_info = _int8_info(opts, request.precisions, log)
    calib_px = _calibration_images(data, opts, request.precisions, cfg, log)
    verify_samples = _verification_samples(data, opts)
    verify_px = _pixels(verify_samples, cfg, "verification image")
    meter.stop()
    return _Checked(request=request, opts=opts, plan=plan, cfg=cfg, model=model, tok=tok, prefix_len=P,
                    max_new=max_new, ar=ar, int8_info=int8_info, calib_px=calib_px, verify_samples=verify_samples,
                    verify_px=verify_px)


def _check_ar_checkpoint(opts: BuildOptions, stream: bool, log: Callable[[str], None]) -> Optional[_ArCheck]:
    """The AR model first, let go once it has loaded: the checks hold one model at a time (it is
    loaded again for its export, after the student's export and decodes)."""
    if opts.ar_ckpt is None:
        return None
    log(f"[check] AR checkpoint {opts.ar_ckpt}")
    acfg, amodel, atok = _load_model(Path(opts.ar_ckpt), "--ar-ckpt",
                                     **({"dtype": _stored_dtype(opts.ar_ckpt)} if stream else {}))
    seen = _ArCheck(acfg, atok, amodel.n_image_tokens)
    amodel = None
    gc.collect()
    return seen


def _load_student(opts: BuildOptions, stream: bool,
                  log: Callable[[str], None]) -> tuple[EchoConfig, EchoModel, ReportTokenizer]:
    """The --ckpt model (in its stored dtype when streaming): a one-step student, or a teacher with a warning."""
    cfg, model, tok = _load_model(Path(opts.ckpt), "--ckpt", **({"dtype": _stored_dtype(opts.ckpt)} if stream else {}))
    if cfg.stage == "ar":
        raise BuildError(f"--ckpt {opts.ckpt} is a stage-1 autoregressive checkpoint (stage 'ar'); block_step needs a "
                         "one-step student (stage 'dcd'). Pass it as --ar-ckpt for the AR baseline graphs.")
    if cfg.stage == "rad":
        warnings.warn("--ckpt is a multi-step RAD teacher (stage 'rad'): its one-step block_step is the naive "
                      "one-step baseline, not a distilled student", stacklevel=4)
        log("  warning: stage 'rad' checkpoint: one-step decoding of the teacher is the naive baseline")
    elif cfg.stage != "dcd":
        raise BuildError(f"--ckpt: unknown stage {cfg.stage!r} (expected 'dcd')")
    return cfg, model, tok


def _resolve_capacity(request: _Request, cfg: EchoConfig, tok: ReportTokenizer, P: int, ar_seen: Optional[_ArCheck],
                      log: Callable[[str], None]) -> tuple[BuildOptions, int, Optional[tuple[int, int]]]:
    """(opts with the KV capacity the reports need, the student's max new tokens, the AR family's
    (prefix length, max new tokens)); BuildError where --capacity is too small."""
    opts = request.opts
    want_new = opts.max_new_tokens or cfg.max_response_tokens
    ar_need = (len(ar_seen.tok.prefix_ids(ar_seen.n_image_tokens)), opts.max_new_tokens or ar_seen.cfg.max_response_tokens) \
        if ar_seen is not None else None
    need = required_capacity(P, cfg.block_size, want_new, ar_need, teacher=cfg.stage == "rad")
    if cfg.vision.native:
        _check_native(cfg, request.precisions, request.batch_sizes, ar_seen)
        _, need = _native_capacity(cfg, tok, want_new, log, teacher=cfg.stage == "rad")
    if opts.capacity is None:
        opts = replace(opts, capacity=need)
        log(f"  capacity {need} KV slots: prefix {P} + {want_new} new tokens"
            + (f"; AR prefix {ar_need[0]} + {ar_need[1]}" if ar_need else ""))
    elif opts.capacity < need:
        raise BuildError(f"--capacity {opts.capacity} cannot hold these reports: the prefix takes {P} slots and the "
                         f"model writes up to {want_new} new tokens"
                         + (f" (the AR model {ar_need[1]} after its {ar_need[0]}-token prefix)" if ar_need else "")
                         + f"; pass --capacity {need} or more (or leave it out: it follows the model), or "
                         "--max-new-tokens N for shorter reports")
    return opts, want_new, ar_need


def _ar_family(opts: BuildOptions, ar_seen: Optional[_ArCheck], tok: ReportTokenizer,
               ar_need: Optional[tuple[int, int]]) -> Optional[_Family]:
    if ar_seen is None:
        return None
    if ar_seen.cfg.stage != "ar":
        raise BuildError(f"--ar-ckpt {opts.ar_ckpt} has stage {ar_seen.cfg.stage!r}; the AR graphs need a stage-1 'ar' "
                         "checkpoint")
    if ar_seen.tok.tok.to_str() != tok.tok.to_str():
        raise BuildError("--ar-ckpt uses a different tokenizer than --ckpt; both must share tokenizer.json")
    return _Family(AR, ar_seen.cfg, *ar_need, ckpt=Path(opts.ar_ckpt), inplace=opts.ar_inplace)


def _int8_info(opts: BuildOptions, precisions: list[str], log: Callable[[str], None]) -> dict:
    if not any(precision_registry.get(p).follows_int8_mode for p in precisions):
        return {}
    info = resolve_int8_mode(opts.int8_mode)
    log(f"  int8: mode {info['mode']} for a CPU kind {info['chosen_for']} "
        f"(requested {opts.int8_mode}; this CPU: {info['build_cpu']['int8_kind']})")
    return info


def _calibration_images(data: Optional[Path], opts: BuildOptions, precisions: list[str], cfg: EchoConfig,
                        log: Callable[[str], None]) -> list[np.ndarray]:
    """The training images the calibrated precisions (int8, int4 AWQ) record their feeds on."""
    if not _needs_calibration(precisions):
        return []
    if data is None:
        raise BuildError(f"{', '.join(_needs_calibration(precisions))} needs calibration images: pass --data "
                         "(a dataset with a train split)")
    calib = _split_samples(data, "train", opts.calib_size, strict=True)
    if not calib:
        raise BuildError(f"--data {data}: no training images for int8 calibration")
    calib_px = _pixels(calib, cfg, "calibration image")
    log(f"  calibration: {len(calib_px)} training images")
    return calib_px


def _verification_samples(data: Optional[Path], opts: BuildOptions) -> list[_Sample]:
    """Held-out images (the test split, else val) of --verify-data, else --data."""
    if opts.verify_n == 0:
        return []
    vdata = Path(opts.verify_data) if opts.verify_data else data
    if vdata is None:
        raise BuildError("verification needs held-out images: pass --data, or --verify-n 0 to skip (unverified)")
    option = "--verify-data" if opts.verify_data else "--data"
    samples = _split_samples(vdata, "test", opts.verify_n, strict=False, option=option) or \
        _split_samples(vdata, "val", opts.verify_n, strict=False, option=option)
    if not samples:
        raise BuildError(f"{option} {vdata}: no test or val images for verification")
    return samples


@dataclass
class _Outcome:
    """What the phases in the hidden folder produced, for the manifest."""
    files: list[str]  # every file the manifest lists
    graphs: dict[str, dict[str, str]]  # manifest.graphs
    verify_report: Optional[dict]
    verified: bool
    precision_info: dict[str, dict]


def _build_hidden(checked: _Checked, meter: PhaseMeter, log: Callable[[str], None]) -> tuple[Path, _Outcome]:
    """Every phase after the checks, into a hidden sibling of the output folder; on any failure the
    sibling is removed and the failure named by its phase (BuildError)."""
    out = checked.request.out
    tmp = out.with_name(f".{out.name}.building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        return tmp, _build_into(_Build.take_over(tmp, checked, meter, log), checked)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (BuildError, KeyboardInterrupt, SystemExit)) or not isinstance(e, Exception):
            raise
        # a converter, the exporter or onnxruntime failing (protobuf limits, memory, an unsupported
        # op): one message naming the phase, and nothing written
        raise BuildError(f"the {meter.current or 'build'} phase failed ({type(e).__name__}: {e}); "
                         f"nothing was written to {out}") from e


def _refuse_unreproduced(outcome: _Outcome, tmp: Path, out: Path) -> None:
    """fp32 graphs that do not reproduce the reference: the folder is kept as <out>.failed, no manifest."""
    if outcome.verify_report is None or outcome.verify_report["fp32_identical"] is not False:  # None: no fp32 built
        return
    failed = out.with_name(out.name + ".failed")
    if failed.exists():
        shutil.rmtree(failed)
    tmp.rename(failed)
    raise BuildError(f"fp32 graphs do not reproduce the PyTorch reference tokens; no manifest written. "
                     f"Details: {failed / 'verify.json'}")


def _manifest(checked: _Checked, outcome: _Outcome) -> Manifest:
    cfg, tok = checked.cfg, checked.tok
    model_config = cfg.to_dict()
    if checked.ar is not None:
        model_config["ar_model_config"] = checked.ar.cfg.to_dict()
        model_config["ar_prefix_len"] = checked.ar.prefix_len
    return Manifest(
        model_config=model_config, block_size=cfg.block_size, capacity=checked.opts.capacity,
        batch_sizes=checked.request.batch_sizes, vocab_size=cfg.lm.vocab_size, prefix_len=checked.prefix_len,
        image_size=cfg.vision.image_size, eos_id=tok.eos_id, mask_id=tok.mask_id, pad_id=tok.pad_id,
        precisions=checked.request.precisions, graphs=outcome.graphs, versions=_versions(), opset=checked.opts.opset,
        exporter="torch.onnx.export(dynamo=True)", verified=bool(outcome.verified), int8=checked.int8_info,
        precision_info=outcome.precision_info,
    )


def _summarise(checked: _Checked, outcome: _Outcome, meter: PhaseMeter, total: float,
               log: Callable[[str], None]) -> None:
    """The phases' seconds and memory, the files, and (--summary-json) the same as JSON."""
    out, opts, files = checked.request.out, checked.opts, outcome.files
    log("[summary]")
    for line in meter.lines(total):
        log(line)
    if opts.summary_json:
        weights = {f: (out / f).stat().st_size for f in files if f.startswith("weights.")}
        summary = {"engine_dir": str(out), "verified": bool(outcome.verified), "total_s": round(total, 2),
                   "process_peak_rss_bytes": meter.peak_bytes(), "phases": meter.to_dict(),
                   "folder_bytes": sum((out / f).stat().st_size for f in files),
                   "weights_bytes": weights, "precisions": checked.request.precisions,
                   "batch_sizes": checked.request.batch_sizes, "capacity": opts.capacity,
                   "prefix_len": checked.prefix_len}
        Path(opts.summary_json).write_text(json.dumps(summary, indent=2))
    for f in sorted(files):
        log(f"  {f:<40} {file_size_text(out / f)}")
    log(f"engine folder: {out} ({'verified' if outcome.verified else 'NOT verified'})")


@dataclass
class _Build:
    """What every build phase reads, and the files they have written so far."""
    tmp: Path
    opts: BuildOptions
    cfg: EchoConfig
    model: Optional[EchoModel]  # let go after the reference phase (kept with --trt for the plan comparison)
    tok: ReportTokenizer
    prefix_len: int
    precisions: list[str]
    batch_sizes: list[int]
    ar: Optional[_Family]
    max_new: int
    int8_info: dict
    meter: PhaseMeter
    log: Callable[[str], None]
    stream: bool = False  # see _Request.stream
    plan: Optional[MemoryPlan] = None  # None: no estimate
    files: dict[tuple[str, str, int], str] = field(default_factory=dict)  # (role, precision, batch) -> file
    plans: dict[str, str] = field(default_factory=dict)  # ONNX file -> TensorRT plan
    data_files: list[str] = field(default_factory=list)  # external weights, one per precision
    stores: dict[str, WeightsFile] = field(default_factory=dict)  # precision -> its weights.<precision>.bin
    # the PyTorch decodes' results, kept for the phases that run without the models
    block_ref: Optional[BlockReference] = None
    teacher_ref: Optional[BlockReference] = None  # the multi-step teacher's (stage rad)
    ar_ref: Optional[ArReference] = None
    calib: dict[tuple[str, int], FeedStore] = field(default_factory=dict)  # (role, batch) -> recorded feeds
    # what each precision's converter chose (int4: block size, method, accuracy_level, ...): manifest, verify.json
    precision_info: dict[str, dict] = field(default_factory=dict)
    staged: set[tuple[str, str, int]] = field(default_factory=set)  # keys of files that are staged fp32 graphs
    deferred: Optional[DeferredWeights] = None  # the staged graphs' weights, read lazily from the checkpoint
    # int4 AWQ's activation rows from the PyTorch decodes (a staged graph cannot run): one
    # {weight key: rows} per decode phase
    int4_rows: list[dict] = field(default_factory=list)

    @staticmethod
    def take_over(tmp: Path, checked: _Checked, meter: PhaseMeter, log: Callable[[str], None]) -> "_Build":
        """The build's state in `tmp`, holding the student from here on (`checked` lets go of it, so
        a phase can free it)."""
        model, checked.model = checked.model, None
        r = checked.request
        return _Build(tmp=tmp, opts=checked.opts, cfg=checked.cfg, model=model, tok=checked.tok,
                      prefix_len=checked.prefix_len, precisions=r.precisions, batch_sizes=r.batch_sizes,
                      ar=checked.ar, max_new=checked.max_new, int8_info=checked.int8_info, meter=meter, log=log,
                      stream=r.stream, plan=checked.plan)

    def store(self, precision: str):
        """The precision's weights.<precision>.bin, open for appending for the whole build."""
        from .external_weights import WeightsFile, weights_filename

        if precision not in self.stores:
            self.stores[precision] = WeightsFile(self.tmp, weights_filename(precision))
            self.data_files.append(self.stores[precision].name)
        return self.stores[precision]

    def add_graph(self, key: tuple[str, str, int], name: str) -> None:
        """Record a new graph and move any weights it still holds itself (a converter's own data file)
        into its precision's weights.<precision>.bin at once: the folder never holds more than one
        graph's own copy of the weights, and the next phase reads the shared file."""
        from .external_weights import share_weights

        self.files[key] = name
        store = self.store(key[1])
        res = share_weights(self.tmp, [name], store, self.opts.weights_min_bytes)
        self.log(f"  {'':<2}-> {store.name:<29} {file_size_text(store.path):>10}  {res.tensors_referenced} tensors; the file holds "
              f"{store.tensors_stored} distinct ones for {sum(k[1] == key[1] for k in self.files)} graph(s)")

    def families(self) -> list[_Family]:
        """The student's decode family, then the AR baseline's where one is built."""
        return ([_Family(FUSED, self.cfg, self.prefix_len, self.max_new, inplace=self.opts.block_inplace)]
                + ([self.ar] if self.ar is not None else []))


class _Discard(list):
    """A feed sink that keeps nothing (a decode run for its side effects: AWQ's row hooks)."""

    def append(self, _feed) -> None:
        pass


def _record_step_feeds(b: _Build, fam: _Family, model: EchoModel, pixels: list[np.ndarray], batch: int,
                       pre_feeds=None, step_feeds=None, rows=None):
    """Decode `pixels` with the PyTorch graph wrappers of one family in chunks of `batch` (the last
    one padded by repeating its image) and record every prefill and step feed, as int8 calibration
    and the TensorRT comparison both need them: into `pre_feeds` / `step_feeds` (lists, or
    FeedStores that write each feed to disk as it comes), new lists where not given. `rows`: an
    int4.LinearInputRows told which phase each run is."""
    from .decode_loop import LoopSettings, decode, prefill_feeds, torch_runner
    from .graphs import make_graph

    cfg = fam.cfg
    pre_run, step_run = (torch_runner(make_graph(role, model, b.opts.capacity, fam.prefix_len, b.tok.mask_id))
                         for role in GRAPHS[fam.mode])
    if rows is not None:
        pre_run, step_run = rows.during("prefill", pre_run), rows.during("step", step_run)
    prefix = np.array(b.tok.prefix_ids(model.n_image_tokens), np.int64)
    settings = LoopSettings.of(cfg.lm, b.opts.capacity, b.tok, fam.max_new)
    pre_feeds = [] if pre_feeds is None else pre_feeds
    step_feeds = [] if step_feeds is None else step_feeds
    rec = lambda f: step_feeds.append({k: v.copy() for k, v in f.items()})  # noqa: E731
    if cfg.vision.native:  # one image at a time, each at its own grid and prompt length
        from .verify import VerifyItem, native_chunks

        for c in native_chunks([VerifyItem(str(i), px) for i, px in enumerate(pixels)], cfg, b.tok):
            pre_feeds.append(c.feeds)
            decode(DecodeMode.of(FUSED, c.prompt_ids.shape[1], cfg.block_size), pre_run, step_run, c.prompt_ids,
                   c.feeds, settings, on_step=rec, position_offset=c.offset)
        return pre_feeds, step_feeds
    mode = DecodeMode.of(fam.mode, prefix.size, cfg.block_size)
    for i in range(0, len(pixels), batch):
        part = pixels[i : i + batch]
        part = part + [part[-1]] * (batch - len(part))
        ids = np.broadcast_to(prefix, (batch, prefix.size)).copy()
        feeds = prefill_feeds(np.stack(part).astype(np.float32), ids)
        pre_feeds.append(feeds)
        decode(mode, pre_run, step_run, ids, feeds, settings, on_step=rec)
    return pre_feeds, step_feeds


def _export_fp32(b: _Build, fam: _Family, m: EchoModel) -> None:
    """One decode family's fp32 graphs, every batch size."""
    import onnx

    from .graphs import example_inputs, export_graph, make_graph, native_dynamic_shapes, release_exporter_references

    graphs, c, p_len = fam.graphs(b.batch_sizes), fam.cfg, fam.prefix_len
    b.meter.start("export")
    b.log(f"[export] {len(graphs)} fp32 graphs (opset {b.opts.opset}, capacity {b.opts.capacity})")
    for role, bs in graphs:
        name = gio.graph_filename(role, "fp32", bs)
        t1 = time.perf_counter()
        g = make_graph(role, m, b.opts.capacity, p_len, b.tok.mask_id)
        native = role == gio.VISION_PREFILL and c.vision.native  # its shapes follow each image
        shapes = native_dynamic_shapes() if native else None
        inputs = example_inputs(role, c, bs, b.opts.capacity, p_len)
        if b.stream:
            _export_staged(b, g, inputs, name, shapes)
            b.log(f"  {name:<34} {'(staged)':>10}  {time.perf_counter() - t1:5.1f}s  graph only: its weights "
                  f"stay {b.plan.stored_dtype if b.plan else 'as loaded'} until a converter reads them")
            b.files[(role, "fp32", bs)] = name
            b.staged.add((role, "fp32", bs))
            continue
        export_graph(g, inputs, b.tmp / name, b.opts.opset, weights=b.store("fp32"),
                     min_bytes=b.opts.weights_min_bytes, dynamic_shapes=shapes)
        onnx.checker.check_model(str(b.tmp / name), full_check=True)
        b.log(f"  {name:<34} {file_size_text(b.tmp / name, data=True):>10}  {time.perf_counter() - t1:5.1f}s")
        b.add_graph((role, "fp32", bs), name)
    release_exporter_references()  # else the last graph keeps the model's weights after the model goes
    b.meter.stop()


def _export_staged(b: _Build, g, inputs, name: str, shapes) -> None:
    """An fp32 graph exported from the model in its own dtype (stream_export): fp32 placeholders
    while tracing, weights read lazily; its weights file is never written (b.deferred)."""
    from .graphs import export_graph
    from .stream_export import DeferredWeights, fp32_placeholders

    if b.deferred is None:
        b.deferred = DeferredWeights(b.tmp)
    with fp32_placeholders(g) as sources:
        export_graph(g, inputs, b.tmp / name, b.opts.opset, weights=b.deferred, min_bytes=b.opts.weights_min_bytes,
                     dynamic_shapes=shapes, sources=sources)


def _drop_staged(b: _Build) -> None:
    """The staged fp32 graphs go once every converter has read them: not in the folder or manifest."""
    from .stream_export import release_params

    for key in sorted(b.staged):
        (b.tmp / b.files.pop(key)).unlink(missing_ok=True)
    b.staged.clear()
    b.deferred = None
    b.int4_rows.clear()  # AWQ rows of this model's weights
    release_params()  # the lazy weights held the model's tensors


def _reference(b: _Build, fam: _Family, m: EchoModel, calib_px: list[np.ndarray], items: list) -> None:
    """Everything later phases need from one family's PyTorch model: the verification reference
    tokens and (for int8) the calibration feeds, on disk. The model can go after this."""
    from .precision import FeedStore

    b.meter.start("reference")
    if items:
        _reference_tokens(b, fam, m, items)
    if _needs_calibration(b.precisions) and b.stream:  # no fp32 graph can run recorded feeds: int4's rows now
        _int4_rows_from_pytorch(b, fam, m, calib_px)
    elif _needs_calibration(b.precisions):
        b.log(f"[reference] {fam.step_role}: calibration feeds of {len(calib_px)} training images (to disk)")
        for bs in b.batch_sizes:
            stores = [FeedStore(b.tmp / ".calib" / f"{role}.b{bs}") for role in (fam.prefill_role, fam.step_role)]
            _record_step_feeds(b, fam, m, calib_px, bs, *stores)
            b.calib[(fam.prefill_role, bs)], b.calib[(fam.step_role, bs)] = stores
    b.meter.stop()


def _reference_tokens(b: _Build, fam: _Family, m: EchoModel, items: list) -> None:
    """The PyTorch reference decodes verification compares each family's graphs with."""
    from .verify import ar_reference, block_reference, graph_reference, teacher_reference

    b.log(f"[reference] {fam.step_role}: PyTorch reference tokens on {len(items)} verification images")
    if fam.mode == AR:
        b.ar_ref = ar_reference(m, b.tok, items, b.batch_sizes, b.opts.capacity, fam.max_new)
        return
    if b.stream:  # no fp32 graphs: the wrappers' decode gives the tokens and the per-pass base
        b.block_ref = graph_reference(m, b.tok, items, b.batch_sizes, b.opts.capacity, b.max_new)
    else:
        b.block_ref = block_reference(m, b.tok, items, b.batch_sizes, b.max_new)
    if fam.cfg.stage == "rad":
        b.log(f"[reference] the multi-step teacher ({fam.cfg.block_size} steps per block) on the same images")
        b.teacher_ref = teacher_reference(m, b.tok, items, b.batch_sizes, b.max_new)


def _int4_rows_from_pytorch(b: _Build, fam: _Family, m: EchoModel, calib_px: list[np.ndarray]) -> None:
    """A build from the checkpoint's dtype: AWQ's and int8dyn's activation rows, taken by hooks on
    the PyTorch model's linear layers as it decodes the calibration images (int4.LinearInputRows)."""
    from .int4 import LinearInputRows, awq_rows_wanted
    from .int8_dynamic import smooth_rows_wanted

    wanted = [n for n in (awq_rows_wanted(b.precisions, b.opts.precision_options),
                          smooth_rows_wanted(b.precisions, b.opts.precision_options)) if n]
    if not wanted:
        return
    n_rows = max(wanted)
    b.log(f"[reference] {fam.step_role}: activation rows (AWQ, int8dyn smoothing) of {len(calib_px)} training images "
          "(PyTorch hooks)")
    rows = LinearInputRows(m, n_rows)
    try:
        for bs in b.batch_sizes:
            _record_step_feeds(b, fam, m, calib_px, bs, _Discard(), _Discard(), rows=rows)
    finally:
        rows.close()
    b.int4_rows.extend(rows.by_weight())


def _export_and_reference(b: _Build, calib_px: list[np.ndarray], items: list) -> None:
    """Each family in turn: load its model (the student is already loaded), export its graphs,
    run its PyTorch decodes, let it go. One PyTorch model is in memory at a time."""
    from .stream_export import fp32_compute

    for fam in b.families():
        if fam.mode == FUSED:
            m = b.model
        else:
            b.meter.start("export")
            b.log(f"[export] loading the AR model again: {fam.ckpt}")
            _, m, _ = _load_model(fam.ckpt, "--ar-ckpt", **({"dtype": _stored_dtype(fam.ckpt)} if b.stream else {}))
            b.meter.stop()
        _export_fp32(b, fam, m)
        with fp32_compute(m):  # a model kept in bf16 decodes as its fp32 twin (a no-op for fp32)
            _reference(b, fam, m, calib_px, items)
        if b.stream:  # the staged graphs read this model's weights: converted before it goes (two 7B
            _convert_all(b, calib_px)  # models do not fit side by side)
            _drop_staged(b)
        if fam.mode == FUSED and not b.opts.trt:  # --trt compares plans with PyTorch later
            b.model = None
        m = None
        gc.collect()


def _convert_all(b: _Build, calib_px: list[np.ndarray]) -> None:
    """Every precision's converter over the fp32 (or staged) graphs there are now, registry order."""
    for precision in b.precisions:
        convert = _converter(precision)
        if convert is not None:
            convert(b, calib_px)


def _convert_fp16(b: _Build, calib_px: Optional[list[np.ndarray]] = None) -> None:
    import onnx

    from .precision import to_fp16

    b.meter.start("fp16")
    b.log("[fp16] convert (IO fp32; softmax, norm statistics and rotary angles kept fp32)")
    for (role, _, bs), src in [(k, v) for k, v in b.files.items() if k[1] == "fp32" and k[0] not in gio.CPU_ONLY_ROLES]:
        name = gio.graph_filename(role, "fp16", bs)
        to_fp16(b.tmp / src, b.tmp / name, weights=b.store("fp16"), source=b.deferred)
        onnx.checker.check_model(str(b.tmp / name), full_check=True)
        b.log(f"  {name:<34} {file_size_text(b.tmp / name, data=True):>10}")
        b.add_graph((role, "fp16", bs), name)
    b.meter.stop()


def _quantise_int8(b: _Build, calib_px: list[np.ndarray]) -> None:
    import onnx

    from .precision import to_int8

    b.meter.start("int8")
    b.log(f"[int8] calibrating on {len(calib_px)} training images (graph inputs recorded by the PyTorch reference decodes)")
    for fam in b.families():
        for bs in b.batch_sizes:
            for role in (fam.prefill_role, fam.step_role):
                name = gio.graph_filename(role, "int8", bs)
                feeds = b.calib[(role, bs)]  # removed once every converter has run (_build_into)
                info = to_int8(b.tmp / b.files[(role, "fp32", bs)], b.tmp / name, feeds,
                               mode=b.int8_info["mode"], workdir=b.tmp,
                               min_weight_elements=b.opts.int8_min_weight,
                               skip_input_dims=[fam.cfg.lm.intermediate_size] if b.opts.int8_down_proj_fp32 else [])
                onnx.checker.check_model(str(b.tmp / name), full_check=True)
                b.log(f"  {name:<34} {file_size_text(b.tmp / name, data=True):>10}  {info['quantized_matmuls']} weight "
                      f"MatMul/Gemm, {info['calib_samples']} calibration feeds")
                b.add_graph((role, "int8", bs), name)
    for pattern in ("*.pre.onnx", "*.pre.onnx.data", "*-inferred.onnx"):  # the quantiser's intermediate files
        for leftover in b.tmp.glob(pattern):
            leftover.unlink()
    b.meter.stop()


def _close_stores(b: _Build) -> None:
    for store in b.stores.values():
        store.close()


def _check_tensorrt_ready(b: _Build) -> None:
    """Every graph's TensorRT form against the ONNX-TensorRT operator matrix (echo_export/trt_ops.py),
    with or without TensorRT here; a node TensorRT would refuse fails the build by name."""
    from .trt_ops import TensorRTNotReady, check_engine_folder

    b.meter.start("trt-check")
    b.log("[trt-check] each precision's TensorRT form against the ONNX-TensorRT operator matrix")
    try:
        ready = check_engine_folder(b.tmp, _tensorrt_sources(b), b.log, strict=b.opts.tensorrt_check != "warn" or b.opts.trt)
    except TensorRTNotReady as e:
        raise BuildError(f"TensorRT readiness: {e}") from None
    for precision, info in ready.items():
        b.precision_info.setdefault(precision, {}).update(info)
    b.meter.stop()


def _tensorrt_sources(b: _Build) -> dict[tuple[str, str, int], str]:
    """The graphs TensorRT would run: not the CPU-only forms (graph_io.CPU_ONLY_ROLES)."""
    return {k: v for k, v in b.files.items() if k[0] not in gio.CPU_ONLY_ROLES}


def _build_plans(b: _Build) -> None:
    from .tensorrt_build import build_all

    b.meter.start("tensorrt")
    b.log("[tensorrt] strongly typed engines")
    cache = b.opts.timing_cache or (Path.home() / ".cache" / "echo-export" / "trt_timing.cache")
    cache.parent.mkdir(parents=True, exist_ok=True)
    b.plans = build_all(b.tmp, sorted(_tensorrt_sources(b).values()), timing_cache=cache, log=b.log)
    b.meter.stop()


def _compare_plans(b: _Build, pixels: list[np.ndarray]) -> dict:
    """Polygraphy: each block_step plan (TensorRT) against its ONNX graph (onnxruntime) on real pass inputs."""
    from .tensorrt_build import compare_with_onnxruntime, tensorrt_source_filename

    out = {}
    for (role, prec, bs), name in sorted(b.files.items()):
        if role != gio.BLOCK_STEP or name not in b.plans:
            continue
        _, feeds = _record_step_feeds(b, b.families()[0], b.model, pixels * bs, bs)
        res = compare_with_onnxruntime(b.tmp / tensorrt_source_filename(name), b.tmp / b.plans[name], feeds[:4],
                                       atol=1e-3 if prec == "fp32" else 5e-2, rtol=1e-3 if prec == "fp32" else 5e-2)
        out[b.plans[name]] = res
        b.log(f"  tensorrt {b.plans[name]}: {'PASS' if res['passed'] else 'FAIL'} {res}")
    return out


def _verify(b: _Build, verify_samples: list[_Sample], verify_px: list[np.ndarray]) -> dict:
    from .verify import VerifyItem, VerifyJob, verify_ar, verify_block, verify_teacher
    from .verify_table import print_table

    b.meter.start("verify")
    b.log(f"[verify] {len(verify_samples)} held-out images, up to {b.max_new} new tokens, onnxruntime CPU")
    items = [VerifyItem(s.id, px, s.report) for s, px in zip(verify_samples, verify_px)]
    checked = _sessions_that_fit(b)
    # the PyTorch references were computed in the reference phase: no PyTorch model is loaded here
    job = VerifyJob(b.tmp, b.files, b.tok, items, checked, b.batch_sizes, b.opts.capacity, b.log)
    rep = verify_block(job, b.block_ref)
    if b.teacher_ref is not None:
        rep["variants"].update(verify_teacher(replace(job, precisions=b.precisions), b.teacher_ref))
    if b.ar is not None:
        rep["variants"].update(verify_ar(replace(job, precisions=b.precisions), b.ar_ref)["variants"])
    verified = all(v["identical"] for v in rep["variants"].values()  # fp32: the registry's must_be_identical
                   if precision_registry.get(v["precision"]).tolerances.must_be_identical)
    rep.update(_what_was_verified(b, checked))
    if "fp32" not in b.precisions:
        verified = None  # no fp32 graphs: nothing was held to identity (see "verification")
    rep.update({"n_images": len(items), "max_new_tokens": b.max_new, "fp32_identical": verified, "int8": b.int8_info,
                "precision_info": b.precision_info,
                "images": [s.id for s in verify_samples], "reference": "echo_train.decoding.fused_onestep_generate"})
    if b.plans:  # b.model was kept for this
        rep["tensorrt"] = _compare_plans(b, verify_px[:1])
    print_table(rep, b.log)
    (b.tmp / "verify.json").write_text(json.dumps(rep, indent=2, sort_keys=True))
    b.meter.stop()
    return rep


def _sessions_that_fit(b: _Build) -> list[str]:
    """The precisions whose verification sessions fit: the plan's, checked again against
    MemAvailable now (the machine is shared; the plan was made before the export)."""
    from . import memory_plan

    if b.plan is None:
        return list(b.precisions)
    room = (memory_plan.mem_available() or 0) - memory_plan.HEADROOM
    for p in [p for p in b.plan.verify if b.plan.phases[f"verify {p}"] > room]:
        b.plan.verify.remove(p)
        b.plan.not_verified[p] = (f"its onnxruntime CPU sessions need about {b.plan.phases[f'verify {p}'] / 1e9:.1f} GB, "
                                  f"{room / 1e9:.1f} GB available at the verify phase")
    return [p for p in b.precisions if p in b.plan.verify]


def _what_was_verified(b: _Build, checked: list[str]) -> dict:
    """verify.json's plain statement of what was and was not checked, and against what."""
    skipped = {p: (b.plan.not_verified.get(p) if b.plan else None) or "not run" for p in b.precisions if p not in checked}
    for p, why in skipped.items():
        b.log(f"  NOT verified: {p} ({why})")
    if "fp32" in b.precisions:
        base = "fp32 graphs held identical to the PyTorch reference; the other precisions measured against fp32"
    else:
        base = ("no fp32 graphs (built from the checkpoint's own dtype): each checked precision's tokens are compared "
                "with the PyTorch reference (fp32 arithmetic on the stored weights) and reported, nothing is held to "
                "identity; per-pass agreement is measured on the PyTorch graph wrappers' own passes (fp32 arithmetic): "
                "verified=false")
        b.log(f"  {base}")
    return {"verification": {"checked": checked, "not_checked": skipped, "base": base,
                             "memory_plan": b.plan.to_dict() if b.plan else None}}


def _build_into(b: _Build, checked: _Checked) -> _Outcome:
    """Every phase after the input checks, into b.tmp."""
    from .verify import VerifyItem

    items = [VerifyItem(s.id, px, s.report) for s, px in zip(checked.verify_samples, checked.verify_px)]
    _export_and_reference(b, checked.calib_px, items)
    _convert(b, checked.calib_px)
    _check_tensorrt_ready(b)
    if b.opts.trt:
        _build_plans(b)
    shutil.copyfile(Path(b.opts.ckpt) / "tokenizer.json", b.tmp / "tokenizer.json")
    verify_report = _verify(b, checked.verify_samples, checked.verify_px) if items else None
    if verify_report is None:
        b.log("[verify] skipped (--verify-n 0): the manifest says verified=false")
    verified = bool(verify_report and verify_report["fp32_identical"])
    return _Outcome(_manifest_files(b, verify_report is not None), _graph_table(b), verify_report, verified,
                    b.precision_info)


def _convert(b: _Build, calib_px: list[np.ndarray]) -> None:
    """Every other precision from the fp32 graphs (a streamed build converted each family's as it
    went, _export_and_reference); then the calibration feeds go and the weights files are closed."""
    if not b.stream:
        _convert_all(b, calib_px)
    _fuse_cpu_graphs(b)
    for feeds in b.calib.values():
        shutil.rmtree(feeds.folder, ignore_errors=True)
    b.calib.clear()
    shutil.rmtree(b.tmp / ".calib", ignore_errors=True)
    _close_stores(b)  # every graph is in: the weights files are complete


def _fuse_cpu_graphs(b: _Build) -> None:
    """Once every converter has read the graphs (int8dyn folds its smoothing into the norms' Mul
    weights): the mask token's exclusion as an Add (not where the registry says exclusion_as_where);
    in the CPU-only graphs the RMSNorms as onnxruntime's (Skip)SimplifiedLayerNormalization and the
    q/k/v projections packed (cpu_fusion.py; the packed weights join the precision's weights file),
    and the fp32 one's argmax screened (screened_argmax.py)."""
    from .cpu_fusion import additive_exclusion, fuse_graph_file, rewrite_graph_file

    for (role, prec, bs), name in sorted(b.files.items()):
        if not precision_registry.get(prec).exclusion_as_where:
            rewrite_graph_file(b.tmp / name, additive_exclusion)
        if role in gio.CPU_ONLY_ROLES:
            n = fuse_graph_file(b.tmp / name, store=b.stores.get(prec))
            b.log(f"  {name:<34} {n} RMSNorms -> (Skip)SimplifiedLayerNormalization, q/k/v packed (into the attention)")
            if role == gio.AR_STEP_INPLACE and prec == "fp32" and b.opts.screened_argmax and "fp32" in b.stores:
                _screen_argmax(b, b.tmp / name)


def _screen_argmax(b: _Build, path: Path) -> None:
    """The fp32 CPU step's argmax screened by an 8-bit lm_head (echo_export/screened_argmax.py)."""
    from .cpu_fusion import rewrite_graph_file
    from .screened_argmax import screen_argmax

    if rewrite_graph_file(path, lambda model, folder: screen_argmax(model, folder, b.stores["fp32"])):
        b.log(f"  {path.name:<34} argmax screened by an 8-bit lm_head (exact: the full head where it cannot tell)")
    else:
        b.log(f"  {path.name:<34} argmax not screened (no lm_head -> ArgMax tail, or no block size fits)")


def _graph_table(b: _Build) -> dict[str, dict[str, str]]:
    """manifest.graphs: graphs[role][f"{precision}.b{batch}"], TensorRT plans under "trt-<precision>"."""
    graphs: dict[str, dict[str, str]] = {}
    for (role, prec, bs), name in sorted(b.files.items()):
        graphs.setdefault(role, {})[f"{prec}.b{bs}"] = name
        if name in b.plans:
            graphs[role][f"trt-{prec}.b{bs}"] = b.plans[name]
    return graphs


def _manifest_files(b: _Build, with_verify_json: bool) -> list[str]:
    """Every file of the folder the manifest lists (and hashes): graphs, plans and the TensorRT
    forms they were built from, weights, the tokenizer, verify.json where verification ran."""
    from .external_weights import external_data_files
    from .tensorrt_build import tensorrt_source_filename

    sources = {tensorrt_source_filename(n) for n in b.plans}
    return sorted(set(b.files.values()) | set(b.plans.values()) | set(b.data_files) | sources | {"tokenizer.json"} |
                  {f for n in sources for f in external_data_files(b.tmp / n)} |
                  ({"verify.json"} if with_verify_json else set()))
