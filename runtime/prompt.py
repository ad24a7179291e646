"""The prompt template: image tokens first, then the instruction, aligned to blocks.

Layout of the prefix (length P, a multiple of PREFIX_ALIGN):

    [IMAGE] * n_image  [PAD] * pad  [BOS] instruction tokens

The pads sit between image and text so that (a) P is a multiple of every block size
we support (4, 8, 16) and (b) the last PREFIX_ALIGN tokens of the prefix are text only.
(b) lets the fused one-step decoder carry the last prefix block as the "previous clean
block" of its first pass using token ids alone, without image embeddings.
"""
from __future__ import annotations

from typing import Sequence

PROMPT_TEXT = "Write the findings and impression of this chest X-ray."
PREFIX_ALIGN = 16  # least common multiple of the supported block sizes
SUPPORTED_BLOCK_SIZES = (4, 8, 16)


def build_prefix_ids(
    instruction_ids: Sequence[int],
    n_image_tokens: int,
    image_id: int,
    pad_id: int,
    bos_id: int,
    align: int = PREFIX_ALIGN,
) -> list[int]:
    """Token ids of the whole prefix; image placeholders come first."""
    text = [bos_id, *instruction_ids]
    n = n_image_tokens + len(text)
    total = -(-n // align) * align
    # keep at least one whole aligned block of text-only tokens at the end
    while total - n_image_tokens < align:
        total += align
    pad = total - n
    return [image_id] * n_image_tokens + [pad_id] * pad + text
