"""Prefill time and memory against image size, for a native-resolution engine (issue 28).

    python -m benchmarks.native_prefill --engine-dir ENGINE --sizes 448x448,1024x1024,2000x2500 \
        --out benchmarks/results/native-prefill/NAME

Each size runs in a process of its own (so its peak RSS is its own): the engine is opened, one
synthetic radiograph of that size (the synthetic study generator's, resized) is reported with one
block, and the process prints its image tokens, prompt tokens, prefill seconds, and the resident
memory after opening the engine and at its peak. The table goes to OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like grey image (the synthetic benchmark's renderer) at h x w, 8-bit."""
    from PIL import Image

    from echo_train.data.synth.findings import sample_findings
    from echo_train.data.synth.render import render_study

    img, _ = render_study(sample_findings(np.random.default_rng(seed)), size=512, seed=seed)
    grey = np.clip(np.asarray(img, dtype=np.float64), 0, None)
    grey = (255 * grey / max(float(grey.max()), 1e-9)).astype(np.uint8)
    return np.asarray(Image.fromarray(grey).resize((w, h), Image.BICUBIC), dtype=np.float32)


def measure_one(engine_dir: str, size: tuple[int, int], precision: str, threads: Optional[int]) -> dict[str, Any]:
    from runtime.engine import EchoRuntime

    rt = EchoRuntime(engine_dir, precision=precision, threads=threads)
    after_load = _vm("VmRSS")
    rep = rt.generate([radiograph(*size)], max_new_tokens=rt.block_size)[0]
    if rep.error:
        raise SystemExit(rep.error)
    return {"height": size[0], "width": size[1], "image_tokens": rep.image_tokens, "prompt_tokens": rep.prompt_tokens,
            "prefill_s": rep.timings["prefill"], "rss_after_load_bytes": after_load, "peak_rss_bytes": _vm("VmHWM"),
            "precision": precision}


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| image (h x w) | image tokens | prompt tokens | prefill s | RSS after load GB | peak RSS GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['height']} x {r['width']} | {r['image_tokens']} | {r['prompt_tokens']} | "
                     f"{r['prefill_s']:.2f} | {r['rss_after_load_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--sizes", default="448x448,1024x1024,2000x2500", help="HxW,HxW,...")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single size, in this process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(a.engine_dir, _sizes(a.one)[0], a.precision, a.threads)))
        return 0
    rows = []
    for h, w in _sizes(a.sizes):
        cmd = [sys.executable, "-m", "benchmarks.native_prefill", "--engine-dir", a.engine_dir, "--one", f"{h}x{w}",
               "--precision", a.precision] + (["--threads", str(a.threads)] if a.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{h}x{w}: failed ({out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    md = f"Engine: {a.engine_dir}, {a.precision}, onnxruntime CPU\n\n{table(rows)}\n"
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".md").write_text(md)
        Path(a.out + ".json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
