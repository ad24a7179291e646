"""Native-resolution images (runtime/native_image.py, Qwen25VisionTower.forward_native) against
transformers: the processor's pixels and grid, smart_resize, the vision tower's image features,
get_rope_index's positions, and one exported tower graph serving two grid sizes in onnxruntime.
Tiny random configs built here; nothing is downloaded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.errors import ImageReadError
from runtime.native_image import (CLIP_MEAN, CLIP_STD, VisionGridSpec, mrope_position_ids, native_image,
                                  native_image_from_path, patch_rows_cols, smart_resize, window_layout)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402

# a tiny tower with the real one's structure: windows of 4 x 4 LM tokens (W = 64 patches), window
# blocks before and after a full-attention block
PATCH, MERGE = 4, 2
VISION = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=48, patch_size=PATCH,
              spatial_merge_size=MERGE, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1], in_chans=3)
IDS = dict(image_token_id=60, video_token_id=61, vision_start_token_id=58, vision_end_token_id=59)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An 8-bit grey radiograph-like image (smooth structure plus noise, not spanning 0..255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + 60 * np.sin(xx / (3 + w / 40) + seed) * np.cos(yy / (5 + h / 50)) + rng.normal(0, 20, (h, w))
    return np.clip(img, 15, 230).astype(np.uint8)


def _processor(spec: VisionGridSpec):
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size,
               min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, image_mean=list(spec.image_mean),
               image_std=list(spec.image_std))


def _hf_pixels(grey: np.ndarray, spec: VisionGridSpec):
    """pixel_values, (gh, gw) of the image as the official code gives it: RGB of the grey image."""
    out = _processor(spec)(Image.fromarray(grey, mode="L").convert("RGB"), return_tensors="np")
    t, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    assert t == 1
    return np.asarray(out["pixel_values"]), (gh, gw)


# ---------------------------------------------------------------------------- pixels
PIXEL_CASES = [  # (height, width, max_pixels): small, portrait, scaled down, over the official limit
    (53, 97, None), (300, 200, None), (2000, 1600, 200_000), (1700, 1500, None), (20, 31, None)]


@pytest.mark.parametrize("h,w,max_pixels", PIXEL_CASES)
def test_pixels_equal_the_processor(h, w, max_pixels):
    spec = VisionGridSpec() if max_pixels is None else VisionGridSpec(max_pixels=max_pixels)
    grey = _image(h, w, seed=h)
    want, grid = _hf_pixels(grey, spec)
    got = native_image(grey, spec)
    diff = float(np.abs(got.patches - want).max())
    print(f"\n[pixels] {h}x{w} (max_pixels {spec.max_pixels}) -> {got.size[0]}x{got.size[1]} px, grid {got.grid}, "
          f"{got.n_tokens} LM tokens: max |diff| {diff:.1e}")
    assert got.grid == grid and got.patches.shape == want.shape and got.patches.dtype == np.float32
    assert got.llm_grid == (grid[0] // 2, grid[1] // 2) and got.n_tokens * 4 == got.n_patches
    assert got.size[0] * got.size[1] <= spec.max_pixels and got.size[0] * got.size[1] >= spec.min_pixels
    assert diff < 1e-6  # the same 8-bit resize and the same float arithmetic


def test_pixels_from_a_file_and_bad_inputs(tmp_path):
    """The path reader reads what Image.open(path).convert("RGB") reads for a grey PNG; a 16-bit
    image is stretched to 8 bits first (as_8bit); bad files are ImageReadErrors naming them."""
    spec = VisionGridSpec(max_pixels=100_000)
    grey = _image(90, 140, seed=3)
    Image.fromarray(grey, mode="L").save(tmp_path / "a.png")
    got = native_image_from_path(tmp_path / "a.png", spec)
    out = _processor(spec)(Image.open(tmp_path / "a.png").convert("RGB"), return_tensors="np")
    assert np.abs(got.patches - out["pixel_values"]).max() < 1e-6
    wide = grey.astype(np.float32) * 200.0  # a 16-bit radiograph's range
    stretched = np.round((wide - wide.min()) / (wide.max() - wide.min()) * 255).astype(np.uint8)
    assert np.abs(native_image(wide, spec).patches - _hf_pixels(stretched, spec)[0]).max() < 1e-6
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageReadError, match="bad.png"):
        native_image_from_path(tmp_path / "bad.png", spec)
    Image.fromarray(np.zeros((2, 500), np.uint8), mode="L").save(tmp_path / "thin.png")
    with pytest.raises(ImageReadError, match="thin.png.*aspect ratio"):
        native_image_from_path(tmp_path / "thin.png", spec)


def test_smart_resize_equals_transformers():
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4000, (400, 2))]
    sizes += [(28, 28), (14, 42), (1, 150), (3000, 2500)]
    settings = [(28, 56 * 56, 2_250_000), (28, 56 * 56, 28 * 28 * 1280), (8, 64, 4096), (28, 200_000, 400_000)]
    n = 0
    for factor, lo, hi in settings:
        for h, w in sizes:
            try:
                want = hf_pil.smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            except ValueError:
                with pytest.raises(ValueError):
                    smart_resize(h, w, factor, lo, hi)
                continue
            assert smart_resize(h, w, factor, lo, hi) == want, (h, w, factor, lo, hi)
            n += 1
    print(f"\n[smart_resize] {n} sizes x settings equal to transformers'")
    assert n > 1000


def test_spec_from_config():
    """A checkpoint's vision dict: the tower's own settings (hf_config) first, then ECHO's fields."""
    d = {"family": "qwen2_5_vl", "patch_size": 14, "merge_size": 2, "num_channels": 3, "image_mean": [0.5] * 3,
         "image_std": [0.25] * 3, "hf_config": {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                                 "window_size": 112, "in_chans": 3}, "max_pixels": 1_000_000}
    spec = VisionGridSpec.from_config(d)
    assert (spec.factor, spec.window_tokens, spec.window_patches, spec.patch_dim) == (28, 4, 64, 1176)
    assert spec.max_pixels == 1_000_000 and spec.min_pixels == 56 * 56 and spec.image_mean == (0.5,) * 3
    assert VisionGridSpec.from_config({}) == VisionGridSpec()
    assert VisionGridSpec().max_pixels == 2_250_000 and VisionGridSpec().image_std == tuple(CLIP_STD)
    with pytest.raises(ValueError, match="Qwen2.5-VL"):
        VisionGridSpec.from_config({"family": "siglip"})
    with pytest.raises(ValueError, match="window_size"):
        VisionGridSpec(window_size=100)


