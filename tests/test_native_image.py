"""Native-resolution images (runtime/native_image.py) against transformers: the processor's pixels
and grid, smart_resize, the vision windows and get_rope_index's positions. Tiny random configs
built here; nothing is downloaded."""
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
    image is stretched to 8 bits first (_as_8bit); bad files are ImageReadErrors naming them."""
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
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 4000, (400, 2))] + [(28, 28), (14, 42), (1, 150), (3000, 2500)]
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
