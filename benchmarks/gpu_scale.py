"""One-step block decoding against AR at real decoder shapes, on a GPU with CUDA graphs (issue 19).

    python -m benchmarks.gpu_scale                      # on the GPU machine: 0.5B, 1.5B, 7B; batch 1, 8; block 8, 16
    python -m benchmarks.gpu_scale --quick              # anywhere: 0.5B, batch 1, block 8, 64 tokens (CPU: eager only)
    python -m benchmarks.gpu_scale --max-seconds 420 --out $OUT/gpu_scale

Random-weight ECHO models (the Qwen2.5-0.5B / 1.5B / 7B decoder shapes of benchmarks/scale.py
with a ViT-B/16 tower in the prefill), built straight on the device in bf16 (fp32 on a CPU):
speed does not depend on the weights' values. Reports have a fixed length (EOS ignored), so DCD
and AR write the same number of tokens. Per cell (shape, batch, block size):
- prefill ms (vision tower + prefix, eager, once per report);
- decode-only tokens/s of DCD one-step and of AR, eager and with CUDA graphs
  (echo_export/cuda_graph_decode.py: every pass captured once and replayed);
- the per-pass times t(2B) of the block step and t(1) of the AR step (CUDA graph replays) and the
  ideal one-step speed-up B * t(1) / t(2B), measured in the same run;
- `transformers` generate() on the same decoder shape (Qwen2ForCausalLM, random weights, the same
  prefix length, text only), decode-only: (t(N tokens) - t(1 token)) against our AR.
Results are written after every cell (results.json, results.md), so a run stopped by its time
limit keeps what it measured; --max-seconds stops starting new shapes once it is spent.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

SHAPES = {"demo": "demo", "0.5b": "qwen2.5-0.5b", "1.5b": "qwen2.5-1.5b", "7b": "qwen2.5-7b"}  # benchmarks/scale.py RUNGS


@dataclass
class GpuScaleConfig:
    shapes: list[str] = field(default_factory=lambda: ["0.5b", "1.5b", "7b"])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    blocks: list[int] = field(default_factory=lambda: [8, 16])
    tokens: int = 256
    pass_repeats: int = 20  # replays per per-pass time
    hf: bool = True
    max_seconds: float = 420.0
    out: Path = Path("benchmarks/out/gpu_scale")
    device: Optional[str] = None  # default: cuda when available


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _seconds(fn: Callable[[], Any], dev: torch.device, repeats: int = 1) -> float:
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / repeats


def build_model(shape: str, dev: torch.device, dtype: torch.dtype):
    """A random-weight ECHO model at the shape, made on the device in its dtype (no CPU copy), and a
    small report tokenizer (its ids fit any of these vocabularies)."""
    from benchmarks.random_qwen_vl import report_corpus
    from benchmarks.scale import RUNGS
    from echo_train.data.tokenizer import train_tokenizer
    from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
    from echo_train.model.echo_model import EchoModel

    rung = RUNGS[SHAPES[shape]]
    tok = train_tokenizer(report_corpus(100), vocab_size=512)
    cfg = EchoConfig(lm=LMConfig(**rung.lm), vision=VisionConfig(**rung.vision),
                     stage="dcd", block_size=8, max_response_tokens=256)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = EchoModel(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, tok


def hf_decoder(model, dev: torch.device, dtype: torch.dtype):
    """transformers' Qwen2ForCausalLM with the same decoder shape (random weights)."""
    import transformers

    lm = model.cfg.lm
    hf_cfg = transformers.Qwen2Config(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_key_value_heads, max_position_embeddings=lm.max_position_embeddings,
        rope_theta=lm.rope_theta, tie_word_embeddings=lm.tie_word_embeddings)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return transformers.Qwen2ForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(previous)