# ---------------------------------------------------------------------------- windows, positions
def _hf_window_index(gh: int, gw: int, spec: VisionGridSpec):
    from transformers.vision_utils import get_vision_window_index

    idx, cu = get_vision_window_index(torch.tensor([[1, gh, gw]]), spec.merge_size, spec.window_size, spec.patch_size)
    return idx.numpy(), cu.numpy()


@pytest.mark.parametrize("gh,gw", [(8, 8), (14, 22), (16, 6), (2, 34), (10, 10)])
def test_windows_are_transformers_windows(gh, gw):
    """The padded gather holds, window by window, exactly the patches of transformers' windows, in
    its order; the inverse puts every patch back."""
    spec = VisionGridSpec(patch_size=PATCH, window_size=32)
    gather, valid, inverse = window_layout(gh, gw, MERGE, spec.window_tokens)
    idx, cu = _hf_window_index(gh, gw, spec)
    mm = MERGE * MERGE
    want = (idx[:, None] * mm + np.arange(mm)).reshape(-1)  # tokens -> their patches, transformers' order
    assert np.array_equal(gather[valid], want)
    assert np.array_equal(np.cumsum(valid.sum(1)), cu[1:]) and valid.any(1).all()
    flat = gather.reshape(-1)
    assert np.array_equal(flat[inverse], np.arange(gh * gw))


