"""Weights shared in memory and verified once, on a real engine folder (echo_export build).

- The graphs of one precision share one copy of their weights (runtime/ort_capi.py: one map of
  weights.<precision>.bin, its large MatMul/Gather initializers handed to every session, one
  container of packed weights). Two sessions sharing them give exactly the outputs of two
  sessions that each hold their own (onnxruntime's default), on the trained varied model
  (tests/varied_models.py), tokens and float tensors alike.
- A missing, truncated or altered weights file is refused with a message naming it.
- The verified-once stamp (runtime/manifest.py) spares the hash of an unchanged file and never
  lets an altered one through: same size with a restored mtime, a new mtime, a new size.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from test_runtime_graphs import GRAPH_BATCH, varied_engine  # noqa: F401

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

WEIGHTS = "weights.fp32.bin"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Stamps go to this test's folder, never to the user's cache."""
    monkeypatch.setenv("ECHO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ECHO_VERIFY", raising=False)


@pytest.fixture
def folder(varied_engine, tmp_path) -> Path:  # noqa: F811
    return Path(shutil.copytree(varied_engine.path, tmp_path / "engine"))


def _pixels(n: int = 6) -> np.ndarray:
    from varied_models import varied_images

    return varied_images(n)


def _decode(rt, px: np.ndarray) -> tuple[list, list]:
    fused = rt.generate(list(px))
    ar = rt.generate_ar(list(px))
    assert all(r.ok for r in fused + ar)
    return [r.tokens for r in fused], [r.tokens for r in ar]


def test_sharing_sessions_decode_exactly_like_sessions_with_their_own_weights(varied_engine):  # noqa: F811
    from runtime import EchoRuntime
    from varied_models import assert_informative

    eng = varied_engine
    shared = EchoRuntime(eng.path, batch_size=GRAPH_BATCH, threads=1)
    own = EchoRuntime(eng.path, batch_size=GRAPH_BATCH, threads=1, share_weights=False)
    px = _pixels()
    got, want = _decode(shared, px), _decode(own, px)
    for tokens in (*got, *want):
        assert_informative(tokens, eng.tokenizer.eos_id)
    assert got == want
    # the shared runtime really shares: one SharedWeights, lent to every graph it loaded (both modes)
    assert len(shared._weights_map) == 1 and not own._weights_map
    assert len(shared._graphs) == 4
    lent = [g._capi.weights for g in shared._graphs.values()]
    assert all(w is lent[0] for w in lent) and all(g._capi.shared_bytes > 0 for g in shared._graphs.values())
    assert not any(g._capi for g in own._graphs.values())


@pytest.fixture(scope="module")
def varied_int8_engine(tmp_path_factory) -> Path:
    """The varied model as fp32 + int8 graphs (int8 calibrated on a few tiny PNGs): the int8
    weights are read by DequantizeLinear nodes, which onnxruntime fuses into its int8 MatMuls."""
    from conftest import make_tokenizer, write_tiny_dataset
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from test_runtime_graphs import VARIED_BLOCK, VARIED_CAPACITY
    from varied_models import MAX_RESPONSE, as_stage, get_varied

    root = tmp_path_factory.mktemp("varied_int8")
    tok = make_tokenizer()
    model = as_stage(get_varied(tok, shifted=True, causal_context=True), "dcd", block_size=VARIED_BLOCK)
    model.cfg.max_response_tokens = MAX_RESPONSE
    save_checkpoint(root / "ckpt", model, tok)
    write_tiny_dataset(root / "data", n_train=6)
    return build(BuildOptions(ckpt=root / "ckpt", out=root / "engine", precisions=["fp32", "int8"],
                              batch_sizes=[GRAPH_BATCH], capacity=VARIED_CAPACITY, verify_n=0, data=root / "data",
                              calib_size=6), log=lambda s: None)


