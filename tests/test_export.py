"""echo-export build on a tiny random model: graphs, precision variants, verification, manifest, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import make_tokenizer, write_tiny_dataset

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

CAP = 96
REPORTS = [
    "FINDINGS: The heart size is normal. There is no pleural effusion. IMPRESSION: No acute process.",
    "FINDINGS: The cardiac silhouette is enlarged. There is a small left pleural effusion. IMPRESSION: Cardiomegaly.",
    "FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia.",
]


def write_varied_dataset(root, n_train: int = 4, n_test: int = 3):
    """train.json / test.json whose PNGs are the images the varied models were trained on (test
    image i = varied image i, train images the next ones), so that the exported graphs write
    distinct reports that vary within and across images."""
    import json as _json

    from PIL import Image
    from varied_models import N_IMAGES, varied_images

    (root / "img").mkdir(parents=True)
    px = varied_images(N_IMAGES)
    for split, ids in (("test", range(n_test)), ("train", range(n_test, n_test + n_train))):
        recs = []
        for k, i in enumerate(ids):
            name = f"img/{split}{k}.png"
            Image.fromarray(((px[i % N_IMAGES, 0] + 1) * 127.5).round().astype(np.uint8), mode="L").save(root / name)
            f, imp = REPORTS[i % len(REPORTS)].split(" IMPRESSION: ")
            recs.append({"id": f"{split}{k}", "images": [name], "split": split,
                         "ground_truth": {"findings": f.replace("FINDINGS: ", ""), "impression": imp}})
        (root / f"{split}.json").write_text(_json.dumps(recs))
    return root


def build_varied_engine(root, precisions: list[str], name: str = "engine", **options):
    """The varied test model (dcd, B=4, 24-token reports) built at `precisions` with AR graphs'
    worth of capacity, verified on 3 test images: (engine folder, data folder, build log lines).
    `options`: more BuildOptions fields."""
    from echo_export.build import BuildOptions, build
    from echo_train.model.checkpoint import save_checkpoint
    from tests.conftest import make_tokenizer
    from varied_models import as_stage, get_varied

    tok = make_tokenizer()
    model = as_stage(get_varied(tok, shifted=True, causal_context=True), "dcd", block_size=4)
    model.cfg.max_response_tokens = 24
    save_checkpoint(root / "ckpt", model, tok)
    data = write_varied_dataset(root / "data", 4, 3)
    logs: list[str] = []
    out = build(BuildOptions(ckpt=root / "ckpt", out=root / name, precisions=precisions, capacity=96,
                             calib_size=3, verify_n=3, data=data, **options), log=logs.append)
    return out, data, logs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained model whose reports vary (tests/varied_models.py): as the one-step student at
    block 4 and, with the same weights, as the AR baseline."""
    from echo_train.model.checkpoint import save_checkpoint
    from varied_models import as_stage, get_varied

    root = tmp_path_factory.mktemp("export")
    tok = make_tokenizer()
    base = get_varied(tok, shifted=True, causal_context=True)
    model = as_stage(base, "dcd", block_size=4)
    model.cfg.max_response_tokens = 24
    save_checkpoint(root / "ckpt", model, tok)
    ar = as_stage(base, "ar")
    ar.cfg.max_response_tokens = 12
    save_checkpoint(root / "ar", ar, tok)
    data = write_varied_dataset(root / "data", 4, 3)
    return root, model, tok, data


@pytest.fixture(scope="module")
def built(setup):
    from echo_export.build import BuildOptions, build

    root, _, _, data = setup
    logs: list[str] = []
    # int8 forced into the mode made for CPUs without VNNI (u8s7), whatever CPU runs the tests: it
    # computes the same numbers on both kinds, so every int8 assertion below holds on both. The
    # default (u8s8) on an AVX2 CPU without VNNI puts the prefill's keys 11% off fp32 (saturation).
    with pytest.MonkeyPatch.context() as mp:
        _observe_models(mp)  # for test_no_pytorch_model_is_held_in_the_int8_and_verify_phases
        out = build(BuildOptions(ckpt=root / "ckpt", out=root / "engine", precisions=["fp32", "fp16", "int8"],
                                 ar_ckpt=root / "ar", capacity=CAP, calib_size=3, verify_n=3, data=data,
                                 int8_mode="u8s7"),
                    log=logs.append)
    return out, logs


# what the `built` fixture's build had alive when int8 and verify ran (filled by _observe_models)
MODEL_OBSERVATIONS: dict[str, list] = {"loaded": [], "int8": [], "verify": []}


def _observe_models(mp) -> None:
    """Wrap the build's model loading, to_int8 and verify_block: record a weak reference to every
    model the build loads (and to one of its weights: an exported graph wraps the weights, not the
    model), and how many of them are alive when each int8 quantisation and the verification start."""
    import gc
    import weakref

    from echo_export import build as build_mod
    from echo_export import precision, verify
    from echo_train.model.echo_model import EchoModel

    obs = MODEL_OBSERVATIONS
    obs["alive_at_load"] = []
    gc.collect()
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), EchoModel)}
    real_load, real_int8, real_verify = build_mod._load_model, precision.to_int8, verify.verify_block

    def load(path, what):
        obs["alive_at_load"].append(alive())
        cfg, model, tok = real_load(path, what)
        obs["loaded"] += [weakref.ref(model), weakref.ref(model.lm.model.embed_tokens.weight)]
        return cfg, model, tok

    def alive() -> int:
        gc.collect()
        return sum(1 for r in obs["loaded"] if r() is not None) + sum(
            1 for o in gc.get_objects() if issubclass(type(o), EchoModel) and id(o) not in before)

    def int8(src, dst, feeds, **kw):
        obs["int8"].append((alive(), type(feeds).__name__))
        return real_int8(src, dst, feeds, **kw)

    def verify_block(*a, **kw):
        obs["verify"].append(alive())
        return real_verify(*a, **kw)

    mp.setattr(build_mod, "_load_model", load)
    mp.setattr(precision, "to_int8", int8)
    mp.setattr(verify, "verify_block", verify_block)


