"""7B int4 runtime probe: RSS, decode tokens/s (fused), t(2B) and its roofline. No AR graphs in this
engine (the AR family's 7B PyTorch reference did not fit the session), so no t(1)."""
import json, sys, time
from pathlib import Path
import numpy as np
from benchmarks.sysinfo import status_mb as _status_mb
from benchmarks import roofline
from benchmarks.ideal import ort_pass_times
from runtime.engine import EchoRuntime
from runtime.manifest import resolve_graph
from runtime import graph_io as gio

engine, out = Path(sys.argv[1]), Path(sys.argv[2])
images = sys.argv[3:]
res = {"precision": "int4", "rss_baseline_mb": _status_mb("VmRSS")}
t = time.perf_counter()
rt = EchoRuntime(engine, precision="int4", batch_size=1, threads=2, mode="fused")
res["load_s"] = time.perf_counter() - t
res["rss_loaded_mb"] = _status_mb("VmRSS")
reps = rt.generate(images, max_new_tokens=16, mode="fused")
assert all(r.ok for r in reps), [r.error for r in reps]
toks = sum(len(r.tokens) for r in reps)
after = sum(r.timings["decode"] - r.timings["prefill"] for r in reps)
res["fused"] = {"tokens": toks, "decode_s": after, "decode_tokens_per_s": toks / after,
                "prefill_s": float(np.mean([r.timings["prefill"] for r in reps])),
                "passes_per_report": float(np.mean([r.forward_passes for r in reps])),
                "block_pass_s": [float(np.median(r.timings["blocks"])) for r in reps]}
res["rss_after_reports_mb"] = _status_mb("VmRSS")
res["hwm_mb"] = _status_mb("VmHWM")
m = rt.manifest
lm = m.model_config["lm"]
del rt
B = m.block_size
pt = ort_pass_times(engine, "int4", [2 * B], images[0], 2, repeats=5)
t2 = pt["t"][2 * B]
res["t2B_ms"] = 1e3 * t2
bw = roofline.stream_copy_bandwidth(2)
kv = roofline.kv_read_bytes(lm["num_hidden_layers"], lm["num_key_value_heads"], lm["head_dim"], pt["cache_len"])
w = roofline.pass_weight_bytes(engine / resolve_graph(m, gio.BLOCK_STEP, "int4", 1), 2 * B)
res["roofline"] = {"stream_copy_bytes_per_s": bw, "cache_len": pt["cache_len"], "t16": {**roofline.roofline(w["bytes"], kv, bw, t2), **w}}
res["loadavg"] = open("/proc/loadavg").read().split()[:3]
out.write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
