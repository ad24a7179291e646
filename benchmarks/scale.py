"""The scale ladder: random-weight ECHO models at real backbone shapes, through `echo-export build`
and the runtime, one rung at a time.

    python -m benchmarks.scale                                # demo, qwen2.5-0.5b (fp32, fp16, int8) and qwen2.5-1.5b (fp32)
    python -m benchmarks.scale --rungs demo --precisions fp32 # a quick look
    python -m benchmarks.scale --rungs qwen2.5-7b --allow-7b  # a bigger machine only (see RUNGS)

Speed does not depend on the weights' values, so random weights at the real shapes answer the
size questions honestly: export time and peak memory, the engine folder against the weight
bytes, the runtime's memory, the per-pass times of block_step and ar_step, and the ideal
one-step speed-up B*t(1)/t(2B) beside the achieved DCD-over-AR tokens/s of the runtime's decode
loops. Random weights rarely write EOS, so reports run to --max-new-tokens (the token counts are
recorded). Token equality with the PyTorch reference is the build's own verification
(`--verify-n`), on the rung's synthetic test images.

Each rung runs in subprocesses (the build, then a runtime probe), so their peak memory is their
own; a rung whose summary exists is not rebuilt (delete benchmarks/out/scale/RUNG to redo it).
Engines and checkpoints go to benchmarks/out/scale/ (ignored); the table, JSON and plot to
benchmarks/results/scale/.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.sysinfo import status_mb

WORK = Path("benchmarks/out/scale")
RESULTS = Path("benchmarks/results/scale")

# ViT-B/16 at 224 px: 196 image tokens, 86M parameters
VIT_B16 = dict(family="vit", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072)


@dataclass
class Rung:
    name: str
    lm: dict[str, Any]  # LMConfig fields (Hugging Face names)
    vision: dict[str, Any]  # VisionConfig fields
    precisions: str = "fp32,fp16,int8"
    batch_sizes: str = "1,8"
    note: str = ""
    big: bool = False  # needs --allow-7b


RUNGS: dict[str, Rung] = {r.name: r for r in [
    Rung("demo", lm={}, vision={}, note="the demo model's shapes (tiny preset)"),
    Rung("qwen2.5-0.5b", lm=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                                  tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768),
         vision=VIT_B16, note="Qwen2.5-0.5B decoder + ViT-B/16 224 px"),
    # fp32 only by default: its fp16/int8 variants add about an hour on 2 cores (pass --precisions)
    Rung("qwen2.5-1.5b", lm=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2, head_dim=128, rope_theta=1e6,
                                  tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768),
         vision=VIT_B16, precisions="fp32", batch_sizes="1", note="Qwen2.5-1.5B decoder + ViT-B/16 224 px"),
    # 7.6B parameters: 30 GB of fp32 weights, 15 GB in bf16/fp16. Export holds the PyTorch model and one
    # graph's weights at once (about 2x the weights at the precision exported), so fp32 needs a machine
    # with >= 64 GB of memory and ~100 GB of disk (checkpoint 30 + fp32 weights 30 + fp16 15 + int8 8,
    # plus one graph's export data in flight); not this 24 GB machine.
    Rung("qwen2.5-7b", lm=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1e6,
                                tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768),
         vision=VIT_B16, precisions="fp32", batch_sizes="1", note="Qwen2.5-7B decoder + ViT-B/16 224 px", big=True),
]}


@dataclass
class ScaleConfig:
    rungs: list[str] = field(default_factory=lambda: ["demo", "qwen2.5-0.5b", "qwen2.5-1.5b"])
    precisions: Optional[str] = None  # None: each rung's own
    batch_sizes: Optional[str] = None
    block_size: int = 8
    max_new_tokens: int = 64  # per report; reports run to it (random weights rarely write EOS)
    verify_n: int = 10  # fp32 tokens must equal the PyTorch reference on these images
    calib_size: int = 4
    n_reports: int = 3  # runtime decodes per mode for the achieved tokens/s
    pass_repeats: int = 20  # timed runs of each graph for t(1), t(2B)
    threads: int = 2
    allow_7b: bool = False
    work: Path = WORK  # checkpoints, engines and logs per rung


def _python() -> str:
    return sys.executable


def _echo_export() -> list[str]:
    exe = Path(sys.executable).parent / "echo-export"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "echo_export.cli"]


# ----------------------------------------------------------------------------- rung inputs
def make_data(root: Path, seed: int = 0) -> Path:
    """A small synthetic dataset: training images calibrate int8, test images verify and decode."""
    data = root / "data"
    if not (data / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "echo_train.cli", "synth", "--out", str(data), "--n-train", "64",
                        "--n-val", "4", "--n-test", "16", "--seed", str(seed)], check=True)
    return data


def make_checkpoints(rung: Rung, block_size: int, data: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A random-weight one-step student (stage dcd) and an AR model (stage ar) of the same shapes.
    Both hold the same weights (speed does not depend on their values): the AR folder links the
    student's safetensors file instead of writing a second copy."""
    import torch

    from echo_train.data.tokenizer import train_tokenizer
    from echo_train.model.checkpoint import save_checkpoint
    from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
    from echo_train.model.echo_model import EchoModel
    from echo_train.stages.common import load_split

    dcd, ar = out / "ckpt-dcd", out / "ckpt-ar"
    if (dcd / "model.safetensors").is_file() and (ar / "model.safetensors").is_file():
        return dcd, ar
    tok = train_tokenizer([s.report for s in load_split(data, "train")], vocab_size=1024)
    lm = LMConfig(**{**rung.lm, "vocab_size": max(rung.lm.get("vocab_size", 0), tok.vocab_size)})
    cfg = EchoConfig(lm=lm, vision=VisionConfig(**rung.vision), stage="dcd", block_size=block_size,
                     max_response_tokens=128)
    torch.manual_seed(seed)
    t = time.perf_counter()
    model = EchoModel(cfg)  # the library's own initialisation; at 0.5B a few seconds
    model.eval()
    print(f"[scale] {rung.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"random init {time.perf_counter() - t:.0f} s", flush=True)
    save_checkpoint(dcd, model, tok)
    cfg_ar = EchoConfig.from_dict({**cfg.to_dict(), "stage": "ar"})
    ar_tmp = out / "ckpt-ar.saving"
    shutil.rmtree(ar_tmp, ignore_errors=True)
    ar_tmp.mkdir(parents=True)
    cfg_ar.save(ar_tmp / "config.json")
    os.link(dcd / "model.safetensors", ar_tmp / "model.safetensors")
    shutil.copyfile(dcd / "tokenizer.json", ar_tmp / "tokenizer.json")
    shutil.rmtree(ar, ignore_errors=True)
    ar_tmp.rename(ar)
    return dcd, ar


# ----------------------------------------------------------------------------- build and runtime
def run_build(rung: Rung, cfg: ScaleConfig, dcd: Path, ar: Path, data: Path, out: Path) -> dict:
    """`echo-export build` in a subprocess; its --summary-json plus the wall time."""
    summary = out / "build.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    cmd = _echo_export() + [
        "build", "--ckpt", str(dcd), "--ar-ckpt", str(ar), "--out", str(out / "engine"),
        "--precision", cfg.precisions or rung.precisions, "--batch-sizes", cfg.batch_sizes or rung.batch_sizes,
        "--calib-size", str(cfg.calib_size), "--verify-n", str(cfg.verify_n), "--max-new-tokens", str(cfg.max_new_tokens),
        "--data", str(data), "--force", "--summary-json", str(summary.with_suffix(".tmp"))]
    print("[scale] $ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(out / "build.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
        for line in p.stdout:
            log.write(line)
            print("   " + line, end="", flush=True)
        rc = p.wait()
    if rc != 0:
        raise SystemExit(f"[scale] {rung.name}: echo-export build failed (exit {rc}); see {out / 'build.log'}")
    s = json.loads(summary.with_suffix(".tmp").read_text())
    s["wall_s"] = time.perf_counter() - t
    summary.with_suffix(".tmp").unlink()
    summary.write_text(json.dumps(s, indent=2))
    return s


def runtime_probe(engine: Path, precision: str, images: list[str], max_new: int, threads: int, repeats: int) -> dict:
    """In its own process (torch never imported): RSS of the fused runtime (vision_prefill +
    block_step of one precision), the decode-only tokens/s of the one-step and AR loops, and the
    isolated t(1) / t(2B) of ar_step / block_step (fp32 cache buffers: fp32 and int8 engines)."""
    from runtime import precisions
    from runtime.engine import EchoRuntime

    res: dict[str, Any] = {"precision": precision, "rss_baseline_mb": status_mb("VmRSS")}
    t = time.perf_counter()
    rt = EchoRuntime(engine, precision=precision, batch_size=1, threads=threads, mode="fused")
    res["load_s"] = time.perf_counter() - t
    res["rss_loaded_mb"] = status_mb("VmRSS")
    m = rt.manifest
    lm = (m.model_config or {}).get("lm", {})
    item = 2 if precision == "fp16" else 4
    res["kv_cache_bytes"] = 2 * lm["num_hidden_layers"] * lm["num_key_value_heads"] * m.capacity * lm["head_dim"] * item
    res["weights_bytes"] = (engine / f"weights.{precision}.bin").stat().st_size
    for mode in ("fused", "ar"):
        reps = rt.generate(images, max_new_tokens=max_new, mode=mode)
        bad = [r.error for r in reps if not r.ok]
        if bad:
            raise RuntimeError(f"{mode}: {bad[0]}")
        toks = sum(len(r.tokens) for r in reps)
        after = sum(r.timings["decode"] - r.timings["prefill"] for r in reps)
        res[mode] = {"tokens": toks, "decode_s": after, "decode_tokens_per_s": toks / after if after else None,
                     "prefill_ms": 1e3 * float(np.mean([r.timings["prefill"] for r in reps])),
                     "passes_per_report": float(np.mean([r.forward_passes for r in reps])),
                     "distinct_tokens": len({t for r in reps for t in r.tokens})}
        if mode == "fused":
            res["rss_fused_run_mb"] = status_mb("VmRSS")
            res["hwm_fused_run_mb"] = status_mb("VmHWM")
    res["achieved_dcd_vs_ar_decode_only"] = res["fused"]["decode_tokens_per_s"] / res["ar"]["decode_tokens_per_s"]
    del rt  # its sessions and packed weights go before the timing sessions open (1.5B: 6.5 GB each)
    gc.collect()
    if precisions.get(precision).cpu_memory_factor <= 1:  # not fp16: its CPU sessions fold an fp32 copy each
        from benchmarks.ideal import ort_pass_times

        B = m.block_size
        pt = ort_pass_times(engine, precision, [1, 2 * B], images[0], threads, repeats=repeats)
        t1, t2 = pt["t"][1], pt["t"][2 * B]
        res["t1_ms"], res["t2B_ms"], res["ideal"] = 1e3 * t1, 1e3 * t2, B * t1 / t2
        res["achieved_over_ideal"] = res["achieved_dcd_vs_ar_decode_only"] / res["ideal"]
        res["roofline"] = _roofline(engine, m, precision, lm, pt["cache_len"], {1: t1, 2 * B: t2}, threads)
    return res


def _roofline(engine: Path, m, precision: str, lm: dict, cache_len: int, times: dict[int, float], threads: int) -> dict:
    """Each timed pass beside its memory-bandwidth roofline (benchmarks/roofline.py)."""
    from benchmarks import roofline
    from runtime import graph_io as gio
    from runtime.manifest import resolve_graph

    bw = roofline.stream_copy_bandwidth(threads)
    kv = roofline.kv_read_bytes(lm["num_hidden_layers"], lm["num_key_value_heads"], lm["head_dim"], cache_len)
    out: dict[str, Any] = {"stream_copy_bytes_per_s": bw, "threads": threads, "cache_len": cache_len}
    for T, role in ((1, gio.AR_STEP), (2 * m.block_size, gio.BLOCK_STEP)):
        w = roofline.pass_weight_bytes(engine / resolve_graph(m, role, precision, 1), T)
        out[f"t{T}"] = {**roofline.roofline(w["bytes"], kv, bw, times.get(T)), **w}
    return out


def probe(engine: Path, precision: str, images: list[str], cfg: ScaleConfig, out: Path) -> dict:
    f = out / f"runtime.{precision}.json"
    if f.is_file():
        return json.loads(f.read_text())
    cmd = [sys.executable, "-m", "benchmarks.scale", "--probe", str(engine), "--probe-precision", precision,
           "--max-new-tokens", str(cfg.max_new_tokens), "--threads", str(cfg.threads),
           "--pass-repeats", str(cfg.pass_repeats), "--probe-out", str(f), *images]
    print(f"[scale] runtime probe {precision}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
    return json.loads(f.read_text())


def run_rung(name: str, cfg: ScaleConfig) -> dict:
    from echo_train.stages.common import load_split

    rung = RUNGS[name]
    if rung.big and not cfg.allow_7b:
        raise SystemExit(f"[scale] {name} needs a bigger machine (see RUNGS); pass --allow-7b to run it anyway")
    out = cfg.work / name
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(cfg.work)
    t = time.perf_counter()
    dcd, ar = make_checkpoints(rung, cfg.block_size, data, out)
    ckpt_s = time.perf_counter() - t
    build = run_build(rung, cfg, dcd, ar, data, out)
    engine = out / "engine"
    verify = json.loads((engine / "verify.json").read_text())
    images = [s.image_paths[0] for s in load_split(data, "test", cfg.n_reports)]
    runtime = {p: probe(engine, p, images, cfg, out) for p in build["precisions"]}
    cfg_json = json.loads((dcd / "config.json").read_text())
    from echo_train.model.safetensors_stream import read_header

    # from the header: an imported checkpoint keeps its source dtype (bf16), so bytes / 4 would not do
    n_params = sum(e.numel for e in read_header(dcd / "model.safetensors").values())
    row = {"rung": name, "note": rung.note, "parameters": n_params, "config": cfg_json, "checkpoint_s": ckpt_s,
           "build": build, "runtime": runtime,
           "verify": {k: {kk: v.get(kk) for kk in ("identical", "token_agreement", "per_pass_token_agreement", "passes")}
                      for k, v in verify["variants"].items()},
           "verify_n_images": verify.get("n_images")}
    (out / "row.json").write_text(json.dumps(row, indent=2))
    return row


# ----------------------------------------------------------------------------- outputs
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _build_peak(b: dict) -> int:
    """The build's peak RSS: its largest phase peak (older summaries report the last phase's as the whole)."""
    return max([b["process_peak_rss_bytes"], *(v["peak_rss_bytes"] for v in b["phases"].values())])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Scale ladder: random-weight ECHO models at real backbone shapes", "",
             f"Machine: {meta['machine'].get('cpu', '?')}, {meta['machine'].get('cpu_count', '?')} cores; "
             f"{meta['threads']} threads. Command: `{meta['command']}`. Block size {meta['block_size']}, reports of "
             f"{meta['max_new_tokens']} tokens (random weights; EOS rarely written), fp32 tokens checked against the "
             "PyTorch reference by the build itself (on the images counted in the last column).", "",
             "## Build", "",
             "| rung | parameters | precisions / batch | build time | peak RSS | weight bytes (sum) | engine folder | folder / weights | fp32 = PyTorch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["build"]
        w = sum(b["weights_bytes"].values())
        fp32 = [v["identical"] for k, v in r["verify"].items() if ".fp32." in k]
        fp32_ok = ("yes" if all(fp32) else "NO") if fp32 else "no fp32 built"  # all([]) is True: say so
        lines.append(f"| {r['rung']} | {r['parameters'] / 1e6:.0f}M | {','.join(b['precisions'])} / {','.join(map(str, b['batch_sizes']))} "
                     f"| {b['wall_s'] / 60:.1f} min | {_build_peak(b) / 1e9:.1f} GB | {_gb(w)} | "
                     f"{_gb(b['folder_bytes'])} | {b['folder_bytes'] / w:.2f}x | "
                     f"{fp32_ok} ({r['verify_n_images']} images) |")
    lines += ["", "Peak RSS and seconds per build phase:", ""]
    for r in rows:
        ph = r["build"]["phases"]
        lines.append(f"- {r['rung']}: " + ", ".join(f"{k} {v['seconds']:.0f} s / {v['peak_rss_bytes'] / 1e9:.1f} GB"
                                                     for k, v in ph.items()))
    lines += ["", "## Runtime (onnxruntime CPU, batch 1)", "",
              "| rung | precision | RSS after 3 reports | weights + KV cache | RSS / (weights + KV) | peak RSS (map pages incl.) | t(1) ms | t(2B) ms | ideal B·t(1)/t(2B) | achieved DCD/AR decode-only | achieved / ideal |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p, x in r["runtime"].items():
            need = x["weights_bytes"] + x["kv_cache_bytes"]
            rss, peak = x["rss_fused_run_mb"] * 2**20, x["hwm_fused_run_mb"] * 2**20
            fmt = lambda k, f="{:.2f}": f.format(x[k]) if x.get(k) is not None else "–"  # noqa: E731
            lines.append(f"| {r['rung']} | {p} | {_gb(rss)} | {_gb(need)} | {rss / need:.2f}x | {_gb(peak)} | {fmt('t1_ms')} | "
                         f"{fmt('t2B_ms')} | {fmt('ideal')}x | {x['achieved_dcd_vs_ar_decode_only']:.2f}x | "
                         f"{fmt('achieved_over_ideal')} |")
    lines += ["", "RSS is the runtime process's resident set after loading vision_prefill + block_step and decoding "
              f"{meta['n_reports']} reports, interpreter and onnxruntime included; the peak column also counts the "
              "weights file's mapped pages while onnxruntime packs from them (page cache, shared and reclaimable; "
              "the runtime drops them from the process once the sessions are made). t(1), t(2B): one ar_step / "
              "block_step session run, isolated (benchmarks/ideal.py); achieved: the runtime's decode loops, "
              "decode phase only (tokens / seconds after prefill), one-step over AR. fp16 has no ideal column: on "
              "a CPU onnxruntime runs fp16 through casts (it is for GPUs)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [(r["rung"], r["runtime"]["fp32"]) for r in rows if "fp32" in r["runtime"] and r["runtime"]["fp32"].get("ideal")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(pts))
    ax.bar(x - 0.2, [p["ideal"] for _, p in pts], 0.4, label="ideal B·t(1)/t(2B)")
    ax.bar(x + 0.2, [p["achieved_dcd_vs_ar_decode_only"] for _, p in pts], 0.4, label="achieved (runtime loops)")
    ax.set_xticks(x, [n for n, _ in pts])
    ax.set_ylabel("one-step speed-up over AR")
    ax.set_title("onnxruntime fp32, batch 1, decode phase")
    ax.legend()
    fig.tight_layout()
    f = out / "scale.png"
    fig.savefig(f, dpi=110)
    return f


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="rungs: " + "; ".join(f"{r.name} ({r.note})" for r in RUNGS.values()))
    d = ScaleConfig()
    ap.add_argument("--rungs", default=",".join(d.rungs), help="comma-separated rung names")
    ap.add_argument("--precisions", default=None, help="override every rung's precisions (e.g. fp32)")
    ap.add_argument("--batch-sizes", default=None, help="override every rung's batch sizes (e.g. 1)")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--verify-n", type=int, default=d.verify_n)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--pass-repeats", type=int, default=d.pass_repeats)
    ap.add_argument("--allow-7b", action="store_true", help="run the 7B rung (needs >= 64 GB memory, ~100 GB disk)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=WORK,
                    help="folder for the rungs' checkpoints, engines and logs (a rung whose build.json exists there is not rebuilt)")
    # internal: the runtime probe, run in its own process
    ap.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--probe-precision", help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("images", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.probe:
        res = runtime_probe(a.probe, a.probe_precision, a.images, a.max_new_tokens, a.threads, a.pass_repeats)
        a.probe_out.write_text(json.dumps(res, indent=2))
        return
    cfg = ScaleConfig(rungs=[r.strip() for r in a.rungs.split(",") if r.strip()], precisions=a.precisions,
                      batch_sizes=a.batch_sizes, max_new_tokens=a.max_new_tokens, verify_n=a.verify_n,
                      threads=a.threads, pass_repeats=a.pass_repeats, allow_7b=a.allow_7b, work=a.work)
    unknown = [r for r in cfg.rungs if r not in RUNGS]
    if unknown:
        raise SystemExit(f"unknown rung(s) {unknown}; choose from {list(RUNGS)}")
    from benchmarks.sysinfo import library_versions, machine_info

    rows = []
    for name in cfg.rungs:
        print(f"\n=== rung {name}: {RUNGS[name].note} ===", flush=True)
        rows.append(run_rung(name, cfg))
    meta = {"machine": machine_info(), "versions": library_versions(), "threads": cfg.threads,
            "command": "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "block_size": cfg.block_size, "max_new_tokens": cfg.max_new_tokens, "verify_n": cfg.verify_n,
            "n_reports": cfg.n_reports, "config": {**asdict(cfg), "work": str(cfg.work)}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"meta": meta, "rungs": rows}, indent=2))
    (a.out / "results.md").write_text(markdown(rows, meta))
    plot(rows, a.out)
    print("\n" + markdown(rows, meta))


if __name__ == "__main__":
    main()