def test_graphs_pass_full_onnx_check_and_follow_graph_io(built):
    from runtime import graph_io as gio
    from runtime.manifest import load_manifest

    out, _ = built
    m = load_manifest(out)
    assert set(m.graphs) == set(gio.GRAPH_ROLES) - set(gio.MULTISTEP_ROLES)  # a student: no teacher passes
    for role, entries in m.graphs.items():
        # the in-place steps are onnxruntime-CPU only: no fp16, no static-QDQ int8 (graph_io.CPU_ONLY_ROLES)
        cpu_only = role in gio.CPU_ONLY_ROLES
        assert set(entries) == {f"{p}.b1" for p in (("fp32",) if cpu_only else ("fp32", "fp16", "int8"))}
        for key, fname in entries.items():
            assert fname == gio.graph_filename(role, key.split(".")[0], 1)
            if not cpu_only:  # its norms are onnxruntime's SimplifiedLayerNormalization, not an ONNX operator
                onnx.checker.check_model(str(out / fname), full_check=True)
            g = onnx.load(str(out / fname)).graph
            ins = tuple(i.name for i in g.input)
            outs = tuple(o.name for o in g.output)
            want_in = gio.PREFILL_INPUTS if role in (gio.VISION_PREFILL, gio.AR_PREFILL) else gio.STEP_INPUTS
            if cpu_only:
                want_in = gio.inplace_step_inputs(2)
            want_out = {gio.VISION_PREFILL: gio.PREFILL_OUTPUTS, gio.BLOCK_STEP: gio.BLOCK_STEP_OUTPUTS,
                        gio.AR_PREFILL: gio.AR_PREFILL_OUTPUTS, gio.AR_STEP: gio.AR_STEP_OUTPUTS,
                        gio.AR_STEP_INPLACE: gio.inplace_step_outputs(2),
                        gio.BLOCK_STEP_INPLACE: gio.inplace_step_outputs(2, gio.BLOCK_STEP_INPLACE)}[role]
            assert ins == want_in and outs == want_out
            # IO stays fp32 / int64 whatever the internal precision
            assert all(v.type.tensor_type.elem_type in (1, 7) for v in list(g.input) + list(g.output))
    bs = onnx.load(str(out / "block_step.fp32.b1.onnx")).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(bs.input) + list(bs.output)}
    assert dims["input_ids"] == [1, 8] and dims["past_key"] == [2, 1, 2, CAP, 16]
    assert dims["tokens"] == [1, 4] and dims["present_key"] == [2, 1, 2, 4, 16]


def test_fp32_tokens_identical_to_reference(built, setup):
    from echo_export.decode_loop import LoopSettings, decode, ort_runner, prefill_feeds
    from runtime.decode_mode import DecodeMode
    from varied_models import assert_informative
    from echo_train.decoding import fused_onestep_generate
    from runtime.preprocess import preprocess_image

    out, _ = built
    root, model, tok, data = setup
    rep = json.loads((out / "verify.json").read_text())
    assert rep["fp32_identical"] is True
    assert rep["variants"]["block.fp32.b1"]["exact_match"] == 1.0
    assert rep["variants"]["ar.fp32.b1"]["exact_match"] == 1.0
    # The varied model is confident (median fp32 confidence 0.97), so rounding should flip almost
    # nothing: measured 100% free-running and per-pass agreement for fp16 and for int8 (u8s7 and
    # u8s8 alike) on the 3 test images; 0.95 leaves room for one flip in 72 tokens.
    for k in ("block.fp16.b1", "block.int8.b1", "ar.fp16.b1", "ar.int8.b1"):
        assert rep["variants"][k]["token_agreement"] >= 0.95, (k, rep["variants"][k]["token_agreement"])
    for k in ("block.fp16.b1", "block.int8.b1"):
        # each variant's block step re-run on the fp32 run's own pass inputs
        v = rep["variants"][k]
        assert v["per_pass_token_agreement"] >= 0.95
        # flips counted consistently with the agreement; fp32's confidence reported where they happen
        f = v["per_pass_flips"]
        assert (f["flips"] == 0) == (v["per_pass_token_agreement"] == 1.0)
        assert 0.5 < f["fp32_confidence_median_all"] <= 1.0
        assert f["fp32_confidence_median_at_flips"] is None if f["flips"] == 0 else 0.0 < f["fp32_confidence_median_at_flips"] <= 1.0
        # the F1 change with its paired bootstrap interval: zero where every report is the same
        lo, hi = v["finding_f1_change_ci95"]
        assert lo - 1e-9 <= v["finding_f1_change"] <= hi + 1e-9
        if v["exact_match"] == 1.0:
            assert v["finding_f1_change"] == 0.0 and lo == hi == 0.0
    # independent check on every test image, here rather than through verify.py
    px = np.concatenate([preprocess_image(data / "img" / f"test{i}.png", model.cfg.vision.image_size)[None]
                         for i in range(3)])
    settings = LoopSettings.of(model.cfg.lm, CAP, tok, 24)
    raws = []
    for i in range(3):
        prefix = np.array([tok.prefix_ids(model.n_image_tokens)], np.int64)
        r = decode(DecodeMode.of("fused", prefix.shape[1], 4), ort_runner(out / "vision_prefill.fp32.b1.onnx"),
                   ort_runner(out / "block_step.fp32.b1.onnx"), prefix, prefill_feeds(px[i:i + 1], prefix), settings)
        ref = fused_onestep_generate(model, tok, torch.from_numpy(px[i:i + 1]), 4, 24)
        assert r.raw.tolist() == ref.raw.tolist()
        raws.append(r.raw[0].tolist())
    assert_informative(raws, tok.eos_id)  # reports that differ per image and within a report