def test_int8_sessions_sharing_weights_decode_exactly_like_their_own(varied_int8_engine):
    from runtime import EchoRuntime
    from varied_models import assert_informative

    px = list(_pixels())
    shared = EchoRuntime(varied_int8_engine, precision="int8", batch_size=GRAPH_BATCH, threads=1)
    own = EchoRuntime(varied_int8_engine, precision="int8", batch_size=GRAPH_BATCH, threads=1, share_weights=False)
    got, want = [r.tokens for r in shared.generate(px)], [r.tokens for r in own.generate(px)]
    assert_informative(got, shared.tokenizer.eos_id, min_reports=4)
    assert got == want
    graphs = list(shared._graphs.values())
    assert graphs and all(g._capi is not None and g._capi.shared_bytes > 0 for g in graphs)
    lent = sum(view.nbytes for _, view in shared._weights_map["weights.int8.bin"]._values.values())
    assert lent > 0  # the int8 weights (read by DequantizeLinear) are among them
    assert any(view.dtype == np.int8 or view.dtype == np.uint8
               for _, view in shared._weights_map["weights.int8.bin"]._values.values())


def test_sharing_and_own_sessions_compute_bit_identical_tensors(varied_engine):  # noqa: F811
    """Float outputs, not only argmax tokens: the prefill KV and a block step's confidences."""
    from runtime.manifest import load_manifest, resolve_graph
    from runtime.ort_backend import OrtGraph
    from runtime.ort_capi import SharedWeights

    eng = varied_engine
    m = load_manifest(eng.path)
    shared = SharedWeights(eng.path / WEIGHTS)
    px = _pixels(GRAPH_BATCH)
    prefix = np.asarray(eng.tokenizer.prefix_ids(eng.model.n_image_tokens), np.int64)
    results = []
    for share in (True, False):
        kw = {"shared_weights": shared if share else None}
        pre = OrtGraph(eng.path / resolve_graph(m, "vision_prefill", "fp32", GRAPH_BATCH), threads=1, **kw)
        step = OrtGraph(eng.path / resolve_graph(m, "block_step", "fp32", GRAPH_BATCH), threads=1, **kw)
        out = {n: np.zeros(s, d) for n, (s, d) in pre.outputs.items()}
        pre.bind({"pixel_values": px, "prefix_ids": np.ascontiguousarray(np.broadcast_to(prefix, (GRAPH_BATCH, len(prefix))))},
                 out)
        pre.run()
        feeds = {n: np.zeros(s, d) for n, (s, d) in step.inputs.items()}
        cap, past = feeds["past_key"].shape[3], out["present_key"].shape[3]
        feeds["past_key"][:, :, :, :past] = out["present_key"]
        feeds["past_value"][:, :, :, :past] = out["present_value"]
        feeds["past_len"][:] = past
        n = feeds["input_ids"].shape[1]
        feeds["input_ids"][:] = np.random.default_rng(1).integers(10, 120, feeds["input_ids"].shape)
        feeds["position_ids"][:] = past + np.arange(n)
        assert past + n <= cap
        sout = {n_: np.zeros(s, d) for n_, (s, d) in step.outputs.items()}
        step.bind(feeds, sout)
        step.run()
        results.append({**{f"prefill/{k}": v for k, v in out.items()}, **{f"step/{k}": v for k, v in sout.items()}})
    a, b = results
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert np.abs(a["prefill/present_key"]).max() > 0 and len(np.unique(a["step/confidence"])) > 1


