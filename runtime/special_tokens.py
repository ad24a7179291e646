"""Special tokens shared by training, export and serving (the one source of truth)."""
from __future__ import annotations

PAD = "<|pad|>"
EOS = "<|eos|>"
MASK = "<|MASK|>"
IMAGE = "<|image|>"
BOS = "<|bos|>"

# Order fixes the ids 0..4 in every tokenizer this project trains.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, MASK, IMAGE, BOS)