def _fp32_block_feeds(out, setup, image: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode one dataset image with the engine's fp32 graphs; the prefill inputs and every
    block-step feed, as int8 calibration and the closeness checks use them."""
    from echo_export.decode_loop import LoopSettings, decode, ort_runner, prefill_feeds
    from runtime.decode_mode import DecodeMode
    from runtime.preprocess import preprocess_image

    _, model, tok, data = setup
    px = preprocess_image(data / "img" / image, model.cfg.vision.image_size)[None]
    prefix = np.array([tok.prefix_ids(model.n_image_tokens)], np.int64)
    feeds: list[dict] = []
    decode(DecodeMode.of("fused", prefix.shape[1], 4), ort_runner(out / "vision_prefill.fp32.b1.onnx"),
           ort_runner(out / "block_step.fp32.b1.onnx"), prefix, prefill_feeds(px, prefix),
           LoopSettings.of(model.cfg.lm, CAP, tok, 24), on_step=lambda f: feeds.append({k: v.copy() for k, v in f.items()}))
    return px, prefix, feeds


def test_int8_tensorrt_form_is_symmetric_and_as_close_to_fp32(built, setup, tmp_path):
    """The int8 graphs are tuned for onnxruntime (uint8 activations, int32 biases), which
    TensorRT refuses; their TensorRT form has only symmetric int8 Q/DQ, passes the full ONNX
    check, and is about as close to fp32 as the onnxruntime graph (checked here on onnxruntime)."""
    from onnx import helper, numpy_helper

    from echo_export.decode_loop import ort_runner
    from echo_export.precision import check_int8_qdq_for_tensorrt, int8_qdq_for_tensorrt

    out, _ = built
    px, prefix, feeds = _fp32_block_feeds(out, setup, "test0.png")
    role_feeds = {"vision_prefill": {"pixel_values": px, "prefix_ids": prefix}, "block_step": feeds[1]}
    for role, feed in role_feeds.items():
        src = out / f"{role}.int8.b1.onnx"
        assert any("UINT8" in b for b in check_int8_qdq_for_tensorrt(onnx.load(str(src))))
        dst = tmp_path / f"{role}.int8.b1.tensorrt.onnx"
        info = int8_qdq_for_tensorrt(src, dst)
        assert info["requantised_ranges"] > 0
        m = onnx.load(str(dst))
        assert check_int8_qdq_for_tensorrt(m) == [] and sum(n.op_type == "QuantizeLinear" for n in m.graph.node) > 0
        onnx.checker.check_model(str(dst), full_check=True)
        ref = ort_runner(out / f"{role}.fp32.b1.onnx")(feed)
        for name, got in (("onnxruntime int8", ort_runner(src)(feed)), ("tensorrt form", ort_runner(dst)(feed))):
            k_ref, k_got = ref[-2], got[-2]  # present_key: every layer's attention input
            rel = float(np.linalg.norm(k_got - k_ref) / np.linalg.norm(k_ref))
            assert rel < 0.05, (role, name, rel)
    # the check does catch an asymmetric uint8 pair
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    g = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
                           helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")],
                          "asym", [x], [y], inits)
    bad = check_int8_qdq_for_tensorrt(helper.make_model(g))
    assert len(bad) == 2 and "UINT8" in bad[0]


def _fp16_round_trips(g: onnx.GraphProto) -> int:
    """Cast(-> fp16) nodes read by a Cast(-> fp32): an fp32 tensor rounded through fp16."""
    prod = {o: n for n in g.node for o in n.output}
    to = lambda n: next(a.i for a in n.attribute if a.name == "to")  # noqa: E731
    return sum(1 for n in g.node if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT
               and n.input[0] in prod and prod[n.input[0]].op_type == "Cast"
               and to(prod[n.input[0]]) == onnx.TensorProto.FLOAT16)


def test_fp16_graphs_keep_their_fp32_islands_fp32(built, tmp_path):
    """The fp16 converter rounds the tensors between two fp32-kept nodes through fp16 (a Cast
    pair); the built graphs have no such pair left, so the rotary angles, norm statistics and
    head really are computed in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from echo_export.precision import FP16_OP_BLOCK, name_nodes, fp32_islands, output_head_nodes

    out, _ = built
    raw = onnx.load(str(out / "block_step.fp32.b1.onnx"))
    name_nodes(raw)
    keep = sorted(set(fp32_islands(raw)) | set(output_head_nodes(raw)))
    converted = convert_float_to_float16(raw, keep_io_types=True, node_block_list=keep,
                                         op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_OP_BLOCK)))
    assert _fp16_round_trips(converted.graph) > 0  # what the converter alone leaves
    for f in sorted(out.glob("*.fp16.b1.onnx")):
        assert _fp16_round_trips(onnx.load(str(f)).graph) == 0, f.name


def test_fp16_rotary_angles_stay_fp32_where_the_exporter_folded_them(setup, tmp_path):
    """At a large batch the exporter leaves the prefill's folded angle tables behind a Concat
    before Cos/Sin (batch 8 did on the demo model): nothing the angles are computed from may be
    fp16 (angles of tens of radians lose hundredths in fp16; the keys of every layer with them)."""
    from echo_export.graphs import example_inputs, export_graph, make_graph
    from echo_export.precision import to_fp16
    from runtime import graph_io as gio

    _, model, tok, _ = setup
    P = len(tok.prefix_ids(model.n_image_tokens))
    src, dst = tmp_path / "prefill.fp32.onnx", tmp_path / "prefill.fp16.onnx"
    export_graph(make_graph(gio.VISION_PREFILL, model, CAP, P, tok.mask_id),
                 example_inputs(gio.VISION_PREFILL, model.cfg, 64, CAP, P), src, 18)
    to_fp16(src, dst)
    g = onnx.load(str(dst)).graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {i.name: i.data_type for i in g.initializer}
    trig = [n for n in g.node if n.op_type in ("Cos", "Sin")]
    assert trig, "the export folded every angle at this batch: the case under test is gone"
    stack, seen, upstream = [i for n in trig for i in n.input], set(), []
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        assert inits.get(t) != onnx.TensorProto.FLOAT16, f"fp16 initializer {t} feeds the rotary angles"
        if t in prod:
            upstream.append(prod[t])
            stack.extend(prod[t].input)
    assert upstream
    for n in upstream:
        assert not (n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16), n.name


def test_manifest_hashes_and_tamper(built, tmp_path):
    from runtime.errors import ManifestError
    from runtime.manifest import load_manifest

    out, _ = built
    m = load_manifest(out)
    assert m.verified and m.block_size == 4 and m.capacity == CAP and m.batch_sizes == [1]
    assert {"tokenizer.json", "verify.json", "block_step.int8.b1.onnx"} <= set(m.files)
    assert m.versions["onnxruntime"] and m.opset >= 18
    copy = tmp_path / "engine"
    shutil.copytree(out, copy)
    f = copy / "block_step.fp16.b1.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError):
        load_manifest(copy)


def test_inspect_cli(built):
    from click.testing import CliRunner

    from echo_export.cli import main

    out, _ = built
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "every sha256 matches" in r.output and "past_key f32[2,1,2,96,16]" in r.output
    assert "block.fp16.b1" in r.output and "per-pass" in r.output  # the verification, pass by pass too
    assert "int8: mode u8s7, made for CPUs of kind avx2-no-vnni" in r.output
    assert all(f"weights.{p}.bin (" in r.output for p in ("fp32", "fp16", "int8"))


def _cli(args):
    from click.testing import CliRunner

    from echo_export.cli import main

    return CliRunner().invoke(main, ["build", *args])


