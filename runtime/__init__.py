"""ECHO runtime: the torch-free bottom layer (NumPy, onnxruntime or TensorRT, tokenizers, Pillow).

    from runtime import EchoRuntime
    reports = EchoRuntime("engines/echo").generate(["cxr.png"])

Never imports torch. Training imports the shared pieces (schedule, prompt, preprocess,
special tokens, manifest) from here; the engine classes load lazily.
"""
from __future__ import annotations

from .errors import EchoRuntimeError, ImageReadError, ManifestError

__all__ = ["EchoRuntime", "Report", "BlockEvent", "EchoRuntimeError", "ImageReadError", "ManifestError"]


def __getattr__(name: str):
    if name in ("EchoRuntime", "Report", "BlockEvent"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
