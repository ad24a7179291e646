"""EchoRuntime on a real engine folder (echo_export build): parity with the PyTorch
reference decoders, batching with per-sequence EOS, bad inputs in a batch, manifest
refusal, IO binding, and the torch-free import."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_runtime_graphs import (  # noqa: F401
    BLOCK,
    CAPACITY,
    GRAPH_BATCH,
    MAX_NEW,
    VARIED_BLOCK,
    images,
    runtime_engine,
    varied_engine,
)

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _ref_fused(eng, px, max_new=MAX_NEW):
    from echo_train.decoding import fused_onestep_generate

    return fused_onestep_generate(eng.model, eng.tokenizer, torch.from_numpy(px), BLOCK, max_new_tokens=max_new)


def _ref_ar(eng, px, max_new=MAX_NEW):
    from echo_train.decoding import ar_generate

    return ar_generate(eng.model, eng.tokenizer, torch.from_numpy(px), max_new_tokens=max_new)


@pytest.fixture(scope="module")
def rt1(runtime_engine):
    from runtime import EchoRuntime

    return EchoRuntime(runtime_engine.path, batch_size=None, threads=1)  # the smallest built: 2


@pytest.fixture(scope="module")
def rt2(runtime_engine):
    from runtime import EchoRuntime

    return EchoRuntime(runtime_engine.path, batch_size=GRAPH_BATCH, threads=1)


class GraphTap:
    """Every graph pass the runtime makes: the graph, the inputs it was fed (the KV cache too)
    and the outputs it wrote, copied right after the pass. It wraps OrtGraph.bind / run, the
    backend's public calls, so it sees what onnxruntime saw whatever the engine's loop looks like."""

    def __init__(self, monkeypatch) -> None:
        from runtime.ort_backend import OrtGraph

        self.runs: list[dict] = []
        bound: dict[int, tuple[dict, dict]] = {}
        real_bind, real_run = OrtGraph.bind, OrtGraph.run

        def bind(graph, inputs, outputs):
            bound[id(graph)] = (inputs, outputs)
            return real_bind(graph, inputs, outputs)

        def run(graph):
            seconds = real_run(graph)
            inputs, outputs = bound[id(graph)]
            snap = {k: np.array(v, copy=True) for k, v in {**inputs, **outputs}.items()}
            self.runs.append({"graph": graph.path.name.split(".")[0], **snap})
            return seconds

        monkeypatch.setattr(OrtGraph, "bind", bind)
        monkeypatch.setattr(OrtGraph, "run", run)


ATOL = 1e-4  # fp32 graph vs PyTorch eager, same weights: present keys differ by ~1.8e-6 (measured)


def _stack(kv, sl=slice(None)) -> np.ndarray:
    """PyTorch per-layer (k, v) -> the graphs' [L, b, kvH, n, dh] keys and values."""
    return (torch.stack([k[:, :, sl] for k, _ in kv]).numpy(), torch.stack([v[:, :, sl] for _, v in kv]).numpy())


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=what)


def _assert_cache_read(run: dict, past, what: str) -> None:
    """The cache slots the pass could attend (< past_len) hold exactly PyTorch's past K/V."""
    n = past[0][0].shape[2]
    assert (run["past_len"] == n).all(), (what, run["past_len"], n)
    pk, pv = _stack(past)
    _close(run["past_key"][:, :, :, :n], pk, f"{what}: cached keys")
    _close(run["past_value"][:, :, :, :n], pv, f"{what}: cached values")


def _pairs(n: int):
    return [list(range(i, min(i + GRAPH_BATCH, n))) for i in range(0, n, GRAPH_BATCH)]