def test_bad_inputs(setup, tmp_path):
    root, _, _, data = setup
    base = ["--capacity", str(CAP), "--data", str(data), "--calib-size", "2", "--verify-n", "1"]
    # missing checkpoint files
    broken = tmp_path / "broken"
    shutil.copytree(root / "ckpt", broken)
    (broken / "model.safetensors").unlink()
    r = _cli(["--ckpt", str(broken), "--out", str(tmp_path / "e1"), *base])
    assert r.exit_code == 2 and "missing model.safetensors" in r.output
    # stage-1 AR checkpoint as --ckpt
    r = _cli(["--ckpt", str(root / "ar"), "--out", str(tmp_path / "e2"), *base])
    assert r.exit_code == 2 and "stage-1" in r.output
    # unknown precision
    r = _cli(["--ckpt", str(root / "ckpt"), "--out", str(tmp_path / "e3"), "--precision", "fp32,bf8", *base])
    assert r.exit_code == 2 and "unknown precision bf8" in r.output
    # a capacity the reports do not fit in (prefix 64 + 24 new tokens at B=4 need 80 slots), refused
    # before any work; with shorter reports asked for it is enough
    r = _cli(["--ckpt", str(root / "ckpt"), "--out", str(tmp_path / "e6"), *base, "--capacity", "79"])
    assert r.exit_code == 2 and "pass --capacity 80 or more" in r.output and not (tmp_path / "e6").exists()
    # output folder exists
    (tmp_path / "e4").mkdir()
    r = _cli(["--ckpt", str(root / "ckpt"), "--out", str(tmp_path / "e4"), *base])
    assert r.exit_code == 2 and "--force" in r.output
    # unreadable calibration image
    bad_data = tmp_path / "bad_data"
    shutil.copytree(data, bad_data)
    (bad_data / "img" / "train1.png").write_bytes(b"not a png")
    r = _cli(["--ckpt", str(root / "ckpt"), "--out", str(tmp_path / "e5"), *base[:2], "--data", str(bad_data),
              "--precision", "fp32,int8", "--calib-size", "2", "--verify-n", "1"])
    assert r.exit_code == 2 and "train1.png" in r.output
    # nothing half-written anywhere
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["bad_data", "broken", "e4"] and not any((tmp_path / "e4").iterdir())


def test_capacity_follows_the_model(setup, tmp_path):
    """Without --capacity the cache holds exactly what the prefix and the longest report need:
    fused decoding stores the prefix's first P - B tokens and one block per pass but the last,
    AR every token but the last. The engine built that way reproduces the reference."""
    from echo_export.build import BuildOptions, build, required_capacity
    from runtime.manifest import load_manifest

    assert required_capacity(64, 4, 24) == 64 + 4 * 4  # 6 blocks: 5 stored, the first one's slots in the prefix
    assert required_capacity(64, 4, 4) == required_capacity(64, 4, 8) == 64  # one or two blocks: the prefix
    assert required_capacity(64, 4, 24, ar=(64, 12)) == 80 and required_capacity(64, 4, 24, ar=(64, 40)) == 103
    assert required_capacity(64, 4, 24, teacher=True) == 64 + 5 * 4  # the teacher also commits the last prompt block
    root, _, _, data = setup
    logs: list[str] = []
    out = build(BuildOptions(ckpt=root / "ckpt", out=tmp_path / "e", precisions=["fp32"], ar_ckpt=root / "ar",
                             verify_n=2, data=data), log=logs.append)
    m = load_manifest(out)
    assert m.capacity == 80 and m.verified
    assert any("capacity 80 KV slots: prefix 64 + 24 new tokens; AR prefix 64 + 12" in line for line in logs)


