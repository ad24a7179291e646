"""Fuzz: random and corrupted bytes never raise anything but ImageReadError.

11,000 cases in all (5 x 2,200): random bytes, and truncated / bit-flipped / overwritten valid PNG
(8- and 16-bit), JPEG and DICOM files.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import ImageReadError
from runtime.preprocess import decode_image_bytes

FUZZ = settings(max_examples=2200, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _seeds():
    from PIL import Image

    rng = np.random.default_rng(0)
    g8 = (rng.random((12, 10)) * 255).astype(np.uint8)
    out = {}
    for name, arr, fmt in (("png8", g8, "PNG"), ("png16", g8.astype(np.uint16) * 250, "PNG"), ("jpeg", g8, "JPEG")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        out[name] = buf.getvalue()
    try:
        from test_preprocess import dicom_bytes

        out["dicom"] = dicom_bytes((g8.astype(np.uint16) * 16), "MONOCHROME1", window=(2000, 1000))
    except pytest.skip.Exception:
        pass
    return out


SEEDS = _seeds()


def _decode(data: bytes) -> None:
    try:
        arr = decode_image_bytes(data, "fuzz.bin")
    except ImageReadError as e:
        assert e.path == "fuzz.bin" and e.reason
        return
    assert arr.ndim == 2 and arr.dtype == np.float32 and np.isfinite(arr).all()


@st.composite
def corrupted(draw, names):
    data = bytearray(SEEDS[draw(st.sampled_from(names))])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "splice", "dup"]))
        n = len(data)
        if n == 0:
            break
        i = draw(st.integers(0, n - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        elif op == "splice":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            j = draw(st.integers(i, n))
            data[j:j] = data[i:j]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    _decode(data)


@FUZZ
@given(st.binary(max_size=300).map(lambda b: b"\0" * 128 + b"DICM" + b))
def test_random_bytes_behind_a_dicom_preamble(data):
    _decode(data)


@FUZZ
@given(corrupted(["png8", "png16"]))
def test_corrupted_png(data):
    _decode(data)


@FUZZ
@given(corrupted(["jpeg"]))
def test_corrupted_jpeg(data):
    _decode(data)


@pytest.mark.skipif("dicom" not in SEEDS, reason="pydicom (the [dicom] extra) is not installed")
@FUZZ
@given(corrupted(["dicom"]))
def test_corrupted_dicom(data):
    _decode(data)
