"""Image reading and preprocessing: the one function training and serving both call.

Any PNG (8/16-bit), JPEG or DICOM radiograph -> float32 array [1, S, S] in [-1, 1].
Every failure is an ImageReadError naming the file and the reason.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageReadError

MAX_SIDE = 16384  # real radiographs are ~3000 px; beyond this the file is not one
MAX_BYTES = 512 * 1024 * 1024
DICOM_MAGIC_OFFSET = 128


def _is_dicom(head: bytes) -> bool:
    return len(head) >= DICOM_MAGIC_OFFSET + 4 and head[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _read_dicom(path: str, data: bytes) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError:
        raise ImageReadError(path, "DICOM input needs the [dicom] extra (pip install 'echo-cxr[dicom]')") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:
            raise ImageReadError(path, "DICOM file has no pixel data")
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows > MAX_SIDE or cols > MAX_SIDE:
            raise ImageReadError(path, f"image is {cols}x{rows}, larger than {MAX_SIDE} px a side")
        arr = ds.pixel_array.astype(np.float32)
        if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
            arr = arr[0]  # multi-frame: the first frame
        if arr.ndim == 3:
            arr = arr[..., :3].mean(-1)
        try:
            arr = apply_voi_lut(arr, ds).astype(np.float32)
        except Exception:
            pass  # no usable VOI LUT / window: keep the raw values
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = arr.max() - arr  # MONOCHROME1 stores bright as low values
        return arr
    except ImageReadError:
        raise
    except Exception as e:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None


def _read_raster(path: str, data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w > MAX_SIDE or h > MAX_SIDE:
                    raise ImageReadError(path, f"image is {w}x{h}, larger than {MAX_SIDE} px a side")
                if w < 1 or h < 1:
                    raise ImageReadError(path, "image has no pixels")
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    arr = np.asarray(im, dtype=np.float32)
                else:
                    arr = np.asarray(im.convert("L"), dtype=np.float32)
    except ImageReadError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, bomb errors...
        raise ImageReadError(path, f"not a readable image ({type(e).__name__}: {e})") from None
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
    except OSError as e:
        raise ImageReadError(p, f"cannot read file ({e.strerror or e})") from None
    return decode_image_bytes(data, p)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode image bytes (PNG, JPEG or DICOM) into a float32 2-D array."""
    if not data:
        raise ImageReadError(name, "file is empty")
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
