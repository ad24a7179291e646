"""The matmul floor of a decoder pass on this CPU: a Qwen2.5 decoder's projections alone, as
onnxruntime MatMulNBits (int4/int8w's kernel) or DynamicQuantizeMatMul (int8dyn's), at 1 row (an
AR step) and 2B rows (a fused one-step pass), with the projections separate (as our graphs have
them) or packed (q/k/v in one, gate/up in one, as onnxruntime-genai's builder writes them).
Random weights: speed does not depend on their values.

    python -m benchmarks.matmul_floor --size 0.5b --rows 1,16 --threads 2 --kernel nbits,dynamic

What the rest of a pass costs is the pass's time (benchmarks/ideal.py) minus this.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import click
import numpy as np

SHAPES = {  # hidden, intermediate, layers, query heads, kv heads, head dim, vocab (Qwen2.5 text decoders)
    "0.5b": (896, 4864, 24, 14, 2, 64, 151936),
    "1.5b": (1536, 8960, 28, 12, 2, 128, 151936),
    "3b": (2048, 11008, 36, 16, 2, 128, 151936),
    "7b": (3584, 18944, 28, 28, 4, 128, 152064),
    "tiny": (64, 128, 2, 4, 2, 16, 100),  # for tests
}


@dataclass(frozen=True)
class FloorGraph:
    size: str
    packed: bool
    bits: int = 4
    block: int = 32
    lm_head: bool = True
    kernel: str = "nbits"  # "dynamic": DynamicQuantizeMatMul with int8 weights per column (bits unused)

    def build(self) -> bytes:
        """One ONNX model: every layer's projections (x -> q,k,v -> o; x -> gate,up -> down), chained
        through a residual so nothing is dead code, then the lm_head."""
        from onnx import TensorProto, helper, numpy_helper

        d, ff, L, nq, nkv, dh, vocab = SHAPES[self.size]
        rng = np.random.default_rng(0)
        inits, nodes = [], []

        def mnb(name: str, inp: str, K: int, N: int) -> str:
            if self.kernel == "dynamic":
                w8 = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
                sc = (rng.random(N, dtype=np.float32) * 1e-3).astype(np.float32)
                inits.extend([numpy_helper.from_array(w8, name + ".w"), numpy_helper.from_array(sc, name + ".s")])
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [inp, name + ".w", name + ".s"], [name],
                                              domain="com.microsoft"))
                return name
            nb = K // self.block
            w = rng.integers(0, 255, size=(N, nb, self.block * self.bits // 8), dtype=np.uint8)
            sc = (rng.random(N * nb, dtype=np.float32) * 1e-3).astype(np.float32)
            inits.extend([numpy_helper.from_array(w, name + ".w"), numpy_helper.from_array(sc, name + ".s")])
            nodes.append(helper.make_node("MatMulNBits", [inp, name + ".w", name + ".s"], [name], domain="com.microsoft",
                                          K=K, N=N, bits=self.bits, block_size=self.block, accuracy_level=4))
            return name

        def split(name: str, inp: str, sizes: list[int]) -> list[str]:
            inits.append(numpy_helper.from_array(np.array(sizes, np.int64), name + ".sizes"))
            outs = [f"{name}.{i}" for i in range(len(sizes))]
            nodes.append(helper.make_node("Split", [inp, name + ".sizes"], outs, axis=-1))
            return outs

        x = "x"
        for layer in range(L):
            p = f"l{layer}"
            if self.packed:
                q, k, v = split(p + ".qkv_split", mnb(p + ".qkv", x, d, (nq + 2 * nkv) * dh), [nq * dh, nkv * dh, nkv * dh])
                g, u = split(p + ".gu_split", mnb(p + ".gu", x, d, 2 * ff), [ff, ff])
            else:
                q, k, v = (mnb(f"{p}.{n}", x, d, w * dh) for n, w in (("q", nq), ("k", nkv), ("v", nkv)))
                g, u = mnb(p + ".gate", x, d, ff), mnb(p + ".up", x, d, ff)
            o = mnb(p + ".o", q, nq * dh, d)
            nodes.append(helper.make_node("Mul", [g, u], [p + ".h"]))
            down = mnb(p + ".down", p + ".h", ff, d)
            for n in (k, v):  # keep k and v live
                nodes.append(helper.make_node("ReduceSum", [n], [n + ".sum"], keepdims=1))
                nodes.append(helper.make_node("Mul", [o, n + ".sum"], [o + "." + n]))
                o = o + "." + n
            nodes.append(helper.make_node("Add", [x, o], [p + ".a"]))
            nodes.append(helper.make_node("Add", [p + ".a", down], [p + ".out"]))
            x = p + ".out"
        out = mnb("lm_head", x, d, vocab) if self.lm_head else x
        graph = helper.make_graph(nodes, "matmul_floor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", d])],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
        return model.SerializeToString()


def time_floor(graphs: dict[str, FloorGraph], rows: int, threads: int, rounds: int = 7, runs: int = 20) -> dict[str, float]:
    """Median ms of one run per graph, the graphs alternating round by round (shared machine drift)."""
    import onnxruntime as ort

    sessions = {}
    for name, g in graphs.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(g.build(), so, providers=["CPUExecutionProvider"])
    d = SHAPES[next(iter(graphs.values())).size][0]
    feed = {"x": (np.random.default_rng(1).standard_normal((rows, d)) * 0.01).astype(np.float32)}
    times: dict[str, list[float]] = {n: [] for n in graphs}
    for _ in range(rounds):
        for name, s in sessions.items():
            s.run(None, feed)
            t = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            times[name].append((time.perf_counter() - t) / runs * 1e3)
    return {n: float(np.median(v)) for n, v in times.items()}


@click.command()
@click.option("--size", type=click.Choice(sorted(SHAPES)), default="0.5b", show_default=True)
@click.option("--rows", default="1,16", show_default=True, help="rows per pass: 1 = an AR step, 2B = a fused one-step pass")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True, help="MatMulNBits' weight width")
@click.option("--kernel", "kernels", default="nbits", show_default=True,
              help="comma list: nbits (MatMulNBits: int4, int8w) and/or dynamic (DynamicQuantizeMatMul: int8dyn)")
@click.option("--threads", type=int, default=2, show_default=True)
def main(size: str, rows: str, bits: str, kernels: str, threads: int) -> None:
    """Milliseconds of a decoder pass's weight matmuls alone (with the lm_head), projections separate and packed."""
    names = [k.strip() for k in kernels.split(",") if k.strip()]
    bad = sorted(set(names) - {"nbits", "dynamic"})
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or '(none)'}: choose from nbits, dynamic", param_hint="--kernel")
    graphs = {f"{k} {p}": FloorGraph(size, packed=p == "packed", bits=int(bits), kernel=k)
              for k in names for p in ("separate", "packed")}
    for r in (int(x) for x in rows.split(",")):
        t = time_floor(graphs, r, threads)
        for k in names:
            label = f"int{bits} MatMulNBits" if k == "nbits" else "int8 DynamicQuantizeMatMul"
            print(f"{size} {label} rows {r:3d}: separate {t[k + ' separate']:.2f} ms, packed {t[k + ' packed']:.2f} ms "
                  f"({threads} threads)", flush=True)


if __name__ == "__main__":
    main()
