"""Image reading and preprocessing: the one function training and serving both call.

Any PNG (8/16-bit), JPEG or DICOM radiograph -> float32 array [1, S, S] in [-1, 1].
Every bad input is an ImageReadError naming the file and the reason: the decoders' own error
types are caught and reworded, nothing broader, so a bug in this module (AttributeError,
TypeError, NotImplementedError...) propagates instead of reading as "corrupt image"
(tests/test_preprocess_fuzz.py holds both).

Limits: a file over MAX_BYTES, an image over MAX_SIDE a side or MAX_PIXELS in all is
refused before its pixels are decoded (decompression bombs).
"""
from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageReadError

MAX_SIDE = 16384  # real radiographs are ~3000 px; beyond this the file is not one
MAX_PIXELS = 64 * 1024 * 1024  # also per DICOM frame
MAX_BYTES = 512 * 1024 * 1024
DICOM_MAGIC_OFFSET = 128
RASTER_FORMATS = ("PNG", "JPEG")
# What PIL's PNG and JPEG plugins raise on damaged files. Seen in tests/test_preprocess_fuzz.py:
# OSError (truncated, broken data stream), ValueError, struct.error / zlib.error; SyntaxError and
# EOFError are what PngImagePlugin raises for bad chunks. Anything else (AttributeError, TypeError,
# NotImplementedError, ...) is a bug in this module, not a bad image: it propagates.
_PIL_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
# The elements pydicom needs to lay out the pixel data: checked first, so a file without them gets
# a reason that names them (pydicom itself raises AttributeError, which here means a bug).
_DICOM_REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                   "PhotometricInterpretation")
_MODES_16 = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _is_dicom(head: bytes) -> bool:
    return len(head) >= DICOM_MAGIC_OFFSET + 4 and head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _check_size(path: str, w: int, h: int, frames: int = 1) -> None:
    if w < 1 or h < 1:
        raise ImageReadError(path, f"image has no pixels ({w}x{h})")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS or frames * w * h > 4 * MAX_PIXELS:
        raise ImageReadError(path, f"image is {w}x{h} (x{frames} frames), larger than the limit "
                                   f"({MAX_SIDE} px a side, {MAX_PIXELS} pixels): refused as a possible decompression bomb")


