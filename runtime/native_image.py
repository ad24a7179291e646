"""Qwen2.5-VL images at their native resolution: pixels, patch grid, windows and MRoPE positions.

The official ECHO inference code hands each image to Qwen2-VL's image processor with
`max_pixels = 2,250,000`: the aspect ratio is kept and the number of image tokens follows the
image's size (thousands for a radiograph). This module reproduces that processor without torch or
transformers, plus the index tensors an exported vision tower needs so that its graph holds no
data-dependent control flow:

- `smart_resize`: the processor's target size (multiples of patch x merge, pixels in
  [min_pixels, max_pixels], aspect ratio kept).
- `native_image`: the processor's `pixel_values` (8-bit values, PIL bicubic resize, 1/255,
  (x - mean) / std, patchified in its order) and the grid; `patch_rc`, `window_gather`,
  `window_valid`, `window_inverse` for the tower (echo_train/model/qwen2_5_vl_vision.py,
  Qwen25VisionTower.forward_native).
- `mrope_position_ids`: Qwen2.5-VL's 3-D rotary positions of a prompt (text, one image, text) and
  the rope delta that the decode steps add to the canvas index.

Checked against transformers (processor, smart_resize, vision tower, get_rope_index) in
tests/test_native_image.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .errors import ImageReadError
from .preprocess import as_8bit, read_image

DEFAULT_MIN_PIXELS = 56 * 56  # the processor's default
DEFAULT_MAX_PIXELS = 2_250_000  # what ECHO's official inference code passes
MAX_ASPECT_RATIO = 200  # the processor refuses images longer than this to one side
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Qwen2-VL's processor defaults (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(h, w): both multiples of `factor`, h*w in [min_pixels, max_pixels], aspect ratio about kept.

    The same arithmetic as transformers' Qwen2-VL smart_resize, Python's round() (half to even)
    included, so that the grid is the processor's to the last patch."""
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({height}x{width})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over "
                         f"{MAX_ASPECT_RATIO}, which the Qwen2-VL processor refuses")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:  # shrink by the same factor a side, rounding down to stay under
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # grow, rounding up to reach the minimum
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class VisionGridSpec:
    """How a Qwen2.5-VL tower cuts an image: what the processor and the tower must agree on."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels a side of one attention window (4 x 4 merged tokens at 14 px)
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    channels: int = 3

    def __post_init__(self) -> None:
        unit = self.patch_size * self.merge_size
        if min(self.patch_size, self.merge_size, self.temporal_patch_size, self.channels) < 1:
            raise ValueError(f"patch, merge, temporal patch sizes and channels must be positive: {self}")
        if self.window_size < unit or self.window_size % unit:
            raise ValueError(f"window_size {self.window_size} is not a multiple of patch x merge = {unit}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if len(self.image_mean) != self.channels or len(self.image_std) != self.channels:
            raise ValueError(f"image_mean / image_std need {self.channels} values each")

    @property
    def factor(self) -> int:
        """Pixels a side of one LM token (patch x merge): the resize rounds to multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values in one patch row of pixel_values: C x T x p x p."""
        return self.channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_tokens(self) -> int:
        """Merged (LM) tokens a side of one attention window."""
        return self.window_size // self.factor

    @property
    def window_patches(self) -> int:
        """Patches in one (padded) attention window."""
        return (self.window_tokens * self.merge_size) ** 2

    @classmethod
    def from_config(cls, vision: Mapping[str, Any]) -> "VisionGridSpec":
        """From a checkpoint config's `vision` dict (EchoConfig.to_dict()["vision"]): the tower's own
        Hugging Face settings (`hf_config`) first, then the ECHO fields, then the defaults."""
        family = vision.get("family")
        if family is not None and family != "qwen2_5_vl":
            raise ValueError(f"native-resolution images need a Qwen2.5-VL vision tower, not {family!r}")
        hf = vision.get("hf_config") or {}

        def pick(*keys: str, default: Any) -> Any:
            for src in (hf, vision):
                for k in keys:
                    if src.get(k) is not None:
                        return src[k]
            return default

        return cls(patch_size=int(pick("patch_size", default=14)),
                   merge_size=int(pick("spatial_merge_size", "merge_size", default=2)),
                   temporal_patch_size=int(pick("temporal_patch_size", default=2)),
                   window_size=int(pick("window_size", default=112)),
                   min_pixels=int(vision.get("min_pixels") or DEFAULT_MIN_PIXELS),
                   max_pixels=int(vision.get("max_pixels") or DEFAULT_MAX_PIXELS),
                   image_mean=tuple(float(x) for x in (vision.get("image_mean") or CLIP_MEAN)),
                   image_std=tuple(float(x) for x in (vision.get("image_std") or CLIP_STD)),
                   channels=int(pick("in_channels", "in_chans", default=3)))


@dataclass
class NativeImage:
    """One image as the tower takes it. Patches are in the processor's order: LM tokens row by row,
    the merge x merge patches of a token inside (rows, then columns)."""

    patches: np.ndarray  # float32 [n, C*T*p*p]: the processor's pixel_values
    grid: tuple[int, int]  # (rows, columns) of patches
    llm_grid: tuple[int, int]  # (rows, columns) of LM tokens
    size: tuple[int, int]  # (height, width) in pixels after the resize
    patch_rc: np.ndarray  # int64 [n, 2]: row, column of each patch (the 2-D rotary positions)
    window_gather: np.ndarray  # int64 [n_win, W]: patch indices of each window (padding: 0)
    window_valid: np.ndarray  # bool [n_win, W]: False where the window is padded
    window_inverse: np.ndarray  # int64 [n]: where each patch sits in the flattened [n_win * W] gather

    @property
    def n_tokens(self) -> int:
        """LM (image) tokens this image takes in the prompt."""
        return self.llm_grid[0] * self.llm_grid[1]

    @property
    def n_patches(self) -> int:
        return int(self.patches.shape[0])


def _rgb_8bit(arr: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W, C]: a grey 2-D image copied to every channel (what convert("RGB") does to a grey
    PNG); an 8-bit [H, W, 3] image as it is. Non-8-bit values are stretched (as_8bit)."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == channels:
        return as_8bit(a)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D grey image or [H, W, {channels}], got shape {a.shape}")
    grey = as_8bit(a)
    return np.repeat(grey[:, :, None], channels, axis=2)


def _normalised_pixels(arr: np.ndarray, spec: VisionGridSpec) -> np.ndarray:
    """float32 [C, H, W] at the smart_resize size, with the processor's arithmetic (PIL bicubic on
    8-bit values; float64 x 1/255 cast to float32; (x - mean) / std in float32)."""
    rgb = _rgb_8bit(arr, spec.channels)
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], spec.factor, spec.min_pixels, spec.max_pixels)
    planes = []
    for c in range(spec.channels):  # PIL resizes each channel on its own: one plane at a time
        im = Image.fromarray(np.ascontiguousarray(rgb[:, :, c]), mode="L")
        planes.append(np.asarray(im.resize((w, h), Image.BICUBIC)) if im.size != (w, h) else rgb[:, :, c])
    x = (np.stack(planes).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def _patchify(x: np.ndarray, spec: VisionGridSpec) -> np.ndarray:
    """[C, H, W] -> [n, C*T*p*p] in the processor's order; the still image fills every frame."""
    c, h, w = x.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh/m, gw/m, m, m, C, p, p
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def patch_rows_cols(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """int64 [n, 2]: (row, column) of every patch in the processor's order."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def window_layout(grid_h: int, grid_w: int, merge: int,
                  window_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gather [n_win, W], valid [n_win, W], inverse [n]) of transformers' Qwen2.5-VL windows.

    Windows are window_tokens x window_tokens LM tokens counted from the top-left corner, the grid
    padded at the right and bottom edges; windows row by row, tokens row by row inside a window,
    each token's merge x merge patches together (get_window_index's order, padding kept in place
    so that every window has the same W = (window_tokens * merge)^2 slots for a batched graph)."""
    lh, lw, k, mm = grid_h // merge, grid_w // merge, window_tokens, merge * merge
    nwh, nww = -(-lh // k), -(-lw // k)
    tokens = np.full((nwh * k, nww * k), -1, dtype=np.int64)
    tokens[:lh, :lw] = np.arange(lh * lw).reshape(lh, lw)
    tokens = tokens.reshape(nwh, k, nww, k).transpose(0, 2, 1, 3).reshape(nwh * nww, k * k)
    valid = np.repeat(tokens >= 0, mm, axis=1)
    patches = (tokens[:, :, None] * mm + np.arange(mm)).reshape(nwh * nww, k * k * mm)
    gather = np.where(valid, patches, 0)
    slots = np.flatnonzero(valid.reshape(-1))
    inverse = np.empty(lh * lw * mm, dtype=np.int64)
    inverse[gather.reshape(-1)[slots]] = slots
    return gather, valid, inverse


def native_image(arr: np.ndarray, spec: VisionGridSpec) -> NativeImage:
    """An image (grey [H, W] of any range, or 8-bit [H, W, C]) as the processor prepares it."""
    x = _normalised_pixels(arr, spec)
    h, w = x.shape[1:]
    gh, gw = h // spec.patch_size, w // spec.patch_size
    gather, valid, inverse = window_layout(gh, gw, spec.merge_size, spec.window_tokens)
    return NativeImage(patches=_patchify(x, spec), grid=(gh, gw),
                       llm_grid=(gh // spec.merge_size, gw // spec.merge_size), size=(h, w),
                       patch_rc=patch_rows_cols(gh, gw, spec.merge_size), window_gather=gather,
                       window_valid=valid, window_inverse=inverse)


def native_image_from_path(path: str | Path, spec: VisionGridSpec) -> NativeImage:
    """Read (runtime.preprocess.read_image: PNG 8/16-bit, JPEG, DICOM) and prepare one image; every
    bad input is an ImageReadError naming the file and the reason."""
    arr = read_image(path)
    try:
        return native_image(arr, spec)
    except ValueError as e:  # an aspect ratio the processor refuses
        raise ImageReadError(str(path), str(e)) from None


def mrope_position_ids(prefix_len: int, image_start: int, llm_rows: int, llm_cols: int) -> tuple[np.ndarray, int]:
    """Qwen2.5-VL's (time, row, column) rotary positions of a prompt of text, one image, text.

    Text before the image counts 0, 1, ...; the image's tokens (row by row) sit at
    time = s, row = s + r, column = s + c with s = image_start; the text after it continues
    from s + max(rows, cols). Returns (int64 [3, prefix_len], rope_delta): a token at canvas
    index i >= prefix_len has all three positions i + rope_delta (what get_rope_index returns)."""
    n_img = llm_rows * llm_cols
    if min(llm_rows, llm_cols) < 1 or image_start < 0 or image_start + n_img > prefix_len:
        raise ValueError(f"an image of {llm_rows}x{llm_cols} tokens at {image_start} does not fit a prompt "
                         f"of {prefix_len} tokens")
    pos = np.empty((3, prefix_len), dtype=np.int64)
    pos[:, :image_start] = np.arange(image_start)
    rows, cols = np.meshgrid(np.arange(llm_rows), np.arange(llm_cols), indexing="ij")
    end = image_start + n_img
    pos[0, image_start:end] = image_start
    pos[1, image_start:end] = image_start + rows.reshape(-1)
    pos[2, image_start:end] = image_start + cols.reshape(-1)
    after = image_start + max(llm_rows, llm_cols)
    pos[:, end:] = after + np.arange(prefix_len - end)
    return pos, int(pos.max()) + 1 - prefix_len
