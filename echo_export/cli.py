"""`echo-export`: build a verified engine folder from a checkpoint, or inspect one."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime import precisions
from runtime.cpu_features import INT8_AUTO, INT8_MODES
from runtime.errors import ManifestError


@click.group()
def main() -> None:
    """Export ECHO checkpoints to fixed-shape ONNX / TensorRT engine folders."""


@main.command()
@click.option("--ckpt", required=True, type=click.Path(path_type=Path), help="one-step student checkpoint (stage dcd)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="engine folder to create")
@click.option("--precision", "precision", default="fp32,fp16,int8", show_default=True,
              help=f"comma-separated: {', '.join(precisions.NAMES)} (fp32 is built too, unless only "
                   f"{' and '.join(precisions.stored_dtype_names())} are asked: then the graphs are exported from "
                   "the checkpoint's own dtype with no fp32 weights, the way a 7B model fits in 24 GB)")
@click.option("--precision-opt", "precision_opts", multiple=True, metavar="PRECISION.OPTION=VALUE",
              help="a converter option, repeatable, e.g. int4.block_size=64 (the converter lists the ones it knows)")
@click.option("--ar-ckpt", type=click.Path(path_type=Path), default=None, help="stage-1 AR checkpoint: adds ar_prefill/ar_step")
@click.option("--batch-sizes", default="1", show_default=True, help="comma-separated fixed batch sizes")
@click.option("--capacity", default=None, type=click.IntRange(min=1),
              help="KV cache slots (CAP). Default: what the models need (image + prompt tokens + max_response_tokens); "
                   "a smaller value is refused before any work")
@click.option("--calib-size", default=32, show_default=True, type=int, help="training images for int8 calibration")
@click.option("--verify-n", default=50, show_default=True, type=int, help="held-out images for verification (0: skip)")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="dataset (echo_train.data.loaders formats); default data/synth when present")
@click.option("--verify-data", type=click.Path(path_type=Path), default=None,
              help="dataset whose test split (else val) verifies the build, e.g. a large fresh one to resolve "
                   "a 1-point F1 change; default: --data's. int8 still calibrates on --data's train split")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="the longest report to build for: sizes the default capacity and the verification "
                   "(default: the model's max_response_tokens)")
@click.option("--opset", default=18, show_default=True, type=int)
@click.option("--int8-mode", type=click.Choice([INT8_AUTO, *INT8_MODES]), default="auto", show_default=True,
              help="int8 quantisation: u8s8 = uint8 activations x 8-bit weights (exact only on CPUs with VNNI); "
                   "u8s7 = 7-bit weights (cannot saturate on AVX2 without VNNI); s8s8 = signed activations (the "
                   "TensorRT form; onnxruntime on x86 runs it like u8s8). auto: u8s8 on a VNNI CPU, u8s7 on one "
                   "without, so build on the kind of CPU that will serve")
@click.option("--int8-min-weight", default=0, show_default=True, type=int,
              help="int8: quantise only weight matrices with at least this many values (small ones lose to Q/DQ overhead on CPU)")
@click.option("--int8-down-proj/--int8-down-proj-fp32", "int8_down_proj", default=False, show_default=True,
              help="int8: also quantise the MLP down projections (default: keep them fp32; their SwiGLU inputs "
                   "have tails that one uint8 range cannot hold)")
@click.option("--trt", is_flag=True, help="also build TensorRT plans (needs the [trt] extra and a GPU)")
@click.option("--tensorrt-check", type=click.Choice(["fail", "warn"]), default="fail", show_default=True,
              help="each graph's TensorRT form is checked against the ONNX-TensorRT operator matrix: fail the build "
                   "on a node TensorRT would refuse, or warn and record it (tensorrt_ready false; not with --trt)")
@click.option("--ar-inplace/--no-ar-inplace", "ar_inplace", default=True, show_default=True,
              help="with --ar-ckpt: also the AR step in its onnxruntime-CPU form (ar_step_inplace: one "
                   "GroupQueryAttention per layer over caches written in place, norms fused), which the runtime "
                   "takes on the CPU; TensorRT and fp16 keep ar_step")
@click.option("--block-inplace/--no-block-inplace", "block_inplace", default=True, show_default=True,
              help="also the batch-1 one-step pass in its onnxruntime-CPU form (block_step_inplace: one "
                   "GroupQueryAttention per layer over caches written in place, norms fused, q/k/v packed), which "
                   "the runtime takes on the CPU; TensorRT, fp16 and larger batches keep block_step")
@click.option("--screened-argmax/--no-screened-argmax", "screened_argmax", default=True, show_default=True,
              help="the fp32 ar_step_inplace finds its argmax through an 8-bit copy of the lm_head and fp32 logits of "
                   "the rows that can still win (the same tokens; the full head where the screen cannot tell)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--weights-min-bytes", default=1024, show_default=True, type=click.IntRange(min=1),
              help="tensors of at least this many bytes go to weights.<precision>.bin, stored once for every graph of "
                   "that precision; smaller ones stay inside the graphs. A huge value keeps every graph self-contained "
                   "(only below protobuf's 2 GB limit)")
@click.option("--summary-json", type=click.Path(path_type=Path), default=None,
              help="also write the build summary (seconds and peak RSS per phase, folder and weight bytes) as JSON here")
def build(ckpt, out, precision, precision_opts, ar_ckpt, batch_sizes, capacity, calib_size, verify_n, data, verify_data, max_new_tokens, opset,
          int8_mode, int8_min_weight, int8_down_proj, trt, tensorrt_check, ar_inplace, block_inplace, screened_argmax, force, weights_min_bytes,
          summary_json) -> None:
    """Trace, convert, quantise, verify, and write manifest.json last."""
    from .build import BuildError, BuildOptions, build as run_build, parse_batch_sizes, parse_precision_options, parse_precisions
    from .tensorrt_build import TensorRTUnavailable

    try:
        if opset < 18:
            raise BuildError(f"--opset {opset}: the exporter contract needs opset >= 18")
        if trt:
            from .tensorrt_build import import_trt

            import_trt()  # fail before any work
        opts = BuildOptions(ckpt=ckpt, out=out, precisions=parse_precisions(precision), ar_ckpt=ar_ckpt,
                            batch_sizes=parse_batch_sizes(batch_sizes), capacity=capacity, calib_size=calib_size,
                            verify_n=verify_n, data=data, verify_data=verify_data, trt=trt, force=force, opset=opset,
                            max_new_tokens=max_new_tokens, int8_mode=int8_mode, int8_min_weight=int8_min_weight,
                            int8_down_proj_fp32=not int8_down_proj, weights_min_bytes=weights_min_bytes,
                            summary_json=summary_json, tensorrt_check=tensorrt_check, ar_inplace=ar_inplace, block_inplace=block_inplace,
                            screened_argmax=screened_argmax,
                            precision_options=parse_precision_options(list(precision_opts)))
        run_build(opts, log=lambda s: click.echo(s))
    except (BuildError, TensorRTUnavailable, ManifestError) as e:
        click.echo(f"echo-export build: error: {e}", err=True)
        sys.exit(2)


@main.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
def inspect(engine_dir: Path) -> None:
    """Show what an engine folder holds: graphs with IO shapes, verification, hash check."""
    from .inspect_engine import inspect_engine

    try:
        ok = inspect_engine(engine_dir, log=lambda s: click.echo(s))
    except ManifestError as e:
        click.echo(f"echo-export inspect: error: {e}", err=True)
        sys.exit(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
