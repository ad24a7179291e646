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
block_denoise   input_ids i64[b,B], position_ids, past_key/past_value, past_len
block_commit    -> tokens i64[b,B], confidence f32[b,B] (each position's own argmax and its probability),
                   present_key/present_value f32[L,b,kvH,B,dh]
                (the multi-step teacher's passes over one block: denoise reads a noisy block and
                 stores nothing; commit stores a finished block's KV. With a block-causal context
                 both are the same graph.)
ar_prefill      pixel_values, prefix_ids -> tokens i64[b,1], present_key/value f32[L,b,kvH,P,dh]
ar_step         input_ids i64[b,1], position_ids i64[b,1], past_key/past_value, past_len
                -> tokens i64[b,1], present_key/value f32[L,b,kvH,1,dh]

Native resolution (model_config.vision.native, Qwen2.5-VL): vision_prefill takes one image at its
own grid, batch 1, its shapes dynamic (n patches, w windows, T tokens; runtime/native_image.py):
vision_prefill  pixel_patches f32[n,C*T*p*p], patch_rc i64[n,2], window_gather i64[w,W],
                window_valid bool[w,W], window_inverse i64[n], prefix_ids i64[1,T],
                position_ids i64[3,1,T] -> present_key/present_value f32[L,1,kvH,T,dh]
                (T = the prompt's whole blocks minus the last: BlockLayout.fused_prefill_len)
and block_step's position_ids are rotary positions (canvas index + the image's rope delta).

Cache slots j < past_len hold valid KV; the graphs mask the rest. The mask token is never
predicted (its logit is excluded before argmax).
"""
from __future__ import annotations

from .precisions import NAMES

VISION_PREFILL = "vision_prefill"
BLOCK_STEP = "block_step"
AR_PREFILL = "ar_prefill"
AR_STEP = "ar_step"
BLOCK_DENOISE = "block_denoise"
BLOCK_COMMIT = "block_commit"
GRAPH_ROLES = (VISION_PREFILL, BLOCK_STEP, AR_PREFILL, AR_STEP, BLOCK_DENOISE, BLOCK_COMMIT)
MULTISTEP_ROLES = (BLOCK_DENOISE, BLOCK_COMMIT)

PREFILL_INPUTS = ("pixel_values", "prefix_ids")
NATIVE_PREFILL_INPUTS = ("pixel_patches", "patch_rc", "window_gather", "window_valid", "window_inverse", "prefix_ids",
                         "position_ids")
STEP_INPUTS = ("input_ids", "position_ids", "past_key", "past_value", "past_len")
BLOCK_STEP_OUTPUTS = ("tokens", "confidence", "present_key", "present_value")
PREFILL_OUTPUTS = ("present_key", "present_value")
AR_PREFILL_OUTPUTS = ("tokens", "present_key", "present_value")
AR_STEP_OUTPUTS = ("tokens", "present_key", "present_value")
BLOCK_PASS_OUTPUTS = ("tokens", "confidence", "present_key", "present_value")

PRECISIONS = NAMES  # the precision registry's names (runtime/precisions.py)


def graph_filename(role: str, precision: str, batch: int) -> str:
    """e.g. block_step.fp16.b1.onnx"""
    return f"{role}.{precision}.b{batch}.onnx"