def test_fused_equals_pytorch_pass_by_pass(varied_engine, monkeypatch):
    """Runtime fused == fused_onestep_generate: tokens, and per pass the position ids, the
    confidence, the block's present K/V and the cache it read, to ATOL."""
    from runtime import EchoRuntime
    from varied_models import ForwardLog, assert_informative, varied_images

    from echo_train.decoding import fused_onestep_generate
    from echo_train.decoding.block_diffusion import fused_block_slice

    eng, B = varied_engine, VARIED_BLOCK
    model, tok = eng.model, eng.tokenizer
    px = varied_images()
    tap = GraphTap(monkeypatch)
    rt = EchoRuntime(eng.path, batch_size=GRAPH_BATCH, threads=1)
    read = fused_block_slice(B, model.cfg.shifted_prediction)
    all_tokens = []
    for rows in _pairs(len(px)):  # the reference decodes the same pairs, so both stop at the same pass
        tap.runs.clear()
        reps = rt.generate(list(px[rows]), max_new_tokens=MAX_NEW)
        with ForwardLog(model) as fl:
            ref = fused_onestep_generate(model, tok, torch.from_numpy(px[rows]), B, max_new_tokens=MAX_NEW)
        assert [r.tokens for r in reps] == ref.tokens
        all_tokens += ref.tokens
        assert [r["graph"] for r in tap.runs] == ["vision_prefill"] + ["block_step"] * (len(fl.calls) - 1)
        _close(tap.runs[0]["present_key"], _stack(fl.calls[0]["kv"])[0], "prefill keys")
        _close(tap.runs[0]["present_value"], _stack(fl.calls[0]["kv"])[1], "prefill values")
        for k, (run, c) in enumerate(zip(tap.runs[1:], fl.calls[1:])):
            what = f"images {rows} pass {k}"
            assert np.array_equal(run["position_ids"], c["position_ids"].numpy()), what
            logits = c["logits"][:, read].clone()
            logits[..., tok.mask_id] = float("-inf")
            assert np.array_equal(run["tokens"], logits.argmax(-1).numpy()), what
            _close(run["confidence"], torch.softmax(logits, -1).amax(-1).numpy(), f"{what}: confidence")
            pk, pv = _stack(c["kv"], slice(0, B))
            _close(run["present_key"], pk, f"{what}: present keys")
            _close(run["present_value"], pv, f"{what}: present values")
            _assert_cache_read(run, c["past"], what)
        for r, toks in zip(reps, ref.tokens):
            ended = len(toks) < MAX_NEW
            assert r.stop == ("eos" if ended else "max_new_tokens")
            assert r.forward_passes == 1 + (len(toks) // B + 1 if ended else MAX_NEW // B)
            assert r.text == tok.decode(toks)
    assert_informative(all_tokens, tok.eos_id)
    lens = {len(t) for t in all_tokens}
    assert len(lens) >= 3 and MAX_NEW in lens, "reports should end at different blocks, one at max_new_tokens"
    # one call over all 6 images (three padded-free batches of 2) gives the same reports
    assert [r.tokens for r in rt.generate(list(px), max_new_tokens=MAX_NEW)] == all_tokens


def _as_stacked_step(run: dict) -> dict:
    """An in-place AR step's tapped pass (per-layer caches, written at slot past_len) in ar_step's
    terms: the stacked cache it read and the present K/V it wrote."""
    n = sum(k.startswith("past_key.") for k in run)
    p = int(run["past_len"][0])
    out = dict(run)
    for kind in ("key", "value"):
        cache = np.stack([run[f"past_{kind}.{i}"] for i in range(n)])
        out[f"past_{kind}"], out[f"present_{kind}"] = cache, cache[:, :, :, p : p + 1]
    return out


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "standard"])
def test_ar_equals_pytorch_pass_by_pass(varied_engine, monkeypatch, inplace):
    """Runtime AR == ar_generate: tokens, and per step the position ids, the present K/V and
    the cache it read (the prefix and every earlier step's KV), to ATOL; with the in-place step
    (graph_io ar_step_inplace, what the CPU runs) and the standard one."""
    from runtime import EchoRuntime
    from varied_models import ForwardLog, as_stage, assert_informative, varied_images

    from echo_train.decoding import ar_generate

    eng = varied_engine
    model, tok = as_stage(eng.model, "ar"), eng.tokenizer
    px = varied_images()
    tap = GraphTap(monkeypatch)
    rt = EchoRuntime(eng.path, batch_size=GRAPH_BATCH, threads=1, mode="ar", inplace_steps=inplace)
    step = "ar_step_inplace" if inplace else "ar_step"
    all_tokens = []
    for rows in _pairs(len(px)):
        tap.runs.clear()
        reps = rt.generate_ar(list(px[rows]), max_new_tokens=MAX_NEW)
        with ForwardLog(model) as fl:
            ref = ar_generate(model, tok, torch.from_numpy(px[rows]), max_new_tokens=MAX_NEW)
        assert [r.tokens for r in reps] == ref.tokens
        all_tokens += ref.tokens
        assert [r["graph"] for r in tap.runs] == ["ar_prefill"] + [step] * (len(fl.calls) - 1)
        if inplace:
            tap.runs[1:] = [_as_stacked_step(r) for r in tap.runs[1:]]
        for i, (run, c) in enumerate(zip(tap.runs, fl.calls)):
            what = f"images {rows} AR pass {i}"
            pk, pv = _stack(c["kv"])
            _close(run["present_key"], pk, f"{what}: present keys")
            _close(run["present_value"], pv, f"{what}: present values")
            logits = c["logits"][:, -1].clone()
            logits[..., tok.mask_id] = float("-inf")
            assert np.array_equal(run["tokens"][:, 0], logits.argmax(-1).numpy()), what
            if i:
                assert np.array_equal(run["position_ids"], c["position_ids"].numpy()), what
                _assert_cache_read(run, c["past"], what)
        assert reps[0].forward_passes == len(reps[0].tokens) + (reps[0].stop == "eos")
    assert_informative(all_tokens, tok.eos_id)
    assert rt.generate(list(px[:2]), max_new_tokens=MAX_NEW, mode="ar")[1].tokens == all_tokens[1]


