"""Cached decoders give exactly the tokens of the no-cache recompute references."""
import pytest
import torch

from echo_train.decoding import (
    ar_generate,
    fused_onestep_generate,
    multistep_generate,
    recompute_ar_generate,
    recompute_multistep_generate,
)

from conftest import make_tiny_model


def _images(n=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1


def test_ar_cache_matches_recompute(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, stage="ar", sharpen=3.0)
    px = _images()
    a = ar_generate(model, tiny_tokenizer, px, max_new_tokens=20)
    b = recompute_ar_generate(model, tiny_tokenizer, px, max_new_tokens=20)
    assert torch.equal(a.raw, b.raw)
    assert a.forward_passes == a.raw.shape[1]


@pytest.mark.parametrize("B,steps,rule,shifted", [(4, 4, "dynamic", True), (4, 2, "static", True), (8, 8, "dynamic", True),
                                                  (8, 8, "dynamic", False), (8, 3, "dynamic", True), (8, 1, "dynamic", False),
                                                  (16, 16, "dynamic", True), (16, 4, "static", False),
                                                  (8, 8, "dynamic-ltr", True), (8, 3, "dynamic-ltr", False), (16, 5, "dynamic-ltr", True)])
def test_multistep_cache_matches_recompute(tiny_tokenizer, B, steps, rule, shifted):
    model = make_tiny_model(tiny_tokenizer, block_size=B, sharpen=6.0, seed=B + steps, shifted=shifted)
    px = _images()
    a = multistep_generate(model, tiny_tokenizer, px, B, steps, max_new_tokens=3 * B, rule=rule)
    b = recompute_multistep_generate(model, tiny_tokenizer, px, B, steps, max_new_tokens=3 * B, rule=rule)
    assert torch.equal(a.raw, b.raw)


@pytest.mark.parametrize("B,steps,rule", [(4, 4, "dynamic"), (8, 3, "dynamic-ltr"), (8, 2, "static")])
def test_multistep_cache_matches_recompute_with_causal_context(tiny_tokenizer, B, steps, rule):
    model = make_tiny_model(tiny_tokenizer, block_size=B, sharpen=6.0, seed=B + steps, causal_context=True)
    px = _images()
    a = multistep_generate(model, tiny_tokenizer, px, B, steps, max_new_tokens=3 * B, rule=rule)
    b = recompute_multistep_generate(model, tiny_tokenizer, px, B, steps, max_new_tokens=3 * B, rule=rule)
    assert torch.equal(a.raw, b.raw)


def test_dynamic_rule_accepts_confident_positions_early(tiny_tokenizer):
    """With peaked distributions the dynamic rule needs fewer passes than the static one."""
    model = make_tiny_model(tiny_tokenizer, block_size=8, sharpen=40.0, seed=3)  # a seed whose random weights are peaked
    px = _images()
    dyn = multistep_generate(model, tiny_tokenizer, px, 8, 8, max_new_tokens=16, rule="dynamic")
    sta = multistep_generate(model, tiny_tokenizer, px, 8, 8, max_new_tokens=16, rule="static")
    assert dyn.forward_passes < sta.forward_passes


@pytest.mark.parametrize("B,shifted,causal", [(4, True, False), (8, True, False), (8, False, False), (16, True, False),
                                              (8, True, True), (4, True, True)])
def test_fused_onestep_matches_unfused(tiny_tokenizer, B, shifted, causal):
    model = make_tiny_model(tiny_tokenizer, block_size=B, sharpen=4.0, seed=B, shifted=shifted, causal_context=causal)
    px = _images(3)
    fused = fused_onestep_generate(model, tiny_tokenizer, px, B, max_new_tokens=4 * B)
    unfused = multistep_generate(model, tiny_tokenizer, px, B, 1, max_new_tokens=4 * B)
    assert torch.equal(fused.raw, unfused.raw)
    n_blocks = fused.raw.shape[1] // B
    assert fused.forward_passes == n_blocks + 1