def test_verify_data_verifies_on_another_dataset(setup, tmp_path):
    """--verify-data: held-out images from a second dataset (here 5 test images; --data has 3),
    while int8 calibration still reads --data's training images; a folder without a test or val
    split is one clear error."""
    root, _, _, data = setup
    other = write_tiny_dataset(tmp_path / "other", 1, 5, REPORTS)
    base = ["--ckpt", str(root / "ckpt"), "--capacity", str(CAP), "--data", str(data), "--calib-size", "2",
            "--precision", "fp32,int8"]
    r = _cli([*base, "--out", str(tmp_path / "e"), "--verify-n", "5", "--verify-data", str(other)])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "e" / "verify.json").read_text())
    assert rep["n_images"] == 5 and rep["fp32_identical"] is True
    assert "calibration: 2 training images" in r.output
    (tmp_path / "empty").mkdir()
    r = _cli([*base, "--out", str(tmp_path / "e2"), "--verify-n", "2", "--verify-data", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "--verify-data" in r.output and not (tmp_path / "e2").exists()


def test_int8_mode_follows_the_cpu_and_is_recorded(built):
    """auto picks u8s8 where VNNI makes u8 x s8 exact and u8s7 on AVX2 without it; an explicit mode
    wins; the choice and the build CPU go into manifest.json and verify.json alike."""
    from echo_export.build import BuildError, resolve_int8_mode
    from runtime.cpu_features import AVX2_NO_VNNI, OTHER, VNNI, CpuFeatures
    from runtime.manifest import load_manifest

    def cpu(**kw) -> CpuFeatures:
        base = dict(machine="x86_64", avx2=True, avx512f=False, avx512_vnni=False, avx_vnni=False, avx512_bf16=False)
        return CpuFeatures(**{**base, **kw})

    assert cpu().int8_kind == AVX2_NO_VNNI and cpu(avx2=False).int8_kind == OTHER
    assert cpu(avx512f=True, avx512_vnni=True).int8_kind == cpu(avx_vnni=True).int8_kind == VNNI
    assert resolve_int8_mode("auto", cpu())["mode"] == "u8s7"
    assert resolve_int8_mode("auto", cpu(avx512f=True))["mode"] == "u8s7"  # AVX-512 without VNNI saturates too
    assert resolve_int8_mode("auto", cpu(avx512f=True, avx512_vnni=True))["mode"] == "u8s8"
    assert resolve_int8_mode("auto", cpu(avx_vnni=True))["mode"] == "u8s8"
    forced = resolve_int8_mode("u8s8", cpu())
    assert forced["mode"] == "u8s8" and forced["chosen_for"] == VNNI and forced["build_cpu"]["int8_kind"] == AVX2_NO_VNNI
    with pytest.raises(BuildError, match="unknown --int8-mode"):
        resolve_int8_mode("u4s4", cpu())
    out, logs = built
    m = load_manifest(out)
    rep = json.loads((out / "verify.json").read_text())
    assert m.int8 == rep["int8"]
    assert m.int8["mode"] == "u8s7" and m.int8["requested"] == "u8s7" and m.int8["chosen_for"] == AVX2_NO_VNNI
    assert set(m.int8["build_cpu"]) >= {"avx2", "avx512_vnni", "avx_vnni", "int8_kind"}
    assert any("int8: mode u8s7" in line for line in logs)


def test_u8s7_weights_cannot_saturate_avx2_and_u8s8_weights_can(built, setup, tmp_path):
    """AVX2 without VNNI sums pairs of u8 x s8 products in int16: only 7-bit weights (|q| <= 64) keep
    2 * 255 * |q| below 32767. Every int8 graph of the (u8s7) engine passes that check; the same graph
    quantised as u8s8 fails it."""
    from echo_export.precision import check_int8_avx2_safe, to_int8

    out, _ = built
    int8_graphs = sorted(out.glob("*.int8.*.onnx"))
    assert len(int8_graphs) == 4
    for g in int8_graphs:
        assert check_int8_avx2_safe(onnx.load(str(g))) == [], g.name
    _, _, feeds = _fp32_block_feeds(out, setup, "train0.png")
    info = to_int8(out / "block_step.fp32.b1.onnx", tmp_path / "u8s8.onnx", feeds, mode="u8s8", workdir=tmp_path)
    assert info["mode"] == "u8s8"
    bad = check_int8_avx2_safe(onnx.load(str(tmp_path / "u8s8.onnx")))
    assert bad and all("max |q| = 127" in b for b in bad)


def test_int8_engine_on_the_other_kind_of_cpu_is_warned(built):
    """echo-report warns when an int8 engine made for one kind of CPU runs on the other."""
    from click.testing import CliRunner

    from runtime.cli import main
    from runtime.cpu_features import AVX2_NO_VNNI, VNNI, CpuFeatures, detect_cpu_features, int8_cpu_mismatch

    vnni = CpuFeatures("x86_64", avx2=True, avx512f=True, avx512_vnni=True, avx_vnni=False, avx512_bf16=False)
    avx2 = CpuFeatures("x86_64", avx2=True, avx512f=False, avx512_vnni=False, avx_vnni=False, avx512_bf16=False)
    assert int8_cpu_mismatch(VNNI, vnni) is None and int8_cpu_mismatch(AVX2_NO_VNNI, avx2) is None
    assert "saturate" in int8_cpu_mismatch(VNNI, avx2)
    assert "closer to fp32" in int8_cpu_mismatch(AVX2_NO_VNNI, vnni)
    out, _ = built
    r = CliRunner().invoke(main, ["--engine-dir", str(out), "--precision", "int8", str(out.parent / "data" / "img" / "test0.png")])
    assert r.exit_code == 0, r.output
    # the engine is u8s7 (made for AVX2 without VNNI): a warning exactly on a VNNI CPU
    expected = int8_cpu_mismatch(AVX2_NO_VNNI, detect_cpu_features())
    assert ("warning:" in r.stderr) == (expected is not None)
    r = CliRunner().invoke(main, ["--engine-dir", str(out), str(out.parent / "data" / "img" / "test0.png")])
    assert r.exit_code == 0 and "warning:" not in r.stderr  # fp32: nothing to warn about


def test_each_precision_stores_its_weights_once(built, setup):
    """Every graph of one precision reads weights.<precision>.bin, in which each distinct tensor is
    stored once; the manifest hashes the data files; the fp32 file is at most 1.1x the two models'
    fp32 parameter bytes (the AR and the one-step model: four graphs, two models)."""
    from echo_export.external_weights import external_data_files, weights_filename
    from echo_train.model.checkpoint import load_checkpoint
    from runtime.manifest import load_manifest

    out, _ = built
    root = setup[0]
    m = load_manifest(out)
    for prec in ("fp32", "fp16", "int8"):
        data = weights_filename(prec)
        assert data in m.files and m.files[data].size == (out / data).stat().st_size
        graphs = sorted(out.glob(f"*.{prec}.b1.onnx"))
        # fp32 also holds the in-place steps (onnxruntime CPU), reading the same stored tensors
        assert len(graphs) == (6 if prec == "fp32" else 4) and all(external_data_files(g) == {data} for g in graphs)
        seen: dict[bytes, tuple[int, int]] = {}
        blob = (out / data).read_bytes()
        for g in graphs:
            for t in onnx.load(str(g), load_external_data=False).graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                where = (int(info["offset"]), int(info["length"]))
                content = blob[where[0]:where[0] + where[1]]
                assert seen.setdefault(content, where) == where, f"{t.name} stored twice in {data}"
        assert len(seen) > 10
    n_params = sum(p.numel() for d in ("ckpt", "ar") for p in load_checkpoint(root / d)[0].parameters())
    assert (out / "weights.fp32.bin").stat().st_size <= 1.1 * 4 * n_params  # measured 1.04x


def test_shared_weights_compute_the_same_and_altered_data_is_refused(built, setup, tmp_path):
    """A graph reading weights.fp32.bin gives exactly the outputs of its self-contained copy; an
    engine folder whose data file was altered, truncated or removed is refused."""
    from echo_export.decode_loop import ort_runner
    from runtime.errors import ManifestError
    from runtime.manifest import load_manifest

    out, _ = built
    _, model, tok, _ = setup
    inline = tmp_path / "vision_prefill.inline.onnx"
    onnx.save(onnx.load(str(out / "vision_prefill.fp32.b1.onnx")), str(inline))  # loads the external weights
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(inline)).graph.initializer)
    rng = np.random.default_rng(0)
    feed = {"pixel_values": rng.uniform(-1, 1, (1, 1, 32, 32)).astype(np.float32),
            "prefix_ids": np.array([tok.prefix_ids(model.n_image_tokens)], np.int64)}
    shared, alone = ort_runner(out / "vision_prefill.fp32.b1.onnx")(feed), ort_runner(inline)(feed)
    assert all(np.array_equal(a, b) for a, b in zip(shared, alone)) and np.abs(shared[0]).max() > 0
    for damage in ("flip", "truncate", "remove"):
        eng = tmp_path / damage
        shutil.copytree(out, eng)
        data = eng / "weights.fp32.bin"
        blob = bytearray(data.read_bytes())
        if damage == "flip":
            blob[len(blob) // 2] ^= 0xFF
            data.write_bytes(bytes(blob))
        elif damage == "truncate":
            data.write_bytes(bytes(blob[:-100]))
        else:
            data.unlink()
        with pytest.raises(ManifestError, match="weights.fp32.bin"):
            load_manifest(eng)


def test_fp16_graph_has_no_fp16_overflowing_constants(built):
    from echo_export.precision import check_fp16_constants

    out, _ = built
    assert check_fp16_constants(onnx.load(str(out / "block_step.fp32.b1.onnx"))) == []
    m = onnx.load(str(out / "block_step.fp16.b1.onnx"))
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            assert np.isfinite(onnx.numpy_helper.to_array(t)).all()
    # the output head (lm_head MatMul -> ArgMax) computes in fp32: its input arrives through a Cast to float
    from echo_export.precision import output_head_nodes

    head = set(output_head_nodes(m))
    matmuls = [n for n in m.graph.node if n.name in head and n.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) == 1
    prod = {o: n for n in m.graph.node for o in n.output}
    src = prod.get(matmuls[0].input[0])
    assert src is not None and src.op_type == "Cast" and src.attribute[0].i == onnx.TensorProto.FLOAT


def test_tensorrt_build_skips_without_tensorrt(built):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (the [trt] extra needs CUDA)")
    from echo_export.tensorrt_build import build_engine

    from echo_export.tensorrt_build import build_all

    out, _ = built
    plan = build_engine(out / "block_step.fp32.b1.onnx", out.parent / "bs.plan")
    assert plan.stat().st_size > 0 and trt is not None
    work = out.parent / "trt_int8"
    work.mkdir(exist_ok=True)
    shutil.copyfile(out / "block_step.int8.b1.onnx", work / "block_step.int8.b1.onnx")
    plans = build_all(work, ["block_step.int8.b1.onnx"], timing_cache=work / "cache")
    assert (work / plans["block_step.int8.b1.onnx"]).stat().st_size > 0
    assert (work / "block_step.int8.b1.tensorrt.onnx").is_file()


def test_tensorrt_missing_gives_clear_error(monkeypatch):
    import sys

    from echo_export.tensorrt_build import TensorRTUnavailable, import_trt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"\[trt\] extra"):
        import_trt()


