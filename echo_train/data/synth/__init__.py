"""Procedural chest X-ray benchmark with exact ground truth (images, reports, labels)."""
from __future__ import annotations


def generate_synth(*args, **kwargs):
    """See `echo_train.data.synth.generate.generate_synth` (imported lazily)."""
    from .generate import generate_synth as _g

    return _g(*args, **kwargs)


__all__ = ["generate_synth"]
