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
ar_step_inplace input_ids, position_ids, past_len, past_key.{i}/past_value.{i} f32[b,kvH,CAP+1,dh] per
                layer -> tokens, present_key.{i}/present_value.{i}: the same buffers as past_*.{i}, the
                new KV written at slot past_len (echo_export/inplace_steps.py; onnxruntime CPU only)
block_step_inplace  the same for block_step: input_ids/position_ids i64[b,2B], caches [b,kvH,CAP+2B,dh]
                -> tokens, confidence f32[b,B], present_*.{i}: all 2B inputs' KV written from slot past_len

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
AR_STEP_INPLACE = "ar_step_inplace"
BLOCK_STEP_INPLACE = "block_step_inplace"
GRAPH_ROLES = (VISION_PREFILL, BLOCK_STEP, AR_PREFILL, AR_STEP, BLOCK_DENOISE, BLOCK_COMMIT, AR_STEP_INPLACE,
               BLOCK_STEP_INPLACE)
# graphs only onnxruntime's CPU kernels run (com.microsoft.GroupQueryAttention): no fp16 or int8 (static
# QDQ) form, no TensorRT plan; the runtime takes them in place of their standard role on the CPU
CPU_ONLY_ROLES = {AR_STEP_INPLACE: AR_STEP, BLOCK_STEP_INPLACE: BLOCK_STEP}
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


def step_width(role: str, block_size: int) -> int:
    """How many tokens one pass of a step graph feeds."""
    return {BLOCK_STEP: 2 * block_size, BLOCK_STEP_INPLACE: 2 * block_size, BLOCK_DENOISE: block_size,
            BLOCK_COMMIT: block_size}.get(role, 1)


# the steps in the in-place cache form (echo_export/inplace_steps.py: onnxruntime CPU): one cache
# tensor per layer, each both an input and an output bound to the same buffer, written from slot past_len
def inplace_spare_slots(width: int) -> int:
    """Slots past a loop's capacity: its last pass writes all `width` fed tokens' KV there too,
    though no later pass reads them."""
    return width


def inplace_step_inputs(layers: int) -> tuple[str, ...]:
    return ("input_ids", "position_ids", "past_len", *(f"past_key.{i}" for i in range(layers)),
            *(f"past_value.{i}" for i in range(layers)))


def inplace_step_outputs(layers: int, role: str = AR_STEP_INPLACE) -> tuple[str, ...]:
    ids = ("tokens", "confidence") if role == BLOCK_STEP_INPLACE else ("tokens",)
    return (*ids, *(f"present_key.{i}" for i in range(layers)), *(f"present_value.{i}" for i in range(layers)))


def is_inplace_cache(input_names) -> bool:
    """Whether a step graph takes its cache per layer and updates it in place (else stacked, stored after)."""
    return "past_key.0" in input_names


def inplace_cache_bindings(cache_k, cache_v) -> tuple[dict, dict]:
    """(inputs, outputs) of an in-place step over stacked caches [L,b,kvH,CAP+1,dh]: layer i's view
    (contiguous: L is the outer axis) is both past_*.{i} and present_*.{i}."""
    ins = {**{f"past_key.{i}": cache_k[i] for i in range(cache_k.shape[0])},
           **{f"past_value.{i}": cache_v[i] for i in range(cache_v.shape[0])}}
    return ins, {k.replace("past_", "present_"): v for k, v in ins.items()}