def test_runtime_engine_reads_the_folder(built, setup):
    """The production runtime (when present) decodes the built folder to the reference tokens."""
    engine = pytest.importorskip("runtime.engine", reason="runtime/engine.py not written yet")
    from echo_train.decoding import fused_onestep_generate
    from runtime.preprocess import preprocess_image

    out, _ = built
    _, model, tok, data = setup
    paths = [str(data / "img" / f"test{i}.png") for i in range(2)]
    reps = engine.EchoRuntime(out, backend="ort", precision="fp32").generate(paths, max_new_tokens=24)
    for p, r in zip(paths, reps):
        px = torch.from_numpy(preprocess_image(p, model.cfg.vision.image_size)[None])
        assert r.tokens == fused_onestep_generate(model, tok, px, 4, 24).tokens[0]


def test_fp32_mismatch_fails_the_build_without_a_manifest(setup, tmp_path, monkeypatch):
    import echo_export.verify as verify
    from echo_export.build import BuildError, BuildOptions, build

    root, _, _, data = setup
    real = verify.verify_block

    def broken(*a, **k):
        rep = real(*a, **k)
        rep["variants"]["block.fp32.b1"]["identical"] = False
        return rep

    monkeypatch.setattr(verify, "verify_block", broken)
    with pytest.raises(BuildError, match="do not reproduce"):
        build(BuildOptions(ckpt=root / "ckpt", out=tmp_path / "eng", precisions=["fp32"], capacity=CAP,
                           verify_n=1, data=data), log=lambda s: None)
    assert not (tmp_path / "eng").exists()
    assert (tmp_path / "eng.failed" / "verify.json").is_file()
    assert not (tmp_path / "eng.failed" / "manifest.json").exists()
    assert not (tmp_path / ".eng.building").exists()


def test_float32_min_mask_fills_become_fp16_safe(tmp_path):
    """transformers' vision masks use Where(keep, 0, float32.min); the fp16 graph must stay finite."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from echo_export.precision import to_fp16

    fmin = np.finfo(np.float32).min
    g = helper.make_graph(
        [helper.make_node("Where", ["keep", "zero", "fill"], ["bias"]),
         helper.make_node("Add", ["scores", "bias"], ["masked"]),
         helper.make_node("Softmax", ["masked"], ["probs"], axis=-1)],
        "mask",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("fill", TensorProto.FLOAT, [], [float(fmin)])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(m, tmp_path / "m.onnx")
    to_fp16(tmp_path / "m.onnx", tmp_path / "m16.onnx")
    feed = {"scores": np.random.rand(2, 4).astype(np.float32), "keep": np.array([[1, 1, 0, 1], [1, 0, 0, 1]], bool)}
    a = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feed)[0]
    b = ort.InferenceSession(str(tmp_path / "m16.onnx")).run(None, feed)[0]
    assert np.isfinite(b).all() and np.abs(a - b).max() < 1e-2 and (b[~feed["keep"]] < 1e-6).all()


def test_int8_min_weight_selects_only_large_weight_matmuls(setup, built):
    """--int8-min-weight: small projections stay fp32, large ones (MLP, lm_head) are quantised."""
    from echo_export.precision import weight_matmuls

    root, *_ = setup
    model = onnx.load(str(root / "engine" / "block_step.fp32.b1.onnx"))
    every = weight_matmuls(model)
    sizes = sorted({int(np.prod(i.dims)) for i in model.graph.initializer if len(i.dims) == 2})
    counts = [len(weight_matmuls(model, t)) for t in sizes]
    assert every and counts[0] == len(every)
    assert counts == sorted(counts, reverse=True)  # a higher threshold never selects more
    assert any(0 < c < len(every) for c in counts)  # some threshold keeps the small ones fp32
    assert weight_matmuls(model, sizes[-1] + 1) == []


def test_int8_skip_input_dims_keeps_exactly_the_down_projections_fp32(setup, built):
    """The down projections (input = intermediate size) are left out; nothing else is."""
    from echo_export.precision import weight_matmuls

    root, *_ = setup
    model = onnx.load(str(root / "engine" / "block_step.fp32.b1.onnx"))
    cfg = json.loads((root / "engine" / "manifest.json").read_text())["model_config"]["lm"]
    every = weight_matmuls(model)
    kept = weight_matmuls(model, skip_input_dims=[cfg["intermediate_size"]])
    assert set(kept) < set(every)
    assert len(every) - len(kept) == cfg["num_hidden_layers"]  # one down_proj per layer
    # the engine's int8 graph quantised exactly the selected ones
    q8 = onnx.load(str(root / "engine" / "block_step.int8.b1.onnx"))
    n_int8_weights = sum(1 for n in q8.graph.node if n.op_type == "DequantizeLinear"
                         and any(i.name == n.input[0] and i.data_type == onnx.TensorProto.INT8 for i in q8.graph.initializer))
    assert n_int8_weights == len(kept)


def test_export_prints_no_exporter_registry_noise(setup, tmp_path):
    """The dynamo exporter logs lines about torchvision ops for every graph; the build's output stays clean."""
    import logging

    from echo_export.graphs import example_inputs, export_graph, make_graph
    from runtime import graph_io

    _, model, tok, _ = setup
    p_len = len(tok.prefix_ids(model.n_image_tokens))
    graph = make_graph(graph_io.AR_STEP, model, CAP, p_len, tok.mask_id)
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    before = registry.level
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect(logging.DEBUG)
    registry.addHandler(handler)
    try:
        export_graph(graph, example_inputs(graph_io.AR_STEP, model.cfg, 1, CAP, p_len), tmp_path / "g.onnx")
    finally:
        registry.removeHandler(handler)
    assert (tmp_path / "g.onnx").stat().st_size > 0
    assert not [m for m in seen if "torchvision" in m]
    assert registry.level == before


