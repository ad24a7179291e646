"""The build's memory estimate for the full Qwen2.5-VL-7B shapes, from a header-only stand-in
model.safetensors (the 7B tensor list in bf16; the data region is a sparse hole: nothing written
or read). Usage: python plan7b.py DIR"""
import json, math, os, struct, sys
from pathlib import Path
from benchmarks.random_qwen_vl import QWEN_VL_SPECIALS, qwen_vl_config, sizes, tensor_shapes
from echo_export import memory_plan

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
s = sizes("7b")
ids = {t: i for i, t in enumerate(QWEN_VL_SPECIALS)}
shapes = tensor_shapes(qwen_vl_config(s["text"], s["vision"], ids, s["tie"]))
header, pos = {}, 0
for name, shape in shapes:
    n = math.prod(shape) * 2
    header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
    pos += n
h = json.dumps(header).encode(); h += b" " * (-len(h) % 8)
with open(out / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h); f.truncate(8 + len(h) + pos)
for prec, stream in ((["fp32", "fp16"], False), (["fp16"], True)):
    plan = memory_plan.plan_build(out, prec, stream, verify=True)
    print(f"--precision {','.join(prec) if not stream else 'fp16'}: {plan.n_params / 1e9:.2f}B parameters, "
          f"{plan.stored_bytes / 1e9:.1f} GB {plan.stored_dtype}")
    print("\n".join(plan.lines()))
    for p, why in plan.not_verified.items():
        print(f"  {p} not verified: {why}")
    print("  refusal:", memory_plan.refusal(plan, prec, stream))
(out / "model.safetensors").unlink()
