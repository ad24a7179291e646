"""Weights that never sit in memory twice: the export writes straight into weights.<precision>.bin,
the fp16 conversion converts external weights one tensor at a time, and each precision's weights
file is appended to, never rewritten.

At real size (3.75B parameters: 15 GB of fp32 weights on a 24 GB machine) each of these is what
makes a build fit. Every test here checks the streamed result against the in-memory one on the
trained varied model (its reports differ per image), and the memory test checks the point of it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

CAP = 96


def _export_pair(model, tok, folder: Path, weights=None) -> tuple[Path, Path]:
    from echo_export.graphs import example_inputs, export_graph, make_graph
    from runtime import graph_io as gio

    P = len(tok.prefix_ids(model.n_image_tokens))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for role in (gio.VISION_PREFILL, gio.BLOCK_STEP):
        path = folder / f"{role}.onnx"
        export_graph(make_graph(role, model, CAP, P, tok.mask_id), example_inputs(role, model.cfg, 2, CAP, P), path,
                     weights=weights)
        out.append(path)
    return out[0], out[1]


def _decode(pre: Path, step: Path, model, tok, px: np.ndarray) -> np.ndarray:
    from echo_export.decode_loop import LoopSettings, decode, ort_runner, prefill_feeds
    from runtime.decode_mode import DecodeMode

    prefix = np.array(tok.prefix_ids(model.n_image_tokens), np.int64)
    ids = np.broadcast_to(prefix, (px.shape[0], prefix.size)).copy()
    r = decode(DecodeMode.of("fused", prefix.size, model.cfg.block_size), ort_runner(pre), ort_runner(step), ids,
               prefill_feeds(px, ids), LoopSettings.of(model.cfg.lm, CAP, tok, 32))
    return r.raw


def _initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    m = onnx.load(str(path))  # with external data
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    from varied_models import as_stage, get_varied

    return as_stage(get_varied(tiny_tokenizer, shifted=True, causal_context=True), "dcd", block_size=8), tiny_tokenizer


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    from varied_models import varied_images

    return varied_images(2)


def test_export_writes_each_tensor_once_into_the_shared_file(student, pixels, tmp_path):
    from echo_export.external_weights import WeightsFile
    from varied_models import assert_informative

    model, tok = student
    own = _export_pair(model, tok, tmp_path / "own")
    store = WeightsFile(tmp_path / "shared", "weights.fp32.bin") if (tmp_path / "shared").mkdir() is None else None
    shared = _export_pair(model, tok, tmp_path / "shared", weights=store)
    store.close()
    # the graphs read one file and hold no weights of their own
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted(
        ["weights.fp32.bin", shared[0].name, shared[1].name])
    big = [t for g in shared for t in onnx.load(str(g), load_external_data=False).graph.initializer
           if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all({e.key: e.value for e in t.external_data}["location"] == "weights.fp32.bin" for t in big)
    # the decoder's weights are in both graphs and stored once
    own_bytes = sum(sum(v.nbytes for v in _initializers(g).values()) for g in own)
    assert store.bytes_stored < 0.8 * own_bytes
    # the same tensors, and the same reports
    for o, s in zip(own, shared):
        a, b = _initializers(o), _initializers(s)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    want, got = _decode(*own, model, tok, pixels), _decode(*shared, model, tok, pixels)
    assert_informative(want, tok.eos_id)
    assert np.array_equal(want, got)


def test_fp16_conversion_of_external_weights_equals_the_converters_own(student, pixels, tmp_path):
    """The converter converts inline weights itself; external ones are converted by to_fp16, one
    at a time. Both must give the same fp16 graph: every tensor bit for bit, the same tokens."""
    from echo_export.external_weights import WeightsFile
    from echo_export.precision import to_fp16
    from varied_models import assert_informative

    model, tok = student
    inline = _export_pair(model, tok, tmp_path / "inline")
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(inline[1]), load_external_data=False).graph.initializer)
    (tmp_path / "ext").mkdir()
    store32 = WeightsFile(tmp_path / "ext", "weights.fp32.bin")
    ext = _export_pair(model, tok, tmp_path / "ext", weights=store32)
    store32.close()
    store16 = WeightsFile(tmp_path / "ext", "weights.fp16.bin")
    pairs = []
    for a, b in zip(inline, ext):
        a16, b16 = a.with_name(a.stem + ".fp16.onnx"), b.with_name(b.stem + ".fp16.onnx")
        to_fp16(a, a16)
        to_fp16(b, b16, weights=store16)
        pairs.append((a16, b16))
    store16.close()
    converted = 0
    for a16, b16 in pairs:
        a, b = _initializers(a16), _initializers(b16)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
            converted += a[k].dtype == np.float16 and a[k].size >= 256
    assert converted > 4
    # fp16 bytes, not fp32 ones relabelled: the fp16 file is about half the fp32 one
    ratio = (tmp_path / "ext" / "weights.fp16.bin").stat().st_size / (tmp_path / "ext" / "weights.fp32.bin").stat().st_size
    assert 0.4 < ratio < 0.6, ratio
    want = _decode(*[p[0] for p in pairs], model, tok, pixels)
    assert_informative(want, tok.eos_id)
    assert np.array_equal(want, _decode(*[p[1] for p in pairs], model, tok, pixels))


def test_weights_file_appends_and_keeps_earlier_graphs_valid(student, pixels, tmp_path):
    """share_weights into an open WeightsFile: a second graph appends its new tensors only; the
    first graph's offsets stay where they were, and both still decode."""
    from echo_export.external_weights import WeightsFile, share_weights

    model, tok = student
    pre, step = _export_pair(model, tok, tmp_path)
    want = _decode(pre, step, model, tok, pixels)
    store = WeightsFile(tmp_path, "weights.fp32.bin")
    first = share_weights(tmp_path, [pre.name], store)
    offsets = {t.name: {e.key: e.value for e in t.external_data}
               for t in onnx.load(str(pre), load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
    size_after_first = store.file_bytes()
    second = share_weights(tmp_path, [step.name], store)
    store.close()
    assert first.tensors_stored > 0 and second.tensors_referenced > second.tensors_stored > 0  # shared layers reused
    assert store.file_bytes() > size_after_first
    again = {t.name: {e.key: e.value for e in t.external_data}
             for t in onnx.load(str(pre), load_external_data=False).graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}
    assert again == offsets
    assert np.array_equal(_decode(pre, step, model, tok, pixels), want)
    # equal bytes are stored once, at the first one's place
    w = WeightsFile(tmp_path, "w.bin")
    a = w.add(b"x" * 70000)
    assert w.add(b"y" * 100) != a and w.add(b"x" * 70000) == a and a[0] % 4096 == 0
    w.close()


_PEAK_SCRIPT = r"""
import sys, numpy as np, onnx
from onnx import helper, TensorProto
from echo_export.external_weights import WeightsFile, share_weights
from echo_export.precision import to_fp16
import onnxruntime.transformers.float16  # noqa: F401  (imported before the peak is reset)
folder = sys.argv[1]
n, d = 8, 2048  # eight 16 MB fp32 weights (128 MB): a chain of MatMuls
nodes, inits, x = [], [], "x"
rng = np.random.default_rng(0)
for i in range(n):
    w = (rng.standard_normal((d, d), dtype=np.float32) * 0.02)
    inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
    nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
    x = f"h{i}"
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, d])], inits)
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), folder + "/g.onnx")
del g, inits, w
store = WeightsFile(folder, "weights.fp32.bin")
share_weights(folder, ["g.onnx"], store)
store.close()
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
out = WeightsFile(folder, "weights.fp16.bin")
to_fp16(folder + "/g.onnx", folder + "/g16.onnx", weights=out)
out.close()
print(hwm() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc (Linux)")
def test_fp16_conversion_holds_about_one_tensor_not_the_model(tmp_path):
    """128 MB of fp32 weights in eight tensors: converting them holds about one tensor's worth
    (read + fp16 copy), not the model (the converter holding the whole model: 128 MB + 64 MB)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs to reset the peak")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grew = int(r.stdout.strip().splitlines()[-1])
    assert grew < 64e6, f"to_fp16 grew the peak by {grew / 1e6:.0f} MB for 128 MB of weights"
    assert (tmp_path / "weights.fp16.bin").stat().st_size >= 64e6


def test_verification_opens_one_session_at_a_time_where_two_do_not_fit(student, tmp_path, monkeypatch):
    """onnxruntime CPU folds an fp32 copy of every fp16 weight at load (a 3.75B model: ~15 GB per
    session), so fp16's prefill and step sessions cannot sit side by side on 24 GB. Verification
    then runs every prefill first, lets that session go, and opens the step: the same tokens, the
    same report, and the choice follows the memory there is."""
    from conftest import write_tiny_dataset
    from echo_export import verify
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from runtime.manifest import load_manifest

    model, tok = student
    save_checkpoint(tmp_path / "ckpt", model, tok)
    data = write_tiny_dataset(tmp_path / "data", n_test=5)
    engine = build(BuildOptions(ckpt=tmp_path / "ckpt", out=tmp_path / "engine", precisions=["fp32", "fp16"],
                                batch_sizes=[2], verify_n=5, data=data, max_new_tokens=24), log=lambda s: None)
    m = load_manifest(engine)
    files = {(role, key.split(".")[0], int(key.split(".b")[1])): f for role, d in m.graphs.items() for key, f in d.items()}
    items = [verify.VerifyItem(f"i{i}", px, None) for i, px in enumerate(_pixels_for(model, 5))]
    ref = verify.block_reference(model, tok, items, [2], 24)
    lines: list[str] = []
    job = verify.VerifyJob(engine, files, tok, items, ["fp32", "fp16"], [2], m.capacity, lines.append)
    together = verify.verify_block(job, ref)
    assert not any("one session at a time" in s for s in lines)
    monkeypatch.setattr(verify, "memory_available_bytes", lambda: 10_000)  # nothing fits side by side
    lines.clear()
    alone = verify.verify_block(job, ref)
    assert any("fp16: one session at a time" in s for s in lines)
    assert not any("fp32: one session" in s for s in lines)  # fp32 shares its weights: always together
    for name, v in together["variants"].items():
        w = alone["variants"][name]
        for k in ("token_agreement", "exact_match", "per_pass_token_agreement"):
            assert v.get(k) == w.get(k), (name, k)
    assert together["variants"]["block.fp32.b2"]["identical"]
    assert "not_timed" in alone["speed"]["block_step.b2.ms"] and "fp16" in together["speed"]["block_step.b2.ms"]
    # a replayed prefill refuses an input it did not compute
    prefix = np.array(tok.prefix_ids(model.n_image_tokens), np.int64)
    ids = np.broadcast_to(prefix, (2, prefix.size)).copy()
    pre = verify._prefill_first(engine / files[("vision_prefill", "fp16", 2)],
                                [{"pixel_values": np.stack([items[0].pixels] * 2), "prefix_ids": ids}])
    with pytest.raises(RuntimeError, match="another input"):
        pre({"pixel_values": np.stack([items[1].pixels] * 2), "prefix_ids": ids})


def _pixels_for(model, n: int) -> list[np.ndarray]:
    from varied_models import varied_images

    return list(varied_images(n))
