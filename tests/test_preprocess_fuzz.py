"""Fuzz: image reading either decodes to a sane array or raises ImageReadError, nothing else.

The inputs are built to reach the decoders, not just their magic-number checks: valid PNG (1, 8 and
16 bit; grey, palette, RGB, with alpha), JPEG (grey, RGB, CMYK; baseline and progressive) and DICOM
(8/16 bit, signed, MONOCHROME1/2, RGB, multi-frame, rescale and window, explicit/implicit VR and RLE)
of varied size, then structurally corrupted: truncated, bytes changed in the body (PNG chunk CRCs
fixed up so zlib and the filters see the damage), dimensions in the header rewritten, DICOM
attributes set to inconsistent values. Each test asserts how many cases decoded, so a generator
that drifts back to "everything is rejected at the first byte" fails, and every decoded array goes
through `normalize_image` (the model's input): [1, S, S] float32, finite, within [-1, 1].

Programming errors (AttributeError, TypeError, NotImplementedError...) are not ImageReadError and
fail the test: the reader catches only the decoders' own error types.

Deadline: 2 s per case. Measured on the 2-core machine with 3x more runnable processes than cores
(load 5.6): cases take 1-50 ms, and one case per test, once, 0.4-0.63 s (a scheduling or GC
pause). Images here are at most 48x48 (x3 frames), so 2 s is only reached by a hang or by a
decoder doing work in proportion to a forged header size (a decompression bomb getting through).
"""
from __future__ import annotations

import collections
import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import ImageReadError
from runtime.preprocess import decode_image_bytes, normalize_image

try:
    import pydicom
except ImportError:  # the [dicom] extra
    pydicom = None

NAME = "fuzz.bin"
MODEL_SIDE = 16  # the side normalize_image resizes to in these checks


