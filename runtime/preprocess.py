"""Image reading and preprocessing: the one function training and serving both call.

Any PNG (8/16-bit), JPEG or DICOM radiograph -> float32 array [1, S, S] in [-1, 1].
Every failure is an ImageReadError naming the file and the reason; no library exception
escapes `read_image` / `decode_image_bytes` (a fuzz test holds this).

Limits: a file over MAX_BYTES, an image over MAX_SIDE a side or MAX_PIXELS in all is
refused before its pixels are decoded (decompression bombs).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageReadError

MAX_SIDE = 16384  # real radiographs are ~3000 px; beyond this the file is not one
MAX_PIXELS = 64 * 1024 * 1024  # also per DICOM frame
MAX_BYTES = 512 * 1024 * 1024
DICOM_MAGIC_OFFSET = 128
RASTER_FORMATS = ("PNG", "JPEG")
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
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageReadError(path, "DICOM input needs the [dicom] extra (pip install 'echo-cxr[dicom]')") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            if "PixelData" not in ds:
                raise ImageReadError(path, "DICOM file has no pixel data")
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            _check_size(path, cols, rows, max(frames, 1))
            arr = np.asarray(ds.pixel_array)
            if arr.dtype.kind not in "uif":
                raise ImageReadError(path, f"unsupported DICOM pixel type {arr.dtype}")
            arr = arr.astype(np.float32)
            samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
            if frames > 1 and arr.ndim == (4 if samples > 1 else 3):
                arr = arr[0]  # multi-frame: the first frame
            if samples > 1 and arr.ndim == 3:
                arr = arr[..., :3].mean(-1)  # colour (pydicom gives RGB): to grey
            if arr.ndim == 2:
                try:  # Rescale Slope/Intercept, then the VOI LUT or window the file asks for
                    arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
                    arr = np.asarray(apply_voi_lut(arr, ds), dtype=np.float32)
                except Exception:
                    pass  # no usable LUT / window: keep the raw values
            if str(getattr(ds, "PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1" and arr.size:
                arr = (arr.max() + arr.min()) - arr  # MONOCHROME1 stores bright as low values
            return arr
    except ImageReadError:
        raise
    except Exception as e:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM ({type(e).__name__}: {_short(e)})") from None


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
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error...
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


def normalize_image(arr: np.ndarray, image_size: int) -> np.ndarray:
    """Resize to image_size x image_size and scale to [-1, 1] by the image's own range."""
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    im = Image.fromarray((scaled * 255.0).round().astype(np.uint8), mode="L")
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BILINEAR)
    out = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return out[None, :, :]


def preprocess_image(path: str | Path, image_size: int) -> np.ndarray:
    """Read and preprocess one image: float32 [1, image_size, image_size]."""
    return normalize_image(read_image(path), image_size)