def _read_dicom(path: str, data: bytes) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import BytesLengthException, InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageReadError(path, "DICOM input needs the [dicom] extra (pip install 'echo-cxr[dicom]')") from None
    # pydicom's own types plus the builtins it raises on damaged files (ValueError and OSError seen
    # in the fuzz test; NotImplementedError for a damaged value representation, 'NB' for 'OB');
    # decode failures of the pixel data itself: see _dicom_pixels
    dicom_errors = (InvalidDicomError, BytesLengthException, ValueError, OSError, EOFError, struct.error,
                    NotImplementedError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            arr = _dicom_grey(path, ds)
            if arr.ndim == 2:
                try:  # Rescale Slope/Intercept, then the VOI LUT or window the file asks for
                    arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
                    arr = np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
                except dicom_errors:
                    pass  # no usable LUT / window: keep the raw values
            if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1" and arr.size:
                # MONOCHROME1 stores bright as low values (in float32, max + min would overflow near 3e38)
                arr = (arr.max() + arr.min()) - arr
            with np.errstate(over="ignore"):  # beyond float32: inf, refused by decode_image_bytes
                return arr.astype(np.float32)
    except ImageReadError:
        raise
    except dicom_errors as e:
        raise ImageReadError(path, f"unreadable DICOM ({type(e).__name__}: {_short(e)})") from None


def _dicom_grey(path: str, ds) -> np.ndarray:
    """The stored values of a checked DICOM dataset in float64: its first frame, colour averaged to grey."""
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data")
    if not ds.PixelData:  # present but empty: pydicom would fail with a TypeError on None
        raise ImageReadError(path, "DICOM pixel data is empty")
    _check_dicom_layout(path, ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    _check_size(path, cols, rows, max(frames, 1))
    arr = _dicom_pixels(path, ds)
    if arr.dtype.kind not in "uif":
        raise ImageReadError(path, f"unsupported DICOM pixel type {arr.dtype}")
    arr = arr.astype(np.float64)  # float32 once, at the end: one rounding after LUTs and inversion
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1 and arr.ndim == (4 if samples > 1 else 3):
        arr = arr[0]  # multi-frame: the first frame
    if samples > 1 and arr.ndim == 3:
        arr = arr[..., :3].mean(-1)  # colour (pydicom gives RGB): to grey
    return arr


def _check_dicom_layout(path: str, ds) -> None:
    """Refuse a file that lacks what decoding needs, naming it."""
    missing = [k for k in _DICOM_REQUIRED if ds.get(k) in (None, "")]
    if not missing and int(ds.SamplesPerPixel) > 1 and ds.get("PlanarConfiguration") in (None, ""):
        missing.append("PlanarConfiguration")
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") in (None, ""):
        missing.append("TransferSyntaxUID")
    if missing:
        raise ImageReadError(path, f"DICOM file lacks {', '.join(missing)}, needed to decode its pixel data")


def _dicom_pixels(path: str, ds) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (RuntimeError, NotImplementedError, StopIteration) as e:
        # pydicom: RuntimeError when every decoder plugin failed on this file's data, NotImplementedError
        # for a transfer syntax or pixel layout it cannot decode, StopIteration when an encapsulated
        # file holds fewer fragments than NumberOfFrames. Caught around this one call only, so the
        # same types raised by this module's own code still propagate as bugs.
        raise ImageReadError(path, f"DICOM pixel data cannot be decoded ({type(e).__name__}: {_short(e)})") from None


def _short(e: BaseException, n: int = 200) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _read_raster(path: str, data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as im:
                w, h = im.size
                _check_size(path, w, h)
                im.load()
                if im.mode in _MODES_16:
                    arr = np.asarray(im).astype(np.float32)
                else:
                    if im.mode not in ("L", "RGB"):
                        im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
                        if im.mode == "RGBA":  # transparent areas read as black
                            bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                            im = Image.alpha_composite(bg, im).convert("RGB")
                    arr = np.asarray(im.convert("L")).astype(np.float32)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "not a PNG, JPEG or DICOM image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"refused as a possible decompression bomb ({_short(e)})") from None
    except MemoryError:
        raise ImageReadError(path, "image too large to decode in memory") from None
    except _PIL_ERRORS as e:
        reason = "truncated or corrupt image" if "truncated" in str(e).lower() else "corrupt image"
        raise ImageReadError(path, f"{reason} ({type(e).__name__}: {_short(e)})") from None
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """Read a radiograph as a float32 2-D array of raw intensities."""
    p = str(path)
    try:
        fp = Path(p)
        if not fp.exists():
            raise ImageReadError(p, "file not found")
        if not fp.is_file():
            raise ImageReadError(p, "not a regular file")
        size = fp.stat().st_size
        if size == 0:
            raise ImageReadError(p, "file is empty")
        if size > MAX_BYTES:
            raise ImageReadError(p, f"file is {size} bytes, larger than {MAX_BYTES}")
        data = fp.read_bytes()
    except ImageReadError:
        raise
    except (OSError, ValueError) as e:
        raise ImageReadError(p, f"cannot read file ({getattr(e, 'strerror', None) or e})") from None
    return decode_image_bytes(data, p)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode image bytes (PNG, JPEG or DICOM) into a float32 2-D array."""
    if not data:
        raise ImageReadError(name, "file is empty")
    if len(data) > MAX_BYTES:
        raise ImageReadError(name, f"file is {len(data)} bytes, larger than {MAX_BYTES}")
    arr = _read_dicom(name, data) if _is_dicom(data[:256]) else _read_raster(name, data)
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(name, f"unexpected pixel array shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ImageReadError(name, "pixel values are not finite")
    return arr


# How a model's images are prepared (its config's vision.preprocess, the manifest's model_config):
# "echo": every image stretched to its own intensity range, bilinear resize (models trained here);
# "processor": as Qwen2-VL's image processor prepares an 8-bit image at a fixed square grid (the
# published Qwen2.5-VL-family checkpoints, `echo-train import-hf`). Both give [1, S, S] in [-1, 1];
# the model applies its processor's mean / std to that inside (VisionConfig.image_mean / std).
PREPROCESS_MODES = ("echo", "processor")


def preprocess_mode_of(model_config: dict | None) -> str:
    """The preprocessing a model config records (configs without the field: "echo")."""
    mode = ((model_config or {}).get("vision") or {}).get("preprocess") or "echo"
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown image preprocessing {mode!r}; expected one of {PREPROCESS_MODES}")
    return mode


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """The image's own range stretched to 0..255."""
    # float64: a float32 image spanning more than half the float32 range (a DICOM with a large
    # Rescale Slope) overflows arr - lo to inf, and the image came out flat (all -1)
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (scaled * 255.0).round().astype(np.uint8)


def as_8bit(a: np.ndarray) -> np.ndarray:
    """An 8-bit image's own values (whole numbers in 0..255: PNG / JPEG L or RGB read as grey);
    anything else (16-bit PNG, DICOM) stretched to its own range, as the processor only takes 8-bit."""
    a = np.asarray(a, dtype=np.float64)
    if a.size and a.min() >= 0 and a.max() <= 255 and np.array_equal(a, np.round(a)):
        return a.astype(np.uint8)
    return _to_uint8(a)


def normalize_image(arr: np.ndarray, image_size: int, mode: str = "echo") -> np.ndarray:
    """Resize to image_size x image_size and scale to [-1, 1] (see PREPROCESS_MODES).

    echo: stretched to the image's own range, bilinear resize.
    processor: Qwen2-VL's image processor at min_pixels = max_pixels = image_size**2 on the image
    converted to RGB: an 8-bit image keeps its values, bicubic resize (PIL, as its PIL backend),
    rescale by 1/255; its mean / std follow inside the model. A grey image is the same in all three
    RGB channels, so one channel is kept. The grid is square and fixed (the graphs' shapes): a
    non-square image is resized to it (the processor would keep its aspect ratio, a different grid)."""
    if mode == "processor":
        grey, resample = as_8bit(arr), Image.BICUBIC
    elif mode == "echo":
        grey, resample = _to_uint8(arr), Image.BILINEAR
    else:
        raise ValueError(f"unknown image preprocessing {mode!r}; expected one of {PREPROCESS_MODES}")
    im = Image.fromarray(grey, mode="L")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), resample)
    out = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return out[None, :, :]


def preprocess_image(path: str | Path, image_size: int, mode: str = "echo") -> np.ndarray:
    """Read and preprocess one image: float32 [1, image_size, image_size]."""
    return normalize_image(read_image(path), image_size, mode)
