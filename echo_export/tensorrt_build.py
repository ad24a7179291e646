"""TensorRT engines from the exported ONNX graphs, and a Polygraphy comparison against onnxruntime.

Strongly typed networks only: TensorRT takes each tensor's precision from the ONNX graph
(fp32, fp16 casts, int8 Q/DQ), which is what TensorRT 11 requires (it removed the FP16/INT8
builder flags and implicit calibration). Needs the `[trt]` extra and a CUDA GPU; imported
lazily so that the rest of echo_export works without them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

TRT_HINT = "TensorRT is not installed: install the [trt] extra (pip install 'echo-cxr[trt]') on a machine with a CUDA GPU"


class TensorRTUnavailable(RuntimeError):
    """tensorrt / polygraphy missing, or no GPU."""


def import_trt() -> Any:
    """The tensorrt module, or TensorRTUnavailable naming the [trt] extra."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as e:
        raise TensorRTUnavailable(f"{TRT_HINT} ({e})") from None
    return trt


def _precision_of(onnx_name: str) -> Optional[str]:
    """block_step.int8.b1.onnx -> "int8" (graph_io.graph_filename's pattern), None for another name."""
    from runtime import precisions

    parts = onnx_name.split(".")
    return parts[1] if len(parts) == 4 and parts[3] == "onnx" and parts[1] in precisions.NAMES else None


def tensorrt_form_converter(precision: str):
    """The registry's TensorRT-form rewrite of a precision (a function (src, dst) -> dict), or None:
    its graphs are parsed as they are."""
    import importlib

    from runtime import precisions

    spec = precisions.get(precision).tensorrt_form
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def tensorrt_source_filename(onnx_name: str) -> str:
    """The graph a plan is built from: a precision whose onnxruntime graph TensorRT cannot take
    (int8: uint8 activations and int32 biases; int4: MatMulNBits, an onnxruntime operator) has a
    TensorRT form beside it (block_step.int8.b1.onnx -> block_step.int8.b1.tensorrt.onnx, the
    registry's `tensorrt_form`); the others are parsed as they are."""
    precision = _precision_of(onnx_name)
    if precision is not None and tensorrt_form_converter(precision) is not None:
        return onnx_name[: -len(".onnx")] + ".tensorrt.onnx"
    return onnx_name


def plan_filename(onnx_name: str) -> str:
    """block_step.fp16.b1.onnx -> block_step.fp16.b1.plan"""
    return onnx_name[: -len(".onnx")] + ".plan" if onnx_name.endswith(".onnx") else onnx_name + ".plan"


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    timing_cache: Optional[str | Path] = None,
    workspace_bytes: int = 4 << 30,
    opt_level: int = 3,
    verbose: bool = False,
    strip_weights: bool = True,
) -> Path:
    """Parse `onnx_path` into a strongly typed network, build, and write the serialized `.plan`.

    The timing cache (if given) is loaded before and saved after the build, so later builds
    of the same graphs on the same GPU skip kernel timing. `strip_weights` (TensorRT >= 10):
    a weight-stripped plan (STRIP_PLAN + REFIT_IDENTICAL) that the runtime refits from the ONNX
    graph it was built from, whose weights are the folder's weights.<precision>.bin: the plans
    of every batch size do not each carry another copy of the model.
    """
    trt = import_trt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = Path(onnx_path)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the graph:\n  " + "\n  ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    config.builder_optimization_level = int(opt_level)
    if strip_weights and hasattr(trt.BuilderFlag, "STRIP_PLAN"):
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)  # refit with the very weights it was built from
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    plan_path = Path(plan_path)
    tmp = plan_path.with_suffix(plan_path.suffix + ".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def compare_with_onnxruntime(
    onnx_path: str | Path,
    plan_path: str | Path,
    feeds: list[dict],
    *,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    compare_outputs: tuple[str, ...] = ("tokens",),
) -> dict:
    """Run the plan (TensorRT) and the ONNX graph (onnxruntime CPU) on the same feeds.

    Tokens must match exactly; float outputs are compared with atol/rtol. Returns a
    summary dict; `passed` is Polygraphy's verdict.
    """
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import TrtRunner
        from polygraphy.comparator import Comparator, CompareFunc
    except ImportError as e:
        raise TensorRTUnavailable(f"{TRT_HINT}; polygraphy is missing ({e})") from None
    from runtime.trt_backend import load_engine

    trt = import_trt()
    engine, _runtime = load_engine(trt, trt.Logger(trt.Logger.WARNING), Path(plan_path), Path(onnx_path))  # refits a stripped plan
    runners = [
        TrtRunner(engine),
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"])),
    ]
    results = Comparator.run(runners, data_loader=list(feeds))
    check = CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)
    accuracy = Comparator.compare_accuracy(results, compare_func=check)
    passed = bool(accuracy)
    token_equal = True
    # exact token check on top of the tolerance comparison
    (_, trt_runs), (_, ort_runs) = results[0], results[1]
    for a, b in zip(trt_runs, ort_runs):
        for name in compare_outputs:
            if name in a and name in b and not (a[name] == b[name]).all():
                token_equal = False
    return {"passed": passed and token_equal, "tolerance_passed": passed, "tokens_identical": token_equal,
            "n_feeds": len(feeds)}


def build_all(engine_dir: str | Path, onnx_files: list[str], *, timing_cache: Optional[str | Path] = None,
              workspace_bytes: int = 4 << 30, log=print) -> dict[str, str]:
    """Build a plan for every ONNX file; returns onnx name -> plan name. An int8 or int4 graph's plan
    is built from its TensorRT form (`tensorrt_source_filename`), written beside it first."""
    d = Path(engine_dir)
    out = {}
    cache = Path(timing_cache) if timing_cache else d / "trt_timing.cache"
    import_trt()
    for name in onnx_files:
        plan = plan_filename(name)
        src = tensorrt_source_filename(name)
        if src != name:
            info = tensorrt_form_converter(_precision_of(name))(d / name, d / src)
            log(f"  {name} -> {src} ({', '.join(f'{k} {v}' for k, v in info.items())})")
        log(f"  tensorrt {src} -> {plan}")
        build_engine(d / src, d / plan, timing_cache=cache, workspace_bytes=workspace_bytes)
        out[name] = plan
    return out