def test_external_weights_build_decodes_like_a_self_contained_one(built, setup, tmp_path):
    """The default build moves every tensor of at least 1 KiB into weights.<precision>.bin right
    after each graph is written, so fp16 conversion and int8 quantisation run on graphs whose
    weights are external (the path a >2 GB model takes). A build whose threshold keeps every
    tensor inside its graph takes the in-memory path; both decode the same tokens in every
    precision, and its summary JSON reports each phase's time and peak memory."""
    import json

    from echo_export.build import BuildOptions, build
    from echo_export.precision import has_external_data
    from runtime.engine import EchoRuntime
    from varied_models import assert_informative

    root, _, tok, data = setup
    out, _ = built
    summary = tmp_path / "summary.json"
    inline = build(BuildOptions(ckpt=root / "ckpt", out=tmp_path / "inline", precisions=["fp32", "fp16", "int8"],
                                capacity=CAP, calib_size=3, verify_n=0, data=data, int8_mode="u8s7",
                                weights_min_bytes=1 << 40, summary_json=summary), log=lambda s: None)
    images = sorted(str(p) for p in (data / "img").glob("test*.png"))
    for prec in ("fp32", "fp16", "int8"):
        assert has_external_data(out / f"block_step.{prec}.b1.onnx")
        assert not has_external_data(inline / f"block_step.{prec}.b1.onnx")
        want = [r.tokens for r in EchoRuntime(inline, precision=prec).generate(images)]
        got = [r.tokens for r in EchoRuntime(out, precision=prec).generate(images)]
        assert got == want, prec
        assert_informative(got, tok.eos_id)
    s = json.loads(summary.read_text())
    assert set(s["phases"]) >= {"check", "export", "fp16", "int8"} and s["verified"] is False
    assert all(p["seconds"] > 0 and p["peak_rss_bytes"] > 50e6 for p in s["phases"].values())
    # each phase resets the kernel's high-water mark: the whole build's peak is the largest phase peak
    assert s["process_peak_rss_bytes"] >= max(p["peak_rss_bytes"] for p in s["phases"].values())
    assert s["folder_bytes"] == sum(f.stat().st_size for f in inline.iterdir() if f.name != "manifest.json")


