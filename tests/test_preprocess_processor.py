"""runtime/preprocess.py's "processor" mode prepares an image as Qwen2-VL's image processor does at
a fixed square grid (min_pixels = max_pixels = grid): the pixels the imported Qwen2.5-VL
checkpoints were trained on. "echo" mode (stretch to the image's own range, bilinear) does not."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.preprocess import PREPROCESS_MODES, normalize_image, preprocess_mode_of

transformers = pytest.importorskip("transformers")

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
PATCH, MERGE, TEMPORAL = 4, 2, 2


def _processor_image(grey: np.ndarray, size: int) -> np.ndarray:
    """The processor's normalised pixels [3, H, W] of a grey image given as RGB (its patches undone)."""
    from PIL import Image

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    proc = cls(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, min_pixels=size * size,
               max_pixels=size * size, image_mean=MEAN, image_std=STD)
    out = proc(Image.fromarray(grey, mode="L").convert("RGB"), return_tensors="np")
    _, gh, gw = out["image_grid_thw"][0]
    x = np.asarray(out["pixel_values"]).reshape(gh // MERGE, gw // MERGE, MERGE, MERGE, 3, TEMPORAL, PATCH, PATCH)
    x = x[:, :, :, :, :, 0].transpose(4, 0, 2, 5, 1, 3, 6)  # C, gh/m, m, p, gw/m, m, p
    return x.reshape(3, gh * PATCH, gw * PATCH)


def _ours(grey: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Our [-1, 1] grey pixels with the processor's mean / std applied, as the model does inside."""
    x01 = (normalize_image(grey.astype(np.float32), size, mode)[0] + 1.0) / 2.0
    return np.stack([(x01 - m) / s for m, s in zip(MEAN, STD)])


@pytest.mark.parametrize("side", [53, 32, 96])
def test_processor_mode_matches_the_image_processor(side):
    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[0:side, 0:side]
    grey = np.clip(110 + 50 * np.sin(xx / 4) * np.cos(yy / 7) + rng.normal(0, 20, (side, side)), 20, 220)
    grey = grey.astype(np.uint8)  # an 8-bit radiograph that does not span 0..255
    want = _processor_image(grey, 32)
    assert want.shape == (3, 32, 32)
    diff = np.abs(_ours(grey, 32, "processor") - want).max()
    echo_diff = np.abs(_ours(grey, 32, "echo") - want).max()
    print(f"\n[preprocess] {side} px -> 32: processor mode max |diff| {diff:.1e} (normalised units), "
          f"echo mode {echo_diff:.2f}")
    assert diff < 1e-5  # float rounding only: the same 8-bit resize
    assert echo_diff > 0.1


def test_mode_is_read_from_the_model_config():
    assert preprocess_mode_of(None) == "echo" and preprocess_mode_of({"vision": {}}) == "echo"
    assert preprocess_mode_of({"vision": {"preprocess": "processor"}}) == "processor"
    with pytest.raises(ValueError, match="unknown image preprocessing"):
        preprocess_mode_of({"vision": {"preprocess": "clip"}})
    with pytest.raises(ValueError):
        normalize_image(np.zeros((4, 4), np.float32), 4, "clip")
    assert set(PREPROCESS_MODES) == {"echo", "processor"}
    # 16-bit / DICOM intensities have no 8-bit values to keep: stretched to their own range
    wide = np.arange(64, dtype=np.float32).reshape(8, 8) * 1000
    assert np.allclose(normalize_image(wide, 8, "processor"), normalize_image(wide, 8, "echo"))


def test_training_and_reference_decoders_follow_the_model_config(tmp_path, tiny_tokenizer):
    """The training dataset (stages/common.py builds it from the config) and the decoders' pixel
    loader prepare images with the model's recorded mode."""
    from PIL import Image

    from echo_train.data.dataset import ReportDataset
    from echo_train.data.study import Study
    from echo_train.decoding.run import load_pixels
    from echo_train.model.config import EchoConfig
    from echo_train.stages.common import make_dataset
    from runtime.preprocess import preprocess_image

    grey = (np.arange(40 * 40).reshape(40, 40) % 97 + 60).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "a.png")
    studies = [Study("s0", [str(tmp_path / "a.png")], "The heart size is normal.", "")]
    want = {m: preprocess_image(tmp_path / "a.png", 32, m) for m in PREPROCESS_MODES}
    assert np.abs(want["processor"] - want["echo"]).max() > 0.1
    for mode in PREPROCESS_MODES:
        ds = ReportDataset(studies, tiny_tokenizer, 32, 16, 8, preprocess=mode)
        assert np.array_equal(ds[0]["pixel_values"].numpy(), want[mode])
        assert np.array_equal(load_pixels(studies, 32, mode)[0].numpy(), want[mode])
        cfg = EchoConfig.from_dict({"vision": {"image_size": 32, "patch_size": 8, "preprocess": mode}})
        assert np.array_equal(make_dataset(studies, tiny_tokenizer, cfg)[0]["pixel_values"].numpy(), want[mode])