def hf_decode_tokens_per_s(hf, prefix_len: int, batch: int, tokens: int, dev: torch.device) -> float:
    ids = torch.randint(10, 1000, (batch, prefix_len), device=dev)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    def gen(n: int):
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    gen(2)  # warm-up
    t1, tn = _seconds(lambda: gen(1), dev), _seconds(lambda: gen(tokens), dev)
    return batch * (tokens - 1) / max(tn - t1, 1e-9)


def run_cell(model, tok, batch: int, block: int, cfg: GpuScaleConfig, dev: torch.device, dtype: torch.dtype) -> dict:
    from echo_export.cuda_graph_decode import StaticDecodeConfig, StaticDecoder

    model.cfg.block_size = block
    S = model.cfg.vision.image_size
    px = torch.rand(batch, 1, S, S, device=dev, dtype=dtype) * 2 - 1
    row: dict[str, Any] = {"batch": batch, "block": block, "tokens": cfg.tokens}
    graphs = dev.type == "cuda"
    modes = ["eager", "cuda_graphs"] if graphs else ["eager"]
    for name, decode_mode in (("dcd", "fused"), ("ar", "ar")):
        for mode in modes:
            dec = StaticDecoder(model, tok, StaticDecodeConfig(batch=batch, max_new_tokens=cfg.tokens,
                                                               cuda_graphs=mode == "cuda_graphs", stop_at_eos=False),
                                decode_mode)
            first = dec.prefill(px)
            dec.decode(first)  # warm-up (kernels, allocator)
            prefill_s = _seconds(lambda: dec.prefill(px), dev)
            first = dec.prefill(px)
            decode_s = _seconds(lambda: dec.decode(first), dev)
            res = dec.decode(first)
            row[f"{name}_{mode}"] = {"prefill_ms": 1e3 * prefill_s, "decode_s": decode_s, "passes": res.forward_passes,
                                     "tokens_per_s": batch * cfg.tokens / decode_s,
                                     "distinct_tokens": int(res.raw.unique().numel())}
            if mode == modes[-1]:
                # per-pass times of the replayed step (eager on a CPU), on its last inputs
                inputs = {k: v.clone() for k, v in dec.step.inputs.items()}
                row[f"{name}_pass_ms"] = 1e3 * _seconds(lambda: dec.step(**inputs), dev, cfg.pass_repeats)
            del dec
    best = modes[-1]
    row["pass_mode"] = best
    row["ideal"] = block * row["ar_pass_ms"] / row["dcd_pass_ms"]
    row["achieved"] = row[f"dcd_{best}"]["tokens_per_s"] / row[f"ar_{best}"]["tokens_per_s"]
    row["achieved_over_ideal"] = row["achieved"] / row["ideal"]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# DCD one-step vs AR at real decoder shapes ({meta['device_name']})", "",
             f"{meta['command']} -- torch {meta['torch']}, {meta['dtype']}, reports of {meta['tokens']} tokens "
             "(EOS ignored), decode-only tokens/s (prefill excluded); ideal = B * t(1) / t(2B) from the same run; "
             "DCD/AR and our AR / generate() with CUDA graphs where there is a GPU, eager elsewhere.", "",
             "| shape | batch | B | prefill ms | AR tok/s eager | AR tok/s graphs | DCD tok/s eager | DCD tok/s graphs | "
             "t(1) ms | t(2B) ms | ideal | DCD/AR | of ideal | our AR / generate() |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r.get('batch', '')} | {r.get('block', '')} | failed: {r['error']} |")
            continue
        g = lambda k: r.get(k, {}).get("tokens_per_s")  # noqa: E731
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        hf = r.get("hf_decode_tokens_per_s")
        best = g(f"ar_{r['pass_mode']}")
        lines.append(f"| {r['shape']} | {r['batch']} | {r['block']} | {r['dcd_eager']['prefill_ms']:.1f} | "
                     f"{f(g('ar_eager'))} | {f(g('ar_cuda_graphs'))} | {f(g('dcd_eager'))} | {f(g('dcd_cuda_graphs'))} | "
                     f"{r['ar_pass_ms']:.3f} | {r['dcd_pass_ms']:.3f} | {r['ideal']:.2f}x | {r['achieved']:.2f}x | "
                     f"{r['achieved_over_ideal']:.2f} | {'-' if not hf else f'{best / hf:.2f}x'} |")
    return "\n".join(lines) + "\n"