def test_odd_batch_is_padded_and_order_kept(runtime_engine, rt2):
    px = images(6)
    ref = _ref_fused(runtime_engine, px[[4, 0, 3]])
    reps = rt2.generate([px[4], px[0], px[3]])  # 3 images on b2 graphs: the last batch is padded
    assert [r.tokens for r in reps] == ref.tokens
    reps = [rt2.generate([x])[0] for x in (px[4], px[0], px[3])]  # one image at a time, padded
    assert [r.tokens for r in reps] == ref.tokens


def test_max_new_tokens_and_capacity(runtime_engine, rt1, rt2):
    px = images(6)
    r = rt1.generate([px[3]], max_new_tokens=7)[0]
    assert r.tokens == _ref_fused(runtime_engine, px[3:4], 7).tokens[0]  # whole blocks, like the reference
    # fused: the cache holds P-B prefix tokens + 9 blocks; pass 10 runs without storing, then stop
    n_pre = rt1.prefix_len - BLOCK
    most = ((CAPACITY - n_pre) // BLOCK + 1) * BLOCK
    ref = _ref_fused(runtime_engine, px[2:5], most).tokens
    stops = []
    for r, t in zip(rt2.generate(list(px[2:5]), max_new_tokens=10_000), ref):
        assert r.tokens == t and r.stop == ("capacity" if len(t) == most else "eos")
        stops.append(r.stop)
    # AR: prefill + one step per free slot + a last step that stores nothing
    most_ar = CAPACITY - rt1.prefix_len + 2
    ref = _ref_ar(runtime_engine, px[:1], most_ar).tokens
    for r, t in zip(rt2.generate_ar(list(px[:1]), max_new_tokens=10_000), ref):
        assert r.tokens == t and r.stop == ("capacity" if len(t) == most_ar else "eos")
        stops.append(r.stop)
    assert "capacity" in stops


def test_on_block_streams_the_final_report(runtime_engine, rt2):
    px = images(6)
    events = []
    reps = rt2.generate(list(px[:4]), on_block=events.append)
    for i, r in enumerate(reps):
        mine = [e for e in events if e.index == i]
        assert [e.block for e in mine] == list(range(len(mine)))
        assert sum((e.tokens for e in mine), []) == r.tokens
        assert mine[-1].text == r.text
        assert mine[-1].done == (r.stop == "eos") and not any(e.done for e in mine[:-1])


def test_timings_and_session_share(rt1):
    r = rt1.generate([images(1)[0]])[0]
    t = r.timings
    assert set(t) >= {"preprocess", "prefill", "blocks", "session", "decode", "total"}
    assert len(t["blocks"]) == r.forward_passes - 1
    assert 0 < t["session"] <= t["decode"] <= t["total"]
    assert 0 < t["prefill_session"] < t["session"] and t["prefill_session"] <= t["prefill"]


def test_io_binding_shares_numpy_memory(rt1):
    dec = next(iter(rt1._decoders.values()))
    bound = {id(arr) for _, arr in dec.step._keep}
    assert id(dec.cache_k) in bound and id(dec.cache_v) in bound
    for ov, arr in dec.step._keep + dec.prefill._keep:
        assert ov.data_ptr() == arr.ctypes.data  # no copy of the KV cache per pass


def test_batch_with_bad_files_still_reports_the_rest(runtime_engine, rt2, tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(((images(1, size=64)[0, 0] + 1) * 127.5).astype(np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    inputs = [str(tmp_path / "bad.png"), str(good), str(tmp_path / "missing.dcm"), str(tmp_path / "empty.jpg"),
              images(1)[0], np.zeros((5, 5), np.float32)]
    reps = rt2.generate(inputs)
    assert [r.ok for r in reps] == [False, True, False, False, True, False]
    assert "bad.png" in reps[0].error and "missing.dcm: file not found" in reps[2].error
    assert "empty" in reps[3].error and "shape" in reps[5].error
    from runtime.preprocess import preprocess_image

    ref = _ref_fused(runtime_engine, preprocess_image(good, 32)[None])
    assert reps[1].tokens == ref.tokens[0] and reps[1].path == str(good)


FP16_MIN_AGREEMENT = 0.95  # fp16 may flip near-tied argmaxes of this random model; measured 70 of 70 here


def test_fp16_graphs_run_and_mostly_agree(runtime_engine):
    from runtime import EchoRuntime

    rt = EchoRuntime(runtime_engine.path, precision="fp16", batch_size=GRAPH_BATCH)
    px = images(4)
    ref = _ref_fused(runtime_engine, px)
    reps = rt.generate(list(px))
    assert len(reps) == len(ref.tokens) and all(r.ok for r in reps)
    # position by position over the longer of the two reports: a report that stops early (or runs
    # on) disagrees on every position the other one has
    hits = total = 0
    for r, t in zip(reps, ref.tokens):
        n = max(len(r.tokens), len(t))
        hits += sum(i < len(r.tokens) and i < len(t) and r.tokens[i] == t[i] for i in range(n))
        total += n
    assert total >= 4 * BLOCK and hits / total >= FP16_MIN_AGREEMENT, (hits, total)


def test_fp16_on_a_cpu_is_refused_when_two_fp32_copies_do_not_fit(runtime_engine, monkeypatch):
    """onnxruntime CPU casts fp16 weights to fp32 in every session: where a prefill and a step
    session (about 4x the fp16 bytes) exceed the memory there is, the runtime says so before
    loading instead of being killed mid-load; fp32 shares its weights and is not refused."""
    from runtime import EchoRuntime, engine
    from runtime.errors import EchoRuntimeError

    size = (runtime_engine.path / "weights.fp16.bin").stat().st_size
    assert size > 0
    monkeypatch.setattr(engine, "memory_available_bytes", lambda: 3 * size)
    with pytest.raises(EchoRuntimeError, match=r"fp16 on a CPU needs about .*--precision fp32"):
        EchoRuntime(runtime_engine.path, precision="fp16", batch_size=GRAPH_BATCH)
    EchoRuntime(runtime_engine.path, precision="fp32", batch_size=GRAPH_BATCH)
    monkeypatch.setattr(engine, "memory_available_bytes", lambda: 5 * size)
    assert EchoRuntime(runtime_engine.path, precision="fp16", batch_size=GRAPH_BATCH).generate(list(images(1)))[0].ok


def _copy_engine(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tampered_or_incomplete_folders_are_refused(runtime_engine, tmp_path):
    from runtime import EchoRuntime, ManifestError

    eng = _copy_engine(runtime_engine.path, tmp_path / "e1")
    g = eng / f"block_step.fp32.b{GRAPH_BATCH}.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF
    g.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"block_step\.fp32\.b2\.onnx: sha256 does not match"):
        EchoRuntime(eng)
    eng = _copy_engine(runtime_engine.path, tmp_path / "e2")
    (eng / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer\.json: listed in the manifest but missing"):
        EchoRuntime(eng)
    eng = _copy_engine(runtime_engine.path, tmp_path / "e3")
    (eng / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        EchoRuntime(eng)
    eng = _copy_engine(runtime_engine.path, tmp_path / "e4")
    (eng / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: unreadable"):
        EchoRuntime(eng)
    (eng / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="manifest.json: manifest is a JSON list"):
        EchoRuntime(eng)
    with pytest.raises(ManifestError, match="engine folder not found"):
        EchoRuntime(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="no int8 graphs"):
        EchoRuntime(runtime_engine.path, precision="int8")
    for b in (1, 3):  # fixed-shape graphs: only built batch sizes
        with pytest.raises(ManifestError, match="built: \\[2\\]"):
            EchoRuntime(runtime_engine.path, batch_size=b)


def test_graph_resolver_reads_both_manifest_layouts():
    from runtime.errors import ManifestError
    from runtime.manifest import Manifest, graph_batch_sizes, resolve_graph

    def man(graphs, batches):
        return Manifest(model_config={}, block_size=4, capacity=64, batch_sizes=batches, vocab_size=10, prefix_len=16,
                        image_size=32, eos_id=1, mask_id=2, pad_id=0, precisions=["fp32", "fp16"], graphs=graphs)

    m = man({"block_step": {"fp32.b1": "a.onnx", "fp32.b8": "b.onnx", "trt-fp32.b1": "a.plan"}}, [1, 8])
    assert resolve_graph(m, "block_step", "fp32", 8) == "b.onnx"
    assert resolve_graph(m, "block_step", "trt-fp32", 1) == "a.plan"
    assert graph_batch_sizes(m, "block_step", "fp32") == [1, 8]
    with pytest.raises(ManifestError, match="fp16 at batch 1"):
        resolve_graph(m, "block_step", "fp16", 1)
    m = man({"block_step": {"fp16": "c.onnx"}}, [4])
    assert resolve_graph(m, "block_step", "fp16", 4) == "c.onnx"
    assert graph_batch_sizes(m, "block_step", "fp16") == [4]
    with pytest.raises(ManifestError, match="no ar_step graph"):
        resolve_graph(m, "ar_step", "fp32", 1)


def test_tensorrt_backend_is_lazy_and_explains_what_is_missing(runtime_engine):
    from runtime import EchoRuntime, EchoRuntimeError
    from runtime.trt_backend import trt_available

    ok, why = trt_available()
    if ok:
        pytest.skip("TensorRT is installed here: the GPU device check covers it")
    with pytest.raises(EchoRuntimeError, match=r"\[trt\] extra"):
        EchoRuntime(runtime_engine.path, backend="trt")
    assert "[trt] extra" in why or "CUDA" in why


def test_tensorrt_backend_matches_pytorch_reference(runtime_engine, tmp_path):
    from runtime.trt_backend import trt_available

    ok, why = trt_available()
    if not ok:
        pytest.skip(f"TensorRT backend unavailable here: {why}")
    from echo_export.tensorrt_build import build_all

    from runtime import EchoRuntime
    from runtime.manifest import load_manifest, write_manifest

    eng = _copy_engine(runtime_engine.path, tmp_path / "trt")
    m = load_manifest(eng)
    names = [f for f in m.files if f.endswith(f".fp32.b{GRAPH_BATCH}.onnx")]
    plans = build_all(eng, names, timing_cache=tmp_path / "timing.cache", log=lambda s: None)
    for onnx_name, plan in plans.items():
        m.graphs[onnx_name.split(".")[0]][f"trt-fp32.b{GRAPH_BATCH}"] = plan
    write_manifest(eng, m, list(m.files) + list(plans.values()))
    px = images(4)
    reps = EchoRuntime(eng, backend="trt", batch_size=GRAPH_BATCH).generate(list(px))
    assert [r.tokens for r in reps] == _ref_fused(runtime_engine, px).tokens


TORCH_FREE = r"""
import json, sys
sys.modules["torch"] = None          # any `import torch` now raises ImportError
sys.modules["transformers"] = None
import runtime
from runtime import EchoRuntime
from runtime.cli import main
rt = EchoRuntime(sys.argv[1], batch_size=None)
reps = rt.generate([sys.argv[2], sys.argv[3]])
assert reps[0].ok and not reps[1].ok, reps
leaked = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m] is not None]
print(json.dumps({"tokens": reps[0].tokens, "error": reps[1].error, "leaked": leaked}))
"""


def test_runtime_works_where_torch_cannot_be_imported(runtime_engine, tmp_path):
    from PIL import Image

    from runtime.preprocess import preprocess_image

    img = tmp_path / "cxr.png"
    Image.fromarray(((images(2, size=48)[1, 0] + 1) * 127.5).astype(np.uint8)).save(img)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", TORCH_FREE, str(runtime_engine.path), str(img), str(tmp_path / "x.png")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["leaked"] == [] and "x.png: file not found" in out["error"]
    assert out["tokens"] == _ref_fused(runtime_engine, preprocess_image(img, 32)[None]).tokens[0]
