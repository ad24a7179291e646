"""int4 choices measured against fp32 on one engine folder: method, block size, zero points, vision
tower, lm_head, accuracy_level.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/int4/variants.py ENGINE_DIR DATA_DIR --out variants.md

ENGINE_DIR holds the fp32 graphs (batch 1) of `echo-export build`; DATA_DIR a dataset whose train
images calibrate AWQ and whose test (else val) images are decoded. The fp32 graphs decode every
test image once, recording each block-step pass's inputs; each variant's int4 graphs (written to a
scratch copy of the folder by echo_export.int4.to_int4, as the build does) are then run on exactly
those inputs:
  per-pass %   share of block tokens equal to fp32's on fp32's own pass inputs (verify.py's measure)
  prefill KV   relative L2 error of the prefill's KV cache (every layer's keys and values) vs fp32
  conf |d|     largest difference of the block step's confidence (top softmax probability) vs fp32
  int4 MB      bytes of the variant's weights file (each tensor once; fp32 tensors it keeps included)
  step ms      median block-step time, alternating with fp32 in one process
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

VARIANTS = {  # name -> int4 options (echo_export.int4.Int4Options)
    "rtn b32 sym": dict(method="rtn", block_size=32),
    "awq b32 sym (default)": dict(method="awq", block_size=32),
    "awq b64 sym": dict(method="awq", block_size=64),
    "awq b128 sym": dict(method="awq", block_size=128),
    "rtn b128 sym": dict(method="rtn", block_size=128),
    "awq b32 asym": dict(method="awq", block_size=32, symmetric=False),
    "awq b32 sym + vision": dict(method="awq", block_size=32, vision=True),
    "awq b32 sym + lm_head": dict(method="awq", block_size=32, lm_head=True),
    "awq b32 sym, accuracy_level 1": dict(method="awq", block_size=32, accuracy_level=1),
}


def _record(engine: Path, images: list[np.ndarray], prefix: np.ndarray, man: dict):
    """fp32 decode of every image: (prefill feeds, prefill KV, step feeds, step outputs)."""
    from echo_export.decode_loop import LoopSettings, decode, ort_runner, prefill_feeds
    from runtime.decode_mode import DecodeMode

    lm = man["model_config"]["lm"]
    pre, step = ort_runner(engine / "vision_prefill.fp32.b1.onnx"), ort_runner(engine / "block_step.fp32.b1.onnx")
    mode = DecodeMode.of("fused", prefix.size, man["block_size"])
    settings = LoopSettings(man["capacity"], lm["num_hidden_layers"], lm["num_key_value_heads"], lm["head_dim"],
                            man["mask_id"], man["eos_id"], man["model_config"]["max_response_tokens"])
    pre_feeds, kv, step_feeds = [], [], []
    for px in images:
        f = prefill_feeds(px[None].astype(np.float32), prefix[None])
        pre_feeds.append(f)
        kv.append(pre(f))
        decode(mode, pre, step, f["prefix_ids"], f, settings,
               on_step=lambda s: step_feeds.append({k: v.copy() for k, v in s.items()}))
    return pre_feeds, kv, step_feeds, [step(f) for f in step_feeds]


def _variant(work: Path, name: str, opts: dict, calib: dict, rec, level_auto: int) -> dict:
    from echo_export import int4
    from echo_export.decode_loop import ort_runner
    from echo_export.external_weights import WeightsFile
    from echo_export.timing import alternating_run_medians

    o = int4.Int4Options(**opts)
    level = level_auto if o.accuracy_level is None else o.accuracy_level
    plan, tag = int4.WeightPlan(o), name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    for role in ("vision_prefill", "block_step"):  # one scaling per weight over both graphs, as the build
        if o.method == "awq":
            model = int4.onnx.load(str(work / f"{role}.fp32.b1.onnx"), load_external_data=False)
            nodes = {n.name: n for n in model.graph.node}
            inputs = {int4.weight_key(int4.weight_kn(model, wm, work)): nodes[wm.node].input[0]
                      for wm in int4.weight_matmuls(model, int4.quantised_parts(o))}
            plan.add_rows(int4.activation_rows(work / f"{role}.fp32.b1.onnx", calib[role], inputs, 32, o.calib_rows))
    store = WeightsFile(work, f"weights.{tag}.bin")
    for role in ("vision_prefill", "block_step"):
        int4.to_int4(work / f"{role}.fp32.b1.onnx", work / f"{role}.{tag}.onnx", plan, level, store)
    store.close()
    pre_feeds, kv, step_feeds, step_out = rec
    pre, step = ort_runner(work / f"vision_prefill.{tag}.onnx"), ort_runner(work / f"block_step.{tag}.onnx")
    num = den = 0.0
    for f, ref in zip(pre_feeds, kv):
        got = pre(f)
        num += sum(float(np.square(g - r).sum()) for g, r in zip(got, ref))
        den += sum(float(np.square(r).sum()) for r in ref)
    same = total = 0
    conf = 0.0
    for f, ref in zip(step_feeds, step_out):
        got = step(f)
        same, total = same + int((got[0] == ref[0]).sum()), total + ref[0].size
        conf = max(conf, float(np.abs(got[1] - ref[1]).max()))
    fp32_step = ort_runner(work / "block_step.fp32.b1.onnx")
    ms = alternating_run_medians({"fp32": lambda: fp32_step(step_feeds[0]), "int4": lambda: step(step_feeds[0])}, 30, warmup=5)
    return {"variant": name, "options": opts, "accuracy_level": level, "per_pass": same / total,
            "prefill_kv_rel": float(np.sqrt(num / den)), "conf_max_diff": conf,
            "weights_mb": (work / f"weights.{tag}.bin").stat().st_size / 1e6,
            "step_ms": 1e3 * ms["int4"], "fp32_step_ms": 1e3 * ms["fp32"], "awq_alphas": sorted(plan.alphas.values())}


def main(engine: Path, data: Path, out: Path, n_images: int, only: list[str]) -> None:
    from echo_export import int4
    from echo_train.data.loaders import load_studies
    from runtime.preprocess import preprocess_image
    from runtime.text import ReportTokenizer

    man = json.loads((engine / "manifest.json").read_text())
    S, mode = man["image_size"], man["model_config"]["vision"].get("preprocess", "echo")
    tok = ReportTokenizer.from_file(engine / "tokenizer.json")
    prefix = np.array(tok.prefix_ids((S // man["model_config"]["vision"]["patch_size"]) ** 2), np.int64)
    split = lambda s: [st.image_paths[0] for st in load_studies(data, split=s).studies if st.image_paths]  # noqa: E731
    test = (split("test") or split("val"))[:n_images]
    rec = _record(engine, [preprocess_image(p, S, mode) for p in test], prefix, man)
    train = [preprocess_image(p, S, mode) for p in split("train")[:8]]
    cal_pre, _, cal_step, _ = _record(engine, train, prefix, man)
    rows = []
    with tempfile.TemporaryDirectory(prefix="int4-variants.") as d:
        work = Path(d)
        for f in engine.iterdir():
            if f.name.startswith(("vision_prefill.fp32", "block_step.fp32", "weights.fp32")):
                shutil.copy(f, work / f.name)
        for name, opts in VARIANTS.items():
            if only and not any(o in name for o in only):
                continue
            rows.append(_variant(work, name, opts, {"vision_prefill": cal_pre, "block_step": cal_step}, rec,
                                 int4.choose_accuracy_level()))
            r = rows[-1]
            print(f"{name:<32} per-pass {100 * r['per_pass']:6.2f}%  prefill KV {r['prefill_kv_rel']:.4f}  "
                  f"conf |d| {r['conf_max_diff']:.4f}  {r['weights_mb']:7.2f} MB  step {r['step_ms']:.2f} ms "
                  f"(fp32 {r['fp32_step_ms']:.2f})", flush=True)
    fp32_mb = (engine / "weights.fp32.bin").stat().st_size / 1e6
    lines = [f"engine {engine} (fp32 weights {fp32_mb:.2f} MB), {len(test)} test images, "
             f"{len(rec[2])} block-step passes; AWQ calibrated on {len(train)} train images", "",
             "| variant | acc. level | per-pass % | prefill KV rel. err | conf max abs diff | weights MB | step ms (fp32) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['accuracy_level']} | {100 * r['per_pass']:.2f} | {r['prefill_kv_rel']:.4f} | "
              f"{r['conf_max_diff']:.4f} | {r['weights_mb']:.2f} | {r['step_ms']:.2f} ({r['fp32_step_ms']:.2f}) |" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("variants.md"))
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--only", default="", help="comma list of substrings of variant names")
    a = ap.parse_args()
    main(a.engine, a.data, a.out, a.n_images, [s for s in a.only.split(",") if s])
