"""Names and shapes of the exported graphs: the contract between echo_export and the runtime.

L layers, b batch, kvH key/value heads, CAP cache slots, dh head dim, B block size,
P prefix length (a multiple of B), S image size. All KV tensors are float32 at the IO
boundary whatever the graph's internal precision.

vision_prefill  pixel_values f32[b,1,S,S], prefix_ids i64[b,P]
                -> present_key/present_value f32[L,b,kvH,P-B,dh]
                   (KV of the prefix minus its last block, block-causal; that block is
                    the "previous block" of the first block_step pass)
block_step      input_ids i64[b,2B], position_ids i64[b,2B], past_key/past_value
                f32[L,b,kvH,CAP,dh], past_len i64[b]
                -> tokens i64[b,B], confidence f32[b,B],
                   present_key/present_value f32[L,b,kvH,B,dh] (the first B inputs' KV)
ar_prefill      pixel_values, prefix_ids -> tokens i64[b,1], present_key/value f32[L,b,kvH,P,dh]
ar_step         input_ids i64[b,1], position_ids i64[b,1], past_key/past_value, past_len
                -> tokens i64[b,1], present_key/value f32[L,b,kvH,1,dh]

Cache slots j < past_len hold valid KV; the graphs mask the rest. The mask token is never
predicted (its logit is excluded before argmax).
"""
from __future__ import annotations

from .precisions import NAMES

VISION_PREFILL = "vision_prefill"
BLOCK_STEP = "block_step"
AR_PREFILL = "ar_prefill"
AR_STEP = "ar_step"
GRAPH_ROLES = (VISION_PREFILL, BLOCK_STEP, AR_PREFILL, AR_STEP)

PREFILL_INPUTS = ("pixel_values", "prefix_ids")
STEP_INPUTS = ("input_ids", "position_ids", "past_key", "past_value", "past_len")
BLOCK_STEP_OUTPUTS = ("tokens", "confidence", "present_key", "present_value")
PREFILL_OUTPUTS = ("present_key", "present_value")
AR_PREFILL_OUTPUTS = ("tokens", "present_key", "present_value")
AR_STEP_OUTPUTS = ("tokens", "present_key", "present_value")

PRECISIONS = NAMES  # the precision registry's names (runtime/precisions.py)


def graph_filename(role: str, precision: str, batch: int) -> str:
    """e.g. block_step.fp16.b1.onnx"""
    return f"{role}.{precision}.b{batch}.onnx"
