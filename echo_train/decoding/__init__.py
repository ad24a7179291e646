"""PyTorch reference decoders: AR, multi-step block diffusion, fused one-step, and no-cache recompute."""
from .ar import ar_generate
from .block_diffusion import DecodeResult, fused_onestep_generate, multistep_generate
from .recompute import recompute_ar_generate, recompute_multistep_generate

__all__ = [
    "DecodeResult",
    "ar_generate",
    "multistep_generate",
    "fused_onestep_generate",
    "recompute_ar_generate",
    "recompute_multistep_generate",
]