def fuzz(n: int) -> settings:
    # derandomized: the same cases every run, so the decode counts asserted below are stable
    return settings(max_examples=n, deadline=2000, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- building valid images


@dataclass
class Spec:
    fmt: str  # png | jpeg | dicom
    h: int
    w: int
    seed: int
    content: str  # noise | gradient | constant
    mode: str = "L"  # PIL mode (png, jpeg) or DICOM PhotometricInterpretation
    quality: int = 90
    progressive: bool = False
    bits: int = 16  # DICOM BitsAllocated
    signed: bool = False
    frames: int = 1
    slope: Optional[tuple[float, float]] = None  # DICOM (RescaleSlope, RescaleIntercept)
    window: Optional[tuple[float, float]] = None  # DICOM (WindowCenter, WindowWidth)
    syntax: str = "explicit"  # DICOM transfer syntax: explicit | implicit | rle
    overrides: dict = field(default_factory=dict)  # DICOM attributes set after the pixel data


def _pixels(spec: Spec, lo: int, hi: int, shape: tuple) -> np.ndarray:
    """int64 values in [lo, hi] of `shape` = ([frames,] h, w[, channels])."""
    rng = np.random.default_rng(spec.seed)
    if spec.content == "constant":
        return np.full(shape, int(rng.integers(lo, hi + 1)), np.int64)
    if spec.content == "gradient":
        ramp = np.add.outer(np.arange(spec.h), np.arange(spec.w)) / max(1, spec.h + spec.w - 2)
        ramp = lo + np.round(ramp * (hi - lo)).astype(np.int64)
        if shape[-2:] != (spec.h, spec.w):  # a trailing channel axis
            ramp = ramp[..., None]
        return np.broadcast_to(ramp, shape).copy()
    return rng.integers(lo, hi + 1, size=shape, dtype=np.int64)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, what PIL's convert("L") computes (to within 1 level)."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def encode_raster(spec: Spec) -> tuple[bytes, Optional[np.ndarray]]:
    """File bytes and, where the format is lossless, the grey array the reader must return."""
    h, w = spec.h, spec.w
    if spec.mode == "I;16":
        arr = _pixels(spec, 0, 65535, (h, w)).astype(np.uint16)
        im, want = Image.fromarray(arr), arr.astype(np.float32)
    elif spec.mode in ("L", "1"):
        arr = _pixels(spec, 0, 255, (h, w)).astype(np.uint8)
        im = Image.fromarray(arr).convert(spec.mode) if spec.mode == "1" else Image.fromarray(arr)
        want = np.asarray(im.convert("L")).astype(np.float32)
    elif spec.mode == "CMYK":
        im, want = Image.fromarray(_pixels(spec, 0, 255, (h, w, 4)).astype(np.uint8), mode="CMYK"), None
    else:  # RGB, RGBA, LA, P: built from RGBA pixels
        px = _pixels(spec, 0, 255, (h, w, 4)).astype(np.uint8)
        rgba = Image.fromarray(px, mode="RGBA")
        im = {"RGB": lambda: rgba.convert("RGB"), "RGBA": lambda: rgba, "LA": lambda: rgba.convert("LA"),
              "P": lambda: rgba.convert("RGB").convert("P")}[spec.mode]()
        ref = np.asarray(im.convert("RGBA")).astype(np.float64)  # what the file holds, as RGBA
        want = (_grey(ref[..., :3]) * ref[..., 3] / 255.0).astype(np.float32)  # composited on black
    buf = io.BytesIO()
    if spec.fmt == "jpeg":
        im.save(buf, format="JPEG", quality=spec.quality, progressive=spec.progressive)
        want = None  # lossy
    else:
        im.save(buf, format="PNG")
    return buf.getvalue(), want


def encode_dicom(spec: Spec) -> tuple[bytes, Optional[np.ndarray]]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                             SecondaryCaptureImageStorage, generate_uid)

    rgb = spec.mode == "RGB"
    stored = spec.bits if spec.bits == 8 else 12 + 4 * spec.signed
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if spec.signed else (0, (1 << stored) - 1)
    shape = ((spec.frames,) if spec.frames > 1 else ()) + (spec.h, spec.w) + ((3,) if rgb else ())
    arr = _pixels(spec, lo, hi, shape)
    dtype = np.dtype(f"{'i' if spec.signed else 'u'}{spec.bits // 8}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(spec.seed)])
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if spec.syntax == "implicit" else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = spec.h, spec.w
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    if spec.frames > 1:
        ds.NumberOfFrames = spec.frames
    ds.PhotometricInterpretation = spec.mode
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = spec.bits, stored, stored - 1, int(spec.signed)
    if spec.slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = spec.slope
    if spec.window is not None:
        ds.WindowCenter, ds.WindowWidth = spec.window
    ds.PixelData = arr.astype(dtype).tobytes()
    if spec.syntax == "rle":
        ds.compress(RLELossless, generate_instance_uid=False)  # deterministic bytes: hypothesis replays cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inconsistent values are the point of the overrides
        for k, v in spec.overrides.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    # The array the reader must return, computed here from the DICOM rules (not by pydicom):
    # first frame; colour to the mean of R, G, B; Rescale; MONOCHROME1 inverted. Window: not checked.
    if spec.overrides or spec.window is not None:
        return buf.getvalue(), None
    want = (arr[0] if spec.frames > 1 else arr).astype(np.float64)
    if rgb:
        want = want.mean(-1)
    if spec.slope is not None:
        want = want * spec.slope[0] + spec.slope[1]
    if spec.mode == "MONOCHROME1":
        want = want.max() + want.min() - want
    return buf.getvalue(), want.astype(np.float32)


def encode(spec: Spec) -> tuple[bytes, Optional[np.ndarray]]:
    return encode_dicom(spec) if spec.fmt == "dicom" else encode_raster(spec)


FORMATS = ["png", "jpeg"] + (["dicom"] if pydicom is not None else [])


@st.composite
def specs(draw, fmts=tuple(FORMATS), dicom_overrides: bool = False) -> Spec:
    fmt = draw(st.sampled_from(fmts))
    side = st.integers(1, 48)
    s = Spec(fmt, draw(side), draw(side), draw(st.integers(0, 2**32 - 1)),
             draw(st.sampled_from(["noise", "noise", "gradient", "constant"])))
    if fmt == "png":
        s.mode = draw(st.sampled_from(["L", "I;16", "1", "P", "RGB", "RGBA", "LA"]))
    elif fmt == "jpeg":
        s.mode = draw(st.sampled_from(["L", "RGB", "CMYK"]))
        s.quality, s.progressive = draw(st.integers(5, 100)), draw(st.booleans())
    else:
        s.mode = draw(st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB"]))
        s.bits, s.signed = draw(st.sampled_from([8, 16])), draw(st.booleans()) and s.mode != "RGB"  # RGB is unsigned
        s.frames = draw(st.sampled_from([1, 1, 2, 3]))
        s.syntax = draw(st.sampled_from(["explicit", "implicit", "rle"]))
        if draw(st.booleans()):
            s.slope = (draw(st.sampled_from([1.0, 2.5, -1.0, 0.001, 1e34])), draw(st.sampled_from([0.0, -1024.0, 7.5])))
        if draw(st.integers(0, 3)) == 0:
            s.window = (draw(st.floats(-2000, 5000)), draw(st.floats(1, 5000)))
        if dicom_overrides:
            s.overrides = draw(st.dictionaries(st.sampled_from(list(DICOM_BAD_VALUES)), st.none(), min_size=1, max_size=3))
            for k in s.overrides:
                s.overrides[k] = draw(st.sampled_from(DICOM_BAD_VALUES[k]))
    return s


# Attribute values a damaged or hand-edited DICOM may carry (None: the element is deleted).
DICOM_BAD_VALUES = {
    "Rows": [None, 0, 1, 7, 49, 65535], "Columns": [None, 0, 1, 7, 49, 65535],
    "BitsAllocated": [None, 1, 8, 12, 16, 32, 64], "BitsStored": [None, 0, 1, 8, 16, 40],
    "HighBit": [None, 0, 31, 99], "PixelRepresentation": [None, 0, 1, 2],
    "SamplesPerPixel": [None, 0, 1, 2, 3, 4], "PlanarConfiguration": [None, 0, 1, 7],
    "PhotometricInterpretation": [None, "", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", "XYZ"],
    "NumberOfFrames": [None, 0, 1, 2, 1000, -1],
    "RescaleSlope": [None, 0, -1, 1e30, 1e34, 1e-30, "nan", "inf"], "RescaleIntercept": [None, 1e38, -1e38, "nan"],
    "WindowCenter": [None, 0, 1e38, "nan"], "WindowWidth": [None, 0, -5, 1e-9, "inf"],
    "VOILUTFunction": [None, "SIGMOID", "LINEAR_EXACT", "BOGUS"],
    "PixelData": [None, b"", b"\x01", b"\xff" * 7],
}


# ---------------------------------------------------------------- structured corruption


def _png_chunks(data: bytes) -> Optional[list[tuple[int, bytes, int]]]:
    """(offset, type, length) of each chunk, or None when the chunk structure is already broken."""
    out, i = [], 8
    while i + 12 <= len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        if i + 12 + n > len(data):
            return None
        out.append((i, data[i + 4 : i + 8], n))
        i += 12 + n
    return out if i == len(data) else None


def _fix_png_crcs(data: bytearray) -> None:
    # PIL rejects a bad CRC before decoding: recompute them so the damage reaches zlib / the filters
    for off, kind, n in _png_chunks(bytes(data)) or []:
        data[off + 8 + n : off + 12 + n] = struct.pack(">I", zlib.crc32(bytes(data[off + 4 : off + 8 + n])) & 0xFFFFFFFF)


def _flip_png_pixels(data: bytes, flips: list[tuple[int, int]]) -> Optional[bytes]:
    """Change bytes of the decompressed scanlines (filter types included) and recompress them: a
    well-formed file (zlib checksum, CRCs) whose pixels and filters are damaged. None if unparseable."""
    chunks = _png_chunks(data)
    idat = [(o, n) for o, kind, n in chunks or [] if kind == b"IDAT"]
    if not idat:
        return None
    try:
        raw = bytearray(zlib.decompress(b"".join(data[o + 8 : o + 8 + n] for o, n in idat)))
    except zlib.error:
        return None
    for pos, x in flips:
        raw[pos % len(raw)] ^= x
    body = zlib.compress(bytes(raw))
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    first, (last, n_last) = idat[0][0], idat[-1]
    return data[:first] + chunk + data[last + 12 + n_last :]


def _body_start(fmt: str, data: bytes) -> int:
    """Offset where the pixel payload starts (flips before it mostly test the magic check again)."""
    if fmt == "png":
        for off, kind, _ in _png_chunks(data) or []:
            if kind == b"IDAT":
                return off + 8
        return 33
    if fmt == "jpeg":
        i = data.find(b"\xff\xda")  # start of scan
        return i + 2 if i > 0 else 2
    i = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    return i if i > 0 else 132


def _rewrite_dims(fmt: str, data: bytearray, h: int, w: int) -> bool:
    """Claim h x w in the header. False where the header cannot be found."""
    if fmt == "png" and data[12:16] == b"IHDR":
        data[16:24] = struct.pack(">II", w, h)
        _fix_png_crcs(data)
        return True
    if fmt == "jpeg":  # walk the segments to the frame header (0xFFC2 also occurs inside tables)
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
            if data[i + 1] in (0xC0, 0xC1, 0xC2):  # SOF0/1/2: length, precision, height, width
                data[i + 5 : i + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
                return True
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return False


@st.composite
def corrupted(draw, fmts=tuple(FORMATS)) -> tuple[Spec, bytes, str, Optional[tuple[int, int]]]:
    """(spec, bytes, what was done, the dimensions the header now claims when rewritten)."""
    spec = draw(specs(fmts))
    data = bytearray(encode(spec)[0])
    op = draw(st.sampled_from(["truncate", "flip", "flip", "dims"]))
    claimed = None
    if op == "dims" and spec.fmt == "dicom":  # through the dataset: Rows/Columns disagree with the pixel data
        h, w = draw(st.integers(0, 64)), draw(st.integers(0, 64))
        spec.overrides = {"Rows": h, "Columns": w}
        data, claimed = bytearray(encode(spec)[0]), (h, w)
    elif op == "dims":
        h, w = draw(st.sampled_from([0, 1, 2, spec.h - 1, spec.h + 1, 2 * spec.h + 3, 40000])), \
            draw(st.sampled_from([0, 1, 2, spec.w - 1, spec.w + 1, 3 * spec.w, 40000]))
        if _rewrite_dims(spec.fmt, data, max(h, 0), max(w, 0)):
            claimed = (max(h, 0), max(w, 0))
    body = _body_start(spec.fmt, bytes(data))
    if op == "truncate":
        cut = draw(st.integers(body, max(body, len(data) - 1))) if draw(st.integers(0, 3)) else draw(st.integers(0, len(data)))
        del data[cut:]
    elif op == "flip" and spec.fmt == "png" and draw(st.booleans()):  # in the scanlines, zlib intact
        flips = draw(st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), min_size=1, max_size=8))
        data = bytearray(_flip_png_pixels(bytes(data), flips) or data)
        op = "rawflip"
    elif op == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(min(body, len(data) - 1), len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        if spec.fmt == "png":
            _fix_png_crcs(data)
    return spec, bytes(data), op, claimed


# ---------------------------------------------------------------- the oracle


def check_decoded(arr: np.ndarray) -> None:
    """What every successful decode must satisfy, and the preprocessing on top of it."""
    assert arr.ndim == 2 and arr.dtype == np.float32 and arr.size > 0 and np.isfinite(arr).all()
    x = normalize_image(arr, MODEL_SIDE)
    assert x.shape == (1, MODEL_SIDE, MODEL_SIDE) and x.dtype == np.float32 and np.isfinite(x).all()
    assert -1.0 <= x.min() and x.max() <= 1.0
    if arr.max() > arr.min():  # an image with contrast keeps it
        assert x.max() > x.min(), (arr.min(), arr.max())
        if arr.shape[0] == arr.shape[1]:  # not resized: its own range maps exactly onto [-1, 1]
            y = normalize_image(arr, arr.shape[0])
            assert y.min() == -1.0 and y.max() == 1.0, (arr.min(), arr.max(), y.min(), y.max())
    else:  # no contrast: a flat image at the bottom of the range
        assert (x == -1.0).all()


def decode(data: bytes, counts: collections.Counter, key: str) -> Optional[np.ndarray]:
    """The decoded array, or None after an ImageReadError; anything else propagates (and fails)."""
    try:
        arr = decode_image_bytes(data, NAME)
    except ImageReadError as e:
        assert e.path == NAME and e.reason and str(e).startswith(f"{NAME}: ")
        counts[key, "refused"] += 1
        return None
    check_decoded(arr)
    counts[key, "decoded"] += 1
    return arr


def _summary(counts: collections.Counter) -> str:
    return ", ".join(f"{k[0]} {k[1]} {v}" for k, v in sorted(counts.items()))


# ---------------------------------------------------------------- tests


@pytest.fixture(autouse=True)
def _quiet_pydicom(caplog):
    # pydicom logs a traceback for every corrupt frame it meets: thousands of lines, and slow to capture
    caplog.set_level(logging.CRITICAL, logger="pydicom")


def test_valid_images_decode_to_the_right_pixels():
    """Uncorrupted files of every kind the generator makes: all decode, to the right shape and values."""
    counts: collections.Counter = collections.Counter()

    @fuzz(300)
    @given(specs())
    def case(spec: Spec) -> None:
        data, want = encode(spec)
        arr = decode(data, counts, spec.fmt)
        assert arr is not None, (spec, "a valid file was refused")
        assert arr.shape == (spec.h, spec.w), spec
        if want is not None:  # lossless: the pixels themselves (RGB to grey within 1 level, as PIL rounds)
            np.testing.assert_allclose(arr, want, rtol=1e-5, atol=1.01 if spec.mode in ("RGB", "RGBA", "LA", "P") else 1e-3)
        counts[spec.fmt, spec.mode] += 1

    case()
    print(_summary(counts))
    for fmt in FORMATS:  # the generator covers every format and mode
        assert counts[fmt, "decoded"] >= 70, _summary(counts)
    assert sum(1 for k in counts if k[1] not in ("decoded", "refused")) >= 12, _summary(counts)


def test_corrupted_images_decode_sanely_or_are_refused():
    counts: collections.Counter = collections.Counter()

    @fuzz(1000)
    @given(corrupted())
    def case(c) -> None:
        spec, data, op, claimed = c
        arr = decode(data, counts, f"{spec.fmt}/{op}")
        if arr is not None and claimed is not None:
            assert arr.shape == claimed, (spec, op, claimed, arr.shape)  # the header is what got decoded

    case()
    print(_summary(counts))
    # reaching the decoders: each format and damage both decodes and gets refused, many times
    for fmt in FORMATS:
        for op in ("truncate", "flip", "dims"):
            assert counts[f"{fmt}/{op}", "refused"] >= 10, (fmt, op, _summary(counts))
        assert counts[f"{fmt}/flip", "decoded"] + counts[f"{fmt}/rawflip", "decoded"] >= 20, (fmt, _summary(counts))
    assert counts["png/rawflip", "decoded"] >= 20 and counts["png/rawflip", "refused"] >= 5, _summary(counts)
    assert sum(v for k, v in counts.items() if k[1] == "decoded") >= 150, _summary(counts)


@pytest.mark.skipif(pydicom is None, reason="pydicom (the [dicom] extra) is not installed")
def test_dicom_with_inconsistent_attributes():
    """Real DICOM files with pixel data whose attributes disagree with it or with the standard."""
    counts: collections.Counter = collections.Counter()

    @fuzz(400)
    @given(specs(("dicom",), dicom_overrides=True))
    def case(spec: Spec) -> None:
        try:
            data = encode(spec)[0]
        except (AttributeError, ValueError):  # pydicom will not write this combination (e.g. no BitsAllocated)
            counts["dicom", "unwritable"] += 1
            reject()
        decode(data, counts, "dicom")

    case()
    print(_summary(counts))
    assert counts["dicom", "decoded"] >= 100 and counts["dicom", "refused"] >= 150, _summary(counts)
    assert counts["dicom", "unwritable"] <= 100, _summary(counts)


@fuzz(500)
@given(st.binary(max_size=600))
def test_random_bytes(data):
    decode(data, collections.Counter(), "random")


@fuzz(200)
@given(st.binary(max_size=300).map(lambda b: b"\0" * 128 + b"DICM" + b))
def test_random_bytes_behind_a_dicom_preamble(data):
    decode(data, collections.Counter(), "preamble")
