"""Runtime memory and pass time: one graph, two graphs each reading its own weights, two sharing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/shared-weights/measure.py ENGINE_DIR [--precision fp32]

Each configuration runs in a fresh process: it opens the graphs through runtime.ort_backend.OrtGraph
(1 intra-op thread), binds the same fixed inputs, runs each graph `--passes` times and reports
/proc/self/status (VmRSS, RssAnon, RssFile, VmHWM) and /proc/self/smaps_rollup (Pss: the pages a
process really holds; a page mapped twice counts once), the session load time and the median block
step. The driver prints one table and checks that every configuration's outputs are bit-identical.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

BOTH = ("vision_prefill", "block_step")
# name -> (graphs, how they are loaded)
#   own:       runtime OrtGraph, onnxruntime's default (it maps the external data itself and prepacks per session)
#   shared:    runtime OrtGraph with ort_capi.SharedWeights (the runtime default for fp32 and int8): one map, one packed copy
#   noprepack: onnxruntime Python API, session.disable_prepacking=1 (rejected: 2.3x slower)
#   pymap / pymap-prepack: onnxruntime Python API, one np.memmap of the file lent to every session with
#              add_external_initializers_from_files_in_memory + use_external_initializer_file_buffers_directly,
#              prepacking off / on (rejected: no smaller than `own`)
CONFIGS = {
    "import only": ((), "own"),
    "block_step, own weights": (("block_step",), "own"),
    "vision_prefill + block_step, own weights (onnxruntime default)": (BOTH, "own"),
    "vision_prefill + block_step, prepacking off": (BOTH, "noprepack"),
    "vision_prefill + block_step, one np.memmap lent (Python API), prepacking off": (BOTH, "pymap"),
    "vision_prefill + block_step, one np.memmap lent (Python API), prepacking on": (BOTH, "pymap-prepack"),
    "block_step, shared (C API)": (("block_step",), "shared"),
    "vision_prefill + block_step, shared (C API)": (BOTH, "shared"),
}


class _PyGraph:
    """The rejected Python-API variants: a session with IO binding over numpy arrays, like OrtGraph."""

    def __init__(self, path: Path, weights: Path, kind: str, wmap) -> None:
        import onnxruntime as ort

        from runtime.ort_backend import ORT_DTYPES

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
        if kind in ("noprepack", "pymap"):
            so.add_session_config_entry("session.disable_prepacking", "1")
        if kind.startswith("pymap"):
            so.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
            so.add_external_initializers_from_files_in_memory([weights.name], [wmap], [wmap.nbytes])
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: (tuple(i.shape), ORT_DTYPES[i.type]) for i in self.session.get_inputs()}
        self.outputs = {o.name: (tuple(o.shape), ORT_DTYPES[o.type]) for o in self.session.get_outputs()}

    def bind(self, inputs, outputs) -> None:
        import onnxruntime as ort

        self.io = self.session.io_binding()
        self._keep = []
        for group, bind in ((inputs, self.io.bind_ortvalue_input), (outputs, self.io.bind_ortvalue_output)):
            for k, a in group.items():
                v = ort.OrtValue.ortvalue_from_numpy(a)
                bind(k, v)
                self._keep.append(v)

    def run(self) -> float:
        t = time.perf_counter()
        self.session.run_with_iobinding(self.io)
        return time.perf_counter() - t


def _mem() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("Pss", "Pss_Anon", "Pss_File"):
            out[k] = int(v.split()[0]) / 1024
    return out  # MiB


def _feeds(g, rng) -> dict:
    arrs = {}
    for name, (shape, dtype) in {**g.inputs, **g.outputs}.items():
        if name in g.inputs and dtype == np.float32:
            a = rng.normal(0, 0.5, shape).astype(np.float32)
        else:
            a = np.zeros(shape, dtype)
        arrs[name] = np.ascontiguousarray(a)
    if "input_ids" in arrs:
        arrs["input_ids"][:] = rng.integers(10, 300, arrs["input_ids"].shape)
        n = arrs["input_ids"].shape[-1]
        arrs["past_len"][:] = 32
        arrs["position_ids"][:] = 32 + np.arange(n)
    if "prefix_ids" in arrs:
        arrs["prefix_ids"][:] = rng.integers(10, 300, arrs["prefix_ids"].shape)
    return arrs


def child(engine: Path, precision: str, config: str, passes: int, out: Path) -> None:
    import onnxruntime  # noqa: F401  (the baseline includes it)

    from runtime.manifest import load_manifest, resolve_graph
    from runtime.ort_backend import OrtGraph
    from runtime.ort_capi import SharedWeights

    roles, kind = CONFIGS[config]
    m = load_manifest(engine, check_hashes=False)
    weights = engine / f"weights.{precision}.bin"
    shared = SharedWeights(weights) if kind == "shared" else None
    wmap = np.memmap(weights, dtype=np.uint8, mode="r") if kind.startswith("pymap") else None
    res = {"config": config, "before": _mem()}
    t = time.perf_counter()
    graphs = {}
    for role in roles:
        path = engine / resolve_graph(m, role, precision, 1)
        if kind in ("own", "shared"):
            graphs[role] = OrtGraph(path, threads=1, providers=["CPUExecutionProvider"], shared_weights=shared)
        else:
            graphs[role] = _PyGraph(path, weights, kind, wmap)
    res["load_s"] = time.perf_counter() - t
    ctypes.CDLL(None).malloc_trim(0)  # every configuration: free heap back to the system before measuring
    res["loaded"] = _mem()
    saved = {}
    for role, g in graphs.items():
        arrs = _feeds(g, np.random.default_rng(0))
        g.bind({k: v for k, v in arrs.items() if k in g.inputs}, {k: v for k, v in arrs.items() if k in g.outputs})
        times = [g.run() for _ in range(passes)]
        res[f"{role}_ms"] = 1e3 * float(np.median(times[1:] if passes > 1 else times))
        saved.update({f"{role}/{k}": v.copy() for k, v in arrs.items() if k in g.outputs})
    res["after_runs"] = _mem()
    np.savez(out.with_suffix(".npz"), **saved)
    out.write_text(json.dumps(res))


def timing(engine: Path, precision: str, passes: int) -> None:
    """block_step with its own weights and shared, both in this process, passes alternating: the
    fair comparison of time per pass on a machine whose load changes."""
    from runtime.manifest import load_manifest, resolve_graph
    from runtime.ort_backend import OrtGraph
    from runtime.ort_capi import SharedWeights

    m = load_manifest(engine, check_hashes=False)
    path = engine / resolve_graph(m, "block_step", precision, 1)
    shared = SharedWeights(engine / f"weights.{precision}.bin")
    graphs = {"own": OrtGraph(path, threads=1, providers=["CPUExecutionProvider"]),
              "shared": OrtGraph(path, threads=1, providers=["CPUExecutionProvider"], shared_weights=shared)}
    times = {k: [] for k in graphs}
    for g in graphs.values():
        arrs = _feeds(g, np.random.default_rng(0))
        g.bind({k: v for k, v in arrs.items() if k in g.inputs}, {k: v for k, v in arrs.items() if k in g.outputs})
        g.run()
    for _ in range(passes):
        for k, g in graphs.items():
            times[k].append(g.run())
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    print(f"block_step {precision}, {passes} alternating passes, median ms: own {med['own']:.2f}, "
          f"shared {med['shared']:.2f} ({med['shared'] / med['own']:.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", type=Path)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--passes", type=int, default=30)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--timing", action="store_true", help="only the alternating block_step timing")
    a = ap.parse_args()
    if a.timing:
        return timing(a.engine, a.precision, a.passes)
    if a.child:
        return child(a.engine, a.precision, a.child, a.passes, a.out)
    import tempfile

    wbytes = (a.engine / f"weights.{a.precision}.bin").stat().st_size / 2**20
    rows, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(CONFIGS):
            out = Path(tmp) / f"c{i}.json"
            subprocess.run([sys.executable, __file__, str(a.engine), "--precision", a.precision, "--passes",
                            str(a.passes), "--child", config, "--out", str(out)], check=True)
            r = json.loads(out.read_text())
            rows.append(r)
            with np.load(out.with_suffix(".npz")) as z:
                outs[config] = {k: z[k] for k in z.files}
    base = rows[0]["after_runs"]
    print(f"weights.{a.precision}.bin: {wbytes:.0f} MiB; MiB above the 'import only' process "
          f"(VmRSS {base['VmRSS']:.0f}, Pss {base['Pss']:.0f})")
    print("| configuration | load s | VmRSS | RssAnon | RssFile | Pss | VmHWM | block step ms | prefill ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        m = r["after_runs"]
        d = {k: m[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile", "Pss", "VmHWM")}
        print(f"| {r['config']} | {r['load_s']:.2f} | {d['VmRSS']:.0f} | {d['RssAnon']:.0f} | {d['RssFile']:.0f} | "
              f"{d['Pss']:.0f} | {d['VmHWM']:.0f} | {r.get('block_step_ms', float('nan')):.2f} | "
              f"{r.get('vision_prefill_ms', float('nan')):.2f} |")
    ref = outs["vision_prefill + block_step, own weights (onnxruntime default)"]
    for config, o in outs.items():
        same = all(np.array_equal(o[k], ref[k]) for k in o if k in ref)
        print(f"outputs {'bit-identical' if same else 'DIFFER'}: {config}")
    if a.json:
        a.json.write_text(json.dumps({"weights_mib": wbytes, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