def test_sessions_borrow_one_set_of_initializers(varied_engine):  # noqa: F811
    """Each large MatMul / Gather weight becomes one OrtValue over the map, lent to every session
    that reads it (onnxruntime keys the shared packed copies by these), not one per session."""
    from runtime.manifest import load_manifest, resolve_graph
    from runtime.ort_backend import OrtGraph
    from runtime.ort_capi import SharedWeights, external_initializers

    eng = varied_engine
    m = load_manifest(eng.path)
    shared = SharedWeights(eng.path / WEIGHTS)
    paths = [eng.path / resolve_graph(m, role, "fp32", GRAPH_BATCH) for role in ("vision_prefill", "block_step")]
    graphs = [OrtGraph(p, threads=1, shared_weights=shared) for p in paths]
    lent = sum(g._capi.shared_bytes for g in graphs)
    distinct = sum(view.nbytes for _, view in shared._values.values())
    assert 0 < distinct < lent  # the decoder's weights are lent to both graphs, mapped once
    for (v, view) in shared._values.values():
        assert np.shares_memory(view, shared.map)  # views of the file's map, not copies
    # what is lent is what the graphs store in the file, read without the onnx package
    onnx = pytest.importorskip("onnx")
    for p in paths:
        mine = {t["name"]: (t["dtype"], t["dims"], t["offset"], t["length"]) for t in external_initializers(p)}
        ref = {}
        for t in onnx.load(str(p), load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                ref[t.name] = (t.data_type, list(t.dims), int(ext.get("offset", 0)), int(ext["length"]))
        assert mine == ref and mine


def test_bound_buffers_are_the_arrays_themselves(varied_engine):  # noqa: F811
    from runtime import EchoRuntime

    rt = EchoRuntime(varied_engine.path, batch_size=GRAPH_BATCH, threads=1)
    dec = next(iter(rt._decoders.values()))
    assert dec.step._capi is not None and dec.step._keep
    for ov, arr in dec.step._keep + dec.prefill._keep:
        assert ov.data_ptr() == arr.ctypes.data  # the C API path binds the arrays, no copies


def _flip(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


@pytest.mark.parametrize("damage", ["flip", "truncate", "grow", "remove"])
def test_a_damaged_weights_file_is_refused(folder, damage):
    from runtime import EchoRuntime, ManifestError

    p = folder / WEIGHTS
    if damage == "flip":
        _flip(p)
        want = rf"{WEIGHTS}: sha256 does not match the manifest"
    elif damage == "truncate":
        os.truncate(p, p.stat().st_size - 4096)
        want = rf"{WEIGHTS}: size \d+ does not match the manifest"
    elif damage == "grow":
        with open(p, "ab") as f:
            f.write(b"\0")
        want = rf"{WEIGHTS}: size \d+ does not match the manifest"
    else:
        p.unlink()
        want = rf"{WEIGHTS}: listed in the manifest but missing"
    with pytest.raises(ManifestError, match=want):
        EchoRuntime(folder, batch_size=GRAPH_BATCH, threads=1)


def test_weights_damaged_after_the_runtime_opened_are_refused_when_a_graph_loads(folder):
    """The AR graphs load on first use; the weights file they read is checked again then."""
    from runtime import EchoRuntime, ManifestError

    rt = EchoRuntime(folder, batch_size=GRAPH_BATCH, threads=1)  # fused graphs loaded, weights mapped
    _flip(folder / WEIGHTS)
    with pytest.raises(ManifestError, match=rf"{WEIGHTS}: sha256 does not match the manifest"):
        rt.generate_ar(list(_pixels(GRAPH_BATCH)))


@pytest.fixture
def stamps(monkeypatch):
    """Stamps for every file (the tiny weights are far below STAMP_MIN_BYTES) after a short settle
    time; counts the files that were hashed."""
    import runtime.manifest as man

    monkeypatch.setattr(man, "STAMP_MIN_BYTES", 1)
    monkeypatch.setattr(man, "STAMP_SETTLE_NS", 50_000_000)
    hashed: list[str] = []
    real = man.sha256_file

    def counting(path, *a, **k):
        hashed.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(man, "sha256_file", counting)
    return hashed


def _settle() -> None:
    time.sleep(0.1)  # past STAMP_SETTLE_NS above, and past a file-timestamp tick


def test_a_verified_file_is_not_hashed_again_until_it_changes(folder, stamps):
    from runtime.manifest import load_manifest

    _settle()
    load_manifest(folder)
    assert WEIGHTS in stamps  # first start: full hash, stamp written
    stamps.clear()
    load_manifest(folder)
    assert stamps == []  # every file stamped: stat only
    os.utime(folder / WEIGHTS)  # touched: hashed again (and stamped again once it settles)
    load_manifest(folder)
    assert stamps == [WEIGHTS]


def test_full_verification_ignores_stamps(folder, stamps, monkeypatch):
    from runtime.manifest import load_manifest

    _settle()
    load_manifest(folder)
    stamps.clear()
    monkeypatch.setenv("ECHO_VERIFY", "full")
    load_manifest(folder)
    assert WEIGHTS in stamps


def test_a_file_changed_just_before_it_was_hashed_gets_no_stamp(folder, stamps):
    """Within STAMP_SETTLE_NS of its last change a file is hashed every time: a write in the same
    timestamp tick as the hash would leave size, mtime and ctime as the stamp saw them."""
    from runtime.manifest import load_manifest

    os.utime(folder / WEIGHTS)
    load_manifest(folder)
    stamps.clear()
    load_manifest(folder)
    assert WEIGHTS in stamps


@pytest.mark.parametrize("change", ["same size, mtime restored", "new mtime", "truncated", "replaced by a copy"])
def test_a_stamp_never_lets_an_altered_weights_file_through(folder, stamps, change):
    from runtime import EchoRuntime, ManifestError
    from runtime.manifest import load_manifest

    _settle()
    load_manifest(folder)  # verified: stamped
    stamps.clear()
    load_manifest(folder)
    assert stamps == []  # the stamp is in use
    p = folder / WEIGHTS
    if change == "same size, mtime restored":
        _flip(p, keep_mtime=True)  # only the ctime tells
        want = "sha256 does not match"
    elif change == "new mtime":
        _flip(p)
        want = "sha256 does not match"
    elif change == "truncated":
        os.truncate(p, p.stat().st_size - 1)
        want = "size"
    else:  # another file with the old file's size and mtime, bytes altered
        data = bytearray(p.read_bytes())
        data[len(data) // 3] ^= 0x80
        st = p.stat()
        tmp = folder.parent / "w.tmp"
        tmp.write_bytes(bytes(data))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, p)
        want = "sha256 does not match"
    with pytest.raises(ManifestError, match=rf"{WEIGHTS}: {want}"):
        load_manifest(folder)
    with pytest.raises(ManifestError, match=rf"{WEIGHTS}: {want}"):
        EchoRuntime(folder, batch_size=GRAPH_BATCH, threads=1)


def test_an_unwritable_cache_only_means_hashing_again(folder, stamps, monkeypatch, tmp_path):
    from runtime.manifest import load_manifest

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("ECHO_CACHE_DIR", str(blocker))
    _settle()
    load_manifest(folder)
    stamps.clear()
    load_manifest(folder)
    assert WEIGHTS in stamps


def test_the_packed_weights_go_with_the_last_session(varied_engine):  # noqa: F811
    """The container (the packed weights) is released once its SharedWeights and every session that
    uses it are gone, in either order, not before (onnxruntime requires it to outlive its sessions)."""
    import gc

    from runtime.manifest import load_manifest, resolve_graph
    from runtime.ort_backend import OrtGraph
    from runtime.ort_capi import SharedWeights

    eng = varied_engine
    m = load_manifest(eng.path)
    paths = [eng.path / resolve_graph(m, role, "fp32", GRAPH_BATCH) for role in ("vision_prefill", "block_step")]
    shared = SharedWeights(eng.path / WEIGHTS)
    graphs = [OrtGraph(p, threads=1, shared_weights=shared) for p in paths]
    c = shared._container
    assert c.sessions == 2 and c.p
    del shared
    gc.collect()
    assert c.p  # the sessions still hold it (and the map)
    graphs.pop()
    gc.collect()
    assert c.p and c.sessions == 1
    graphs.clear()
    gc.collect()
    assert c.p is None and c.sessions == 0 and c.values == []


def test_a_folder_whose_graphs_keep_their_weights_inside_is_not_shared(tmp_path):
    """weights.fp32.bin is empty when every tensor stays inside its graph (a high threshold):
    nothing to map, and the runtime decodes as onnxruntime loads it."""
    from conftest import make_tokenizer
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from runtime import EchoRuntime
    from test_runtime_graphs import VARIED_BLOCK, VARIED_CAPACITY
    from varied_models import MAX_RESPONSE, as_stage, get_varied

    tok = make_tokenizer()
    model = as_stage(get_varied(tok, shifted=True, causal_context=True), "dcd", block_size=VARIED_BLOCK)
    model.cfg.max_response_tokens = MAX_RESPONSE
    save_checkpoint(tmp_path / "ckpt", model, tok)
    out = build(BuildOptions(ckpt=tmp_path / "ckpt", out=tmp_path / "inline", precisions=["fp32"],
                             batch_sizes=[GRAPH_BATCH], capacity=VARIED_CAPACITY, verify_n=0,
                             weights_min_bytes=1 << 40), log=lambda s: None)
    if (out / WEIGHTS).exists():
        assert (out / WEIGHTS).stat().st_size == 0
    rt = EchoRuntime(out, batch_size=GRAPH_BATCH, threads=1)
    assert not rt._weights_map and all(g._capi is None for g in rt._graphs.values())
    assert all(r.ok for r in rt.generate(list(_pixels(GRAPH_BATCH))))