def test_patch_positions_are_transformers():
    from transformers.vision_utils import get_vision_position_ids

    want = get_vision_position_ids(torch.tensor([[1, 6, 10]]), MERGE).numpy()
    assert np.array_equal(patch_rows_cols(6, 10, MERGE), want)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 2, 2]})
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION), **IDS)
    model = transformers.Qwen2_5_VLModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, weights large enough to matter
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if ("norm" in n or n.endswith("bias")) else 0.05))
    return model


@pytest.mark.parametrize("prefix_len,image_start,rows,cols", [(40, 5, 3, 7), (40, 5, 7, 3), (16, 0, 4, 4),
                                                               (30, 10, 4, 5), (12, 3, 3, 3)])
def test_mrope_positions_equal_get_rope_index(hf_model, prefix_len, image_start, rows, cols):
    ids = torch.full((1, prefix_len), 7)
    ids[0, image_start: image_start + rows * cols] = IDS["image_token_id"]
    pos, delta = hf_model.get_rope_index(ids, mm_token_type_ids=(ids == IDS["image_token_id"]).int(),
                                         image_grid_thw=torch.tensor([[1, rows * MERGE, cols * MERGE]]))
    got, got_delta = mrope_position_ids(prefix_len, image_start, rows, cols)
    assert np.array_equal(got, pos[:, 0].numpy()) and got_delta == int(delta)
    # a decoded token at canvas index i: i + delta on every axis, after the prompt's largest position
    assert prefix_len + got_delta == got.max() + 1


# ---------------------------------------------------------------------------- the tower
def _tower(hf_model):
    from echo_train.model.qwen2_5_vl_vision import Qwen25VisionTower

    tower = Qwen25VisionTower(hf_model.config.vision_config.to_dict(), None).eval()
    missing, unexpected = tower.load_state_dict(hf_model.visual.state_dict(), strict=False)
    assert not missing and all("rotary" in k for k in unexpected), (missing, unexpected)
    return tower


def _native_inputs(pixels: np.ndarray, grid: tuple[int, int], spec: VisionGridSpec) -> tuple[torch.Tensor, ...]:
    gather, valid, inverse = window_layout(*grid, spec.merge_size, spec.window_tokens)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in
                 (pixels, patch_rows_cols(*grid, spec.merge_size), gather, valid, inverse))


TOWER_SPEC = VisionGridSpec(patch_size=PATCH, window_size=32, max_pixels=300_000)
TOWER_CASES = [(53, 97), (120, 64), (64, 64), (30, 260), (256, 288)]  # the last: 32 x 36 = 1152 LM tokens