def _old_to_int8(src, dst, feeds, work):
    """The int8 path before calibration was chunked: one quantize_static call that calibrates on
    every feed at once (what `to_int8` did), for comparison."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from echo_export.precision import ListDataReader, name_nodes, has_external_data, weight_matmuls

    pre = work / "old.pre.onnx"
    external = has_external_data(src)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
    model = onnx.load(str(pre), load_external_data=False)
    name_nodes(model)
    onnx.save(model, str(pre))
    quantize_static(str(pre), str(dst), ListDataReader(feeds, [i.name for i in model.graph.input]),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                    nodes_to_quantize=weight_matmuls(model), per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def test_int8_calibration_in_chunks_from_disk_equals_all_at_once(built, setup, tmp_path):
    """int8 calibration reads its feeds from disk a few at a time (FeedStore, `calib_chunk` feeds
    per collect_data call) and hands the ranges to the quantiser: the MinMax ranges, and so every
    scale, zero point and int8 weight of the graph, are exactly those of one quantize_static call
    over all the feeds in memory."""
    from onnx import numpy_helper

    from echo_export.precision import FeedStore, minmax_ranges, to_int8

    out, _ = built
    feeds = []
    for image in ("train0.png", "train1.png"):
        feeds += _fp32_block_feeds(out, setup, image)[2]
    assert len(feeds) >= 8
    store = FeedStore(tmp_path / "feeds")
    for f in feeds:
        store.append(f)
    assert len(store) == len(feeds) and all(np.array_equal(store[3][k], feeds[3][k]) for k in feeds[3])
    src = out / "block_step.fp32.b1.onnx"
    _old_to_int8(src, tmp_path / "old.onnx", feeds, tmp_path)
    to_int8(src, tmp_path / "new.onnx", store, mode="u8s7", workdir=tmp_path, calib_chunk=3)
    old, new = (onnx.load(str(tmp_path / f"{n}.onnx"), load_external_data=False) for n in ("old", "new"))
    old_init = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in old.graph.initializer}
    new_init = {t.name: numpy_helper.to_array(t, str(tmp_path)) for t in new.graph.initializer}
    assert old_init.keys() == new_init.keys()
    scales = [k for k in old_init if k.endswith("_scale")]
    assert len(scales) > 10
    for k, v in old_init.items():
        assert v.dtype == new_init[k].dtype and np.array_equal(v, new_init[k]), k
    assert [n.op_type for n in old.graph.node] == [n.op_type for n in new.graph.node]
    assert not list(tmp_path.glob("*.calib.json")) and not list(tmp_path.glob("new.pre.onnx*"))
    # the ranges themselves: chunks of 3 merge to the single-call ranges, and a chunk alone does not
    pre = out / "block_step.fp32.b1.onnx"  # the calibrator reads it (and its weights) as it is
    names = [i.name for i in onnx.load(str(pre)).graph.input]
    idx = list(range(len(store)))
    whole = minmax_ranges(pre, store, idx, names, external=False, workdir=tmp_path, chunk=len(idx)).data
    chunked = minmax_ranges(pre, store, idx, names, external=False, workdir=tmp_path, chunk=3).data
    first = minmax_ranges(pre, store, idx[:3], names, external=False, workdir=tmp_path, chunk=3).data
    assert whole.keys() == chunked.keys()
    assert all(np.array_equal(whole[k].range_value, chunked[k].range_value) for k in whole)
    assert any(not np.array_equal(whole[k].range_value, first[k].range_value) for k in whole)


def test_no_pytorch_model_is_held_in_the_int8_and_verify_phases(built):
    """The build holds one PyTorch model at a time (none while it loads the next), runs its PyTorch
    decodes (verification references, int8 calibration feeds) right after each family's export
    and lets each model go: while int8 quantises and verify runs, no
    EchoModel the build loaded is alive, nor its weights (the exporter's rewriter kept the last
    graph, which wraps them), and the feeds come from disk. (Observed in the `built` fixture's
    build; that its verify results are those of a build holding the models: the other tests.)"""
    out, _ = built
    obs = MODEL_OBSERVATIONS
    # the AR model for the checks, the student, the AR model again for its export: one at a time
    assert len(obs["loaded"]) == 2 * 3 and obs["alive_at_load"] == [0, 0, 0]
    assert obs["int8"] == [(0, "FeedStore")] * 4
    assert obs["verify"] == [0]
    assert not (out / ".calib").exists() and not list(out.glob("*.npz"))


def test_inplace_ar_step_is_verified_and_is_what_the_runtime_runs(built, setup):
    """The AR step's in-place CPU form (echo_export/inplace_steps.py: one GroupQueryAttention per
    layer over caches written in place) is verified like ar_step (identical to the PyTorch reference
    in fp32), and the runtime runs it on onnxruntime's CPU: the same reports as the standard step,
    also on a decode that runs the cache full (the last pass writes into the spare slot)."""
    import json

    from runtime.engine import EchoRuntime
    from varied_models import assert_informative

    out, _ = built
    _, _, tok, data = setup
    v = json.loads((out / "verify.json").read_text())["variants"]["ar_inplace.fp32.b1"]
    assert v["identical"] and v["n_images"] == 3
    import onnx

    g = onnx.load(str(out / "ar_step_inplace.fp32.b1.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    n_layers = ops.count("GroupQueryAttention")
    # CPU fusions (echo_export/cpu_fusion.py): q/k/v one packed projection; residual Adds in the norms
    # (straight into GroupQueryAttention as its packed query: no Split, no key or value input)
    assert sum(n.name.endswith("_qkv") for n in g.node) == n_layers and ops.count("Split") == 0
    assert all(list(n.input[1:3]) == ["", ""] for n in g.node if n.op_type == "GroupQueryAttention")
    assert ops.count("RotaryEmbedding") == 0  # rotary inside the attention node
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    # the fp32 argmax screened by an 8-bit lm_head (echo_export/screened_argmax.py), full head as fallback
    assert ops.count("If") == 1 and any("screen_approx" in n.output for n in g.node)
    paths = [str(data / "img" / f"test{i}.png") for i in range(3)]
    rt = EchoRuntime(out, precision="fp32", mode="ar", threads=1)
    std = EchoRuntime(out, precision="fp32", mode="ar", threads=1, inplace_steps=False)
    dec = rt._decoder("ar", 1)
    assert dec.inplace and dec.step.path.name == "ar_step_inplace.fp32.b1.onnx"
    assert not std._decoder("ar", 1).inplace and dec.cap == std._decoder("ar", 1).cap
    got, want = ([r.tokens for r in x.generate(paths, mode="ar")] for x in (rt, std))
    assert got == want
    assert_informative(got, tok.eos_id)
    rt.tokenizer.eos_id = std.tokenizer.eos_id = -1  # no stop: as far as the cache holds
    full, full_std = (x.generate(paths[1:2], max_new_tokens=CAP, mode="ar")[0] for x in (rt, std))
    assert full.stop == full_std.stop == "capacity" and full.tokens == full_std.tokens
    assert len(set(full.tokens)) > 4


def test_inplace_block_step_is_verified_and_is_what_the_runtime_runs(built, setup):
    """The one-step pass's in-place CPU form (block_step_inplace) is verified like block_step
    (identical to the PyTorch reference in fp32), and the runtime's one-step loop runs it on
    onnxruntime's CPU: the same reports as block_step, also when the cache runs full (the last
    pass writes both its blocks into the spare slots)."""
    import json

    import onnx

    from runtime.engine import EchoRuntime
    from varied_models import assert_informative

    out, _ = built
    _, _, tok, data = setup
    v = json.loads((out / "verify.json").read_text())["variants"]["block_inplace.fp32.b1"]
    assert v["identical"] and v["n_images"] == 3 and v["role"] == "block_inplace"
    g = onnx.load(str(out / "block_step_inplace.fp32.b1.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    n_layers = ops.count("GroupQueryAttention")
    assert n_layers == 2 and ops.count("Split") == 0 and ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers
    assert ops.count("If") == 0  # its confidence needs the full softmax: no screened argmax
    paths = [str(data / "img" / f"test{i}.png") for i in range(3)]
    rt = EchoRuntime(out, precision="fp32", threads=1)
    std = EchoRuntime(out, precision="fp32", threads=1, inplace_steps=False)
    dec, dec_std = rt._decoder("fused", 1), std._decoder("fused", 1)
    assert dec.inplace and dec.step.path.name == "block_step_inplace.fp32.b1.onnx"
    assert not dec_std.inplace and dec.cap == dec_std.cap
    got, want = ([r.tokens for r in x.generate(paths)] for x in (rt, std))
    assert got == want
    assert_informative(got, tok.eos_id)
    rt.tokenizer.eos_id = std.tokenizer.eos_id = -1  # no stop: as far as the cache holds
    full, full_std = (x.generate(paths[1:2], max_new_tokens=CAP)[0] for x in (rt, std))
    assert full.stop == full_std.stop == "capacity" and full.tokens == full_std.tokens
    assert len(set(full.tokens)) > 4
