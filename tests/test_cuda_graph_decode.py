"""The static-buffer decode loops that CUDA graphs capture (echo_export/cuda_graph_decode.py) give
the reference decoders' tokens, on the trained varied model (reports differ per image).

On a CPU the passes run eagerly on the same static buffers, cache writes and precomputed
positions the GPU replays; the CUDA test captures them and skips without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from varied_models import as_stage, assert_informative, get_varied, varied_images

MAX_NEW = 40


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    base = get_varied(tiny_tokenizer, shifted=True, causal_context=True)
    return as_stage(base, "dcd", block_size=8), as_stage(base, "ar"), tiny_tokenizer


def _decoders(models, batch: int, device: str, cuda_graphs: bool, stop_at_eos: bool = True):
    from echo_export.cuda_graph_decode import StaticDecodeConfig, StaticDecoder

    student, ar, tok = models
    cfg = StaticDecodeConfig(batch=batch, max_new_tokens=MAX_NEW, cuda_graphs=cuda_graphs, stop_at_eos=stop_at_eos)
    return (StaticDecoder(student.to(device), tok, cfg, "fused"), StaticDecoder(ar.to(device), tok, cfg, "ar"))


def _reference(models, px: torch.Tensor):
    from echo_train.decoding import ar_generate, fused_onestep_generate

    student, ar, tok = models
    return (fused_onestep_generate(student.cpu(), tok, px, 8, MAX_NEW), ar_generate(ar.cpu(), tok, px, MAX_NEW))


@pytest.mark.parametrize("batch", [1, 3])
def test_static_loops_give_the_reference_tokens_on_cpu(models, batch):
    px = torch.from_numpy(varied_images(batch))
    want_fused, want_ar = _reference(models, px)
    fused, ar = _decoders(models, batch, "cpu", cuda_graphs=True)  # no capture on a CPU: eager passes
    assert fused.step.graph is None
    got_fused, got_ar = fused.generate(px), ar.generate(px)
    assert_informative(want_fused.raw, models[2].eos_id)
    assert got_fused.tokens == want_fused.tokens and got_fused.forward_passes == want_fused.forward_passes
    assert got_ar.tokens == want_ar.tokens and got_ar.forward_passes == want_ar.forward_passes
    # the buffers are reused: a second report on the same decoder gives the same tokens
    assert fused.generate(px).tokens == want_fused.tokens and ar.generate(px).tokens == want_ar.tokens


def test_fixed_length_reports_run_every_pass(models):
    """stop_at_eos=False (the speed benchmark): every report runs to max_new_tokens, and the tokens
    before the first EOS are still the reference's."""
    px = torch.from_numpy(varied_images(2))
    want_fused, want_ar = _reference(models, px)
    fused, ar = _decoders(models, 2, "cpu", cuda_graphs=False, stop_at_eos=False)
    got_fused, got_ar = fused.generate(px), ar.generate(px)
    assert got_fused.raw.shape == (2, MAX_NEW) and got_ar.raw.shape == (2, MAX_NEW)
    assert got_fused.tokens == want_fused.tokens and got_ar.tokens == want_ar.tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here)")
def test_captured_cuda_graphs_give_the_reference_tokens(models):
    px = torch.from_numpy(varied_images(2))
    want_fused, want_ar = _reference(models, px)
    fused, ar = _decoders(models, 2, "cuda", cuda_graphs=True)
    assert fused.step.graph is not None and ar.step.graph is not None
    assert fused.generate(px).tokens == want_fused.tokens
    assert ar.generate(px).tokens == want_ar.tokens