@pytest.mark.parametrize("h,w", TOWER_CASES)
def test_native_tower_equals_transformers(hf_model, h, w):
    """forward_native on the processor's pixels == transformers' get_image_features."""
    tower = _tower(hf_model)
    pixels, grid = _hf_pixels(_image(h, w, seed=w), TOWER_SPEC)
    inputs = _native_inputs(pixels, grid, TOWER_SPEC)
    with torch.no_grad():
        want = hf_model.get_image_features(torch.from_numpy(pixels), torch.tensor([[1, *grid]])).pooler_output[0]
        got = tower.forward_native(*inputs)
        tower.native_heads_per_pass = None  # full-attention blocks with every head in one pass
        all_heads = tower.forward_native(*inputs)
    diff = (want - got).abs().max().item()
    assert (all_heads - got).abs().max().item() < 1e-5
    n_win = -(-grid[0] // 8) * -(-grid[1] // 8)
    print(f"\n[tower] {h}x{w} px -> grid {grid}, {want.shape[0]} LM tokens, {n_win} windows: max |diff| {diff:.1e} "
          f"(features up to {want.abs().max().item():.2f})")
    assert got.shape == want.shape and diff < 1e-4
    assert want.std(0).mean() > 0.05  # features that vary over the image


def test_fixed_grid_forward_is_the_native_one_on_a_square(hf_model):
    """The existing fixed-grid forward and forward_native agree on a square image's grid."""
    from echo_train.model.qwen2_5_vl_vision import Qwen25VisionTower

    tower = Qwen25VisionTower(hf_model.config.vision_config.to_dict(), 64).eval()
    tower.load_state_dict(_tower(hf_model).state_dict())
    spec = VisionGridSpec(patch_size=PATCH, window_size=32, min_pixels=64 * 64, max_pixels=64 * 64)
    pixels, grid = _hf_pixels(_image(64, 64, seed=1), spec)
    x = torch.from_numpy(pixels).view(-1, 3, 2, PATCH, PATCH)[:, :, 0]  # the patches back into an image
    img = x.view(8, 8, 2, 2, 3, PATCH, PATCH).permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, 64, 64)
    with torch.no_grad():
        fixed = tower(img)[0]
        native = tower.forward_native(*_native_inputs(pixels, grid, spec))
    assert (fixed - native).abs().max().item() < 1e-4


def test_native_tower_in_fp16_stays_finite(hf_model):
    """fp16 weights (padded windows masked with a finite value): finite and close to fp32."""
    tower = _tower(hf_model)
    inputs = _native_inputs(*_hf_pixels(_image(53, 97, seed=5), TOWER_SPEC), TOWER_SPEC)
    with torch.no_grad():
        want = tower.forward_native(*inputs)
        got = tower.half().forward_native(*inputs).float()
    diff = (want - got).abs().max().item()
    print(f"\n[fp16] tower fp16 vs fp32 max |diff| {diff:.1e}")
    assert torch.isfinite(got).all() and diff < 0.02


def test_native_tower_exports_with_a_dynamic_grid(hf_model, tmp_path):
    """One ONNX graph (dynamo, dynamic patches and windows) on other grids than it was traced at,
    including a single window, equals PyTorch."""
    import onnxruntime as ort

    from echo_train.model.qwen2_5_vl_vision import NativeTowerExport, native_dynamic_shapes

    module = NativeTowerExport(_tower(hf_model)).eval()
    traced = _hf_pixels(_image(100, 150, seed=2), TOWER_SPEC)
    with torch.no_grad():
        program = torch.onnx.export(module, _native_inputs(*traced, TOWER_SPEC), None, dynamo=True, opset_version=18,
                                    input_names=list(NativeTowerExport.INPUT_NAMES), output_names=["image_embeds"],
                                    dynamic_shapes=native_dynamic_shapes(MERGE, 1 << 16), optimize=True, verbose=False)
    program.save(str(tmp_path / "tower.onnx"), external_data=False)
    sess = ort.InferenceSession(str(tmp_path / "tower.onnx"), providers=["CPUExecutionProvider"])
    small = VisionGridSpec(patch_size=PATCH, window_size=32, min_pixels=16 * 16)  # a picture under one window
    for h, w, spec in [(53, 97, TOWER_SPEC), (300, 220, TOWER_SPEC), (30, 20, small)]:
        pixels, grid = _hf_pixels(_image(h, w, seed=h), spec)
        inputs = _native_inputs(pixels, grid, spec)
        (got,) = sess.run(None, {k: v.numpy() for k, v in zip(NativeTowerExport.INPUT_NAMES, inputs)})
        with torch.no_grad():
            want = module(*inputs).numpy()
        diff = float(np.abs(got - want).max())
        print(f"\n[export] one graph, grid {grid} ({inputs[2].shape[0]} windows, {want.shape[0]} LM tokens): "
              f"onnxruntime vs PyTorch max |diff| {diff:.1e}")
        assert got.shape == want.shape and diff < 1e-4
