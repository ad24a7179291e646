"""benchmarks/matmul_floor.py: the projections-only graphs build, run, and pack as described."""
import onnx

from benchmarks.matmul_floor import FloorGraph, time_floor


def _ops(g: FloorGraph) -> list[onnx.NodeProto]:
    return [n for n in onnx.load_from_string(g.build()).graph.node if n.op_type == "MatMulNBits"]


def test_packed_graph_has_three_fewer_matmuls_per_layer_and_the_same_columns():
    sep, packed = _ops(FloorGraph("tiny", packed=False)), _ops(FloorGraph("tiny", packed=True))
    assert len(sep) == 2 * 7 + 1 and len(packed) == 2 * 4 + 1  # 2 layers (+ lm_head): q,k,v -> 1, gate,up -> 1
    n_of = lambda ops: sorted(sum(a.i for a in n.attribute if a.name == "N") for n in ops)  # noqa: E731
    assert sum(n_of(sep)) == sum(n_of(packed))  # the same output columns, packed
    assert max(n_of(packed)[:-1]) == 2 * 128  # gate and up in one


def test_floor_times_every_graph_at_the_rows_asked():
    t = time_floor({"a": FloorGraph("tiny", False, bits=8), "b": FloorGraph("tiny", True)}, rows=3, threads=1, rounds=1, runs=1)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())


def test_dynamic_kernel_graph_runs_with_int8_weights():
    """--kernel dynamic: every projection a DynamicQuantizeMatMul of an int8 [K, N] weight, and it runs."""
    g = FloorGraph("tiny", packed=False, kernel="dynamic")
    m = onnx.load_from_string(g.build())
    dq = [n for n in m.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    inits = {t.name: t for t in m.graph.initializer}
    assert len(dq) == 2 * 7 + 1 and not _ops(g)
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.INT8 for n in dq)
    assert time_floor({"d": g}, rows=2, threads=1, rounds=1, runs=1)["d"] > 0