def run(cfg: GpuScaleConfig, command: str) -> list[dict]:
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "tokens": cfg.tokens, "device": str(dev), "config": {k: str(v) for k, v in asdict(cfg).items()},
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "CPU"}
    rows: list[dict] = []
    t_start = time.perf_counter()

    def save() -> None:
        (cfg.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (cfg.out / "results.md").write_text(markdown(rows, meta))

    for shape in cfg.shapes:
        if time.perf_counter() - t_start > cfg.max_seconds:
            print(f"[gpu_scale] --max-seconds {cfg.max_seconds:.0f} spent: {shape} not started", flush=True)
            break
        t = time.perf_counter()
        model, tok = build_model(shape, dev, dtype)
        n = sum(p.numel() for p in model.parameters())
        print(f"[gpu_scale] {shape}: {n / 1e6:.0f}M parameters on {dev} in {time.perf_counter() - t:.1f} s", flush=True)
        hf = hf_decoder(model, dev, dtype) if cfg.hf else None
        prefix_len = len(tok.prefix_ids(model.n_image_tokens))
        for batch in cfg.batches:
            hf_tps = hf_decode_tokens_per_s(hf, prefix_len, batch, cfg.tokens, dev) if hf is not None else None
            for block in cfg.blocks:
                try:
                    row = {"shape": shape, "parameters": n, **run_cell(model, tok, batch, block, cfg, dev, dtype),
                           "hf_decode_tokens_per_s": hf_tps}
                except Exception as e:  # a cell that fails (memory, capture) is a row; the rest still runs
                    row = {"shape": shape, "batch": batch, "block": block, "error": f"{type(e).__name__}: {e}"[:300]}
                rows.append(row)
                save()
                if "error" not in row:
                    print(f"[gpu_scale] {shape} b{batch} B{block}: DCD/AR {row['achieved']:.2f}x, ideal "
                          f"{row['ideal']:.2f}x ({row['achieved_over_ideal']:.2f} of it)", flush=True)
                else:
                    print(f"[gpu_scale] {shape} b{batch} B{block}: {row['error']}", flush=True)
        del model, hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    save()
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    import sys

    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_scale", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.5B, batch 1, block 8, 64 tokens (any machine)")
    ap.add_argument("--shapes", default=None, help=f"comma-separated from {', '.join(SHAPES)}")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--blocks", default=None, help="comma-separated block sizes (default 8,16)")
    ap.add_argument("--tokens", type=int, default=None, help="report length (default 256; --quick 64)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    ap.add_argument("--max-seconds", type=float, default=420.0, help="start no new shape after this many seconds")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_scale"))
    a = ap.parse_args(argv)
    cfg = GpuScaleConfig(max_seconds=a.max_seconds, out=a.out, device=a.device, hf=not a.no_hf)
    if a.quick:
        cfg.shapes, cfg.batches, cfg.blocks, cfg.tokens, cfg.pass_repeats = ["0.5b"], [1], [8], 64, 5
    if a.shapes:
        cfg.shapes = [s.strip() for s in a.shapes.split(",")]
        bad = [s for s in cfg.shapes if s not in SHAPES]
        if bad:
            raise SystemExit(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    if a.batches:
        cfg.batches = [int(x) for x in a.batches.split(",")]
    if a.blocks:
        cfg.blocks = [int(x) for x in a.blocks.split(",")]
    if a.tokens:
        cfg.tokens = a.tokens
    run(cfg, "python -m benchmarks.gpu_scale " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"[gpu_scale] {cfg.out / 'results.md'}")


if __name__ == "__main__":
    main()
