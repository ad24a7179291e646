"""`echo-bench`: every method on every engine, same test studies, one process, one table."""
from __future__ import annotations

import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(b not in (4, 8, 16) for b in out):
        raise click.BadParameter(f"block sizes must be among 4, 8, 16, got {text!r}")
    return out


def _steps(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if any(k < 1 for k in out):
        raise click.BadParameter(f"steps per block must be >= 1, got {text!r}")
    return out


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def publish(result: dict, paths: dict, dest: Path = RESULTS_DIR) -> list[Path]:
    """Copy results.md + the plot + a RUN.md (command, machine, date) into benchmarks/results/."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for key in [k for k in ("md", "png", "sweep_png") if k in paths]:
        target = dest / paths[key].name
        shutil.copyfile(paths[key], target)
        out.append(target)
    m = result["machine"]
    gpu = m.get("gpu")
    run = [
        "# How these results were produced", "",
        f"- command: `{result.get('command', '')}`",
        f"- date: {m['date']}",
        f"- machine: {m['cpu']}, {m['cpus_usable']} usable CPUs of {m['cpu_count']}"
        + (f", GPU {gpu['name']}" if gpu else ", no GPU") + f"; {m['platform']}",
        f"- libraries: " + ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items()),
        f"- threads: {result.get('threads')}",
        f"- wall time: {result.get('wall_s', 0):.0f} s",
        f"- full output (JSON with every report): `{paths['json']}` (not tracked)", "",
    ]
    (dest / "RUN.md").write_text("\n".join(run))
    out.append(dest / "RUN.md")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default="data/synth", show_default=True, help="Dataset folder or JSON.")
@click.option("--split", default="test", show_default=True)
@click.option("--n", type=int, default=100, show_default=True, help="Studies (the first N of the split).")
@click.option("--methods", default="ar,teacher,naive,dcd", show_default=True,
              help="Comma list of ar, teacher, naive, dcd, teacher@<steps>.")
@click.option("--teacher-steps", default="", show_default=True,
              help="The steps sweep: the teacher at these step counts per block (below B; B is the teacher row) "
                   "on the --sweep-engines, e.g. 1,2,4. Its own table section and teacher_steps.png.")
@click.option("--sweep-engines", default="ort-fp32", show_default=True, help="Engines the steps sweep runs on.")
@click.option("--engines", default="all", show_default=True,
              help="all, or a comma list of engines or prefixes: pytorch, ort, ort-<precision> (fp32, fp16, int8, ...), trt, hf.")
@click.option("--block-sizes", default="8", show_default=True,
              help="Comma list; block sizes other than 8 use <ckpt>-bN and <engine-dir>-bN.")
@click.option("--ar-ckpt", default="runs/ar", show_default=True)
@click.option("--teacher-ckpt", default="runs/base", show_default=True)
@click.option("--echo-ckpt", default="runs/echo", show_default=True)
@click.option("--engine-dir", default="engines/echo", show_default=True, help="One-step engine folder (with AR graphs).")
@click.option("--naive-engine-dir", default="engines/base", show_default=True,
              help="Engine folder built from the teacher (naive one-step on onnxruntime); optional.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the PyTorch and transformers engines run.")
@click.option("--bf16", is_flag=True, help="bf16 autocast for PyTorch / transformers on CUDA.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Timed passes over the studies at batch 1.")
@click.option("--runtime-repeats", type=int, default=5, show_default=True,
              help="Timed passes for the onnxruntime / TensorRT cells (cheap; steadier speed ratios). 0: same as --repeats.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed reports before each cell.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch and onnxruntime intra-op threads (0: library default).")
@click.option("--throughput-batch", type=int, default=8, show_default=True)
@click.option("--throughput-n", type=int, default=32, show_default=True, help="Reports for the batched throughput.")
@click.option("--max-new-tokens", type=int, default=None, help="Default: the AR checkpoint's max_response_tokens.")
@click.option("--metrics", default="finding_f1,bleu,rouge,semscore,validity", show_default=True)
@click.option("--n-boot", type=int, default=200, show_default=True, help="Bootstrap resamples for the CIs (0: none).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default=None, help="Output folder (default benchmarks/out/<name>).")
@click.option("--name", default=None, help="Run name (default: a UTC timestamp).")
@click.option("--publish", "do_publish", is_flag=True, help="Copy results.md, the plot and RUN.md into benchmarks/results/.")
def main(data, split, n, methods, teacher_steps, sweep_engines, engines, block_sizes, ar_ckpt, teacher_ckpt, echo_ckpt, engine_dir, naive_engine_dir,
         device, bf16, repeats, runtime_repeats, warmup, threads, throughput_batch, throughput_n, max_new_tokens, metrics, n_boot, seed,
         out, name, do_publish) -> None:
    """Benchmark AR, the multi-step teacher, naive one-step and DCD one-step on every engine here.

    Prints quality (finding F1, SemScore, BLEU-4, ROUGE-L, validity) and speed (latency p50/p95,
    tokens/s, passes, speed-up over AR, batched throughput, peak memory) side by side, and the
    ideal one-step speed-up B x t(1)/t(2B) measured in the same run. Writes results.json,
    results.md and quality_vs_latency.png.
    """
    from echo_train.stages.errors import StageError

    from .engines import Paths
    from .harness import BenchConfig, run_benchmark

    name = name or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    cfg = BenchConfig(
        data=data, split=split, n=n, methods=_list(methods), teacher_steps=_steps(teacher_steps),
        sweep_engines=_list(sweep_engines), engines=engines, block_sizes=_ints(block_sizes),
        paths=Paths(ar_ckpt=ar_ckpt, teacher_ckpt=teacher_ckpt, dcd_ckpt=echo_ckpt, engine_dir=engine_dir,
                    naive_engine_dir=naive_engine_dir),
        device=device, bf16=bf16, repeats=repeats, runtime_repeats=runtime_repeats or None, warmup=warmup, threads=threads or None,
        throughput_batch=throughput_batch, throughput_n=throughput_n, max_new_tokens=max_new_tokens,
        metrics=_list(metrics), n_boot=n_boot, seed=seed, out=out or f"benchmarks/out/{name}",
    )
    try:
        result, paths = run_benchmark(cfg)
    except ValueError as e:
        raise click.ClickException(str(e))
    except StageError as e:  # e.g. the split is empty or missing
        raise click.ClickException(str(e)) from None
    click.echo("")
    click.echo(paths["md"].read_text())
    click.echo(f"results: {paths['json']}\ntable:   {paths['md']}\nplot:    {paths['png']}")
    if "sweep_png" in paths:
        click.echo(f"sweep:   {paths['sweep_png']}")
    if do_publish:
        for p in publish(result, paths):
            click.echo(f"published: {p}")


if __name__ == "__main__":
    sys.exit(main())
