"""Training batch builders: which positions each stage scores."""
import torch

from conftest import make_tiny_model

from echo_train.model.masks import build_attention_mask, rad_layout
from echo_train.stages.batches import build_ar_inputs, build_rad_inputs


def _batch(tok, model, n_real=5, r=16):
    resp = torch.full((2, r), tok.eos_id)
    resp[:, :n_real] = torch.arange(10, 10 + n_real)
    keep = torch.zeros(2, r, dtype=torch.bool)
    keep[:, : n_real + 1] = True  # the report and its first EOS
    return {"pixel_values": torch.zeros(2, 1, 32, 32),
            "prefix_ids": torch.tensor(tok.prefix_ids(model.n_image_tokens))[None].expand(2, -1),
            "response_ids": resp, "response_mask": keep}


def test_rad_scores_masked_positions_through_the_first_eos_only(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, block_size=4)
    batch = _batch(tiny_tokenizer, model)
    P, R = batch["prefix_ids"].shape[1], 16
    for symmetric in (False, True):
        inp = build_rad_inputs(model, batch, 4, tiny_tokenizer.mask_id, torch.Generator().manual_seed(0), 2, symmetric)
        scored = inp.targets != -100
        assert scored.any()
        noisy = inp.targets[:, P : P + R] if symmetric else inp.targets[:, P + R :].reshape(2, 2, R)
        assert (noisy[..., 6:] == -100).all()  # EOS padding is input, never a target
        assert set(inp.targets[scored].tolist()) <= set(range(10, 15)) | {tiny_tokenizer.eos_id}


def test_rad_scores_exactly_the_masked_response_positions(tiny_tokenizer):
    """The scored set is exactly {noisy-copy position whose input is MASK and whose token is the
    report or its first EOS}, with the clean token as target; every other position of a noisy copy
    carries its clean token. Recovered from the embeddings the model sees, not from the sampler."""
    tok = tiny_tokenizer
    model = make_tiny_model(tok, block_size=4)
    batch = _batch(tok, model, n_real=9)  # 9 report ids + EOS scored, 6 EOS pads not
    P, R = batch["prefix_ids"].shape[1], 16
    resp, keep = batch["response_ids"], batch["response_mask"]
    with torch.no_grad():
        mask_row = model.embed_tokens(torch.tensor([tok.mask_id]))[0]
        clean_rows = model.embed_tokens(resp)
    seen = {"scored": 0, "masked_pad": 0, "unmasked_report": 0}
    for symmetric in (False, True):
        for seed in range(4):
            with torch.no_grad():
                inp = build_rad_inputs(model, batch, 4, tok.mask_id, torch.Generator().manual_seed(seed), 2, symmetric)
            copies = [slice(P, P + R)] if symmetric else [slice(P + R * (1 + c), P + R * (2 + c)) for c in range(2)]
            expected = torch.full_like(inp.targets, -100)
            for sp in copies:
                x = inp.embeds[:, sp]
                is_mask = (x == mask_row).all(-1)
                assert torch.equal(x[~is_mask], clean_rows[~is_mask])  # unmasked: the clean token itself
                expected[:, sp] = torch.where(is_mask & keep, resp, torch.full_like(resp, -100))
                seen["masked_pad"] += int((is_mask & ~keep).sum())
                seen["unmasked_report"] += int((~is_mask & keep).sum())
            assert torch.equal(inp.targets, expected), (symmetric, seed)
            seen["scored"] += int((expected != -100).sum())
    # the check is not vacuous: positions of every kind occurred
    assert min(seen.values()) > 10, seen


def test_rad_layout_and_positions(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, block_size=4)
    batch = _batch(tiny_tokenizer, model)
    P = batch["prefix_ids"].shape[1]
    inp = build_rad_inputs(model, batch, 4, tiny_tokenizer.mask_id, torch.Generator().manual_seed(0), 1)
    assert torch.equal(inp.mask[0], build_attention_mask(rad_layout(P, 16, 4, 1)))
    pos = inp.position_ids[0]
    assert torch.equal(pos[P : P + 16], pos[P + 16 :])  # a noisy copy sits at its clean copy's positions


def test_ar_targets_are_the_next_tokens_through_the_first_eos(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, stage="ar")
    batch = _batch(tiny_tokenizer, model)
    P = batch["prefix_ids"].shape[1]
    t = build_ar_inputs(model, batch).targets[0]
    assert (t[: P - 1] == -100).all()
    assert t[P - 1 : P + 5].tolist() == list(range(10, 15)) + [tiny_tokenizer.eos_id]
    assert (t[P + 5 :] == -100).all()


def test_shifted_rad_reads_each_target_from_the_position_before_it(tiny_tokenizer):
    for shifted in (True, False):
        model = make_tiny_model(tiny_tokenizer, block_size=4, shifted=shifted)
        batch = _batch(tiny_tokenizer, model)
        P, R = batch["prefix_ids"].shape[1], 16
        inp = build_rad_inputs(model, batch, 4, tiny_tokenizer.mask_id, torch.Generator().manual_seed(0), 2)
        if not shifted:
            assert inp.sources is None
            continue
        pos = inp.position_ids[0]
        noisy = torch.arange(P + R, P + 3 * R)
        src = inp.sources[noisy]
        assert torch.equal(pos[src], pos[noisy] - 1)  # every noisy token is read one position earlier
        starts = noisy[pos[noisy] % 4 == 0]
        assert (inp.sources[starts] < P + R).all()  # a block's first token: from the clean sequence
        h = torch.randn(2, inp.embeds.shape[1], 8)
        hs, t = inp.scored(h)
        assert hs.shape[0] == t.shape[0] == int((inp.targets != -100).sum())


def test_ar_loss_on_a_causal_clean_copy_is_stage_one_loss(tiny_tokenizer):
    """With a causal context the clean copy is stage 1's sequence: its AR loss inside the RAD
    forward equals the stage-1 loss on the same batch (the noisy copies cannot leak into it)."""
    from echo_train.stages.batches import scored_cross_entropy

    torch.manual_seed(0)
    model = make_tiny_model(tiny_tokenizer, block_size=4, causal_context=True)
    batch = _batch(tiny_tokenizer, model)
    ar = scored_cross_entropy(model, build_ar_inputs(model, batch))
    inp = build_rad_inputs(model, batch, 4, tiny_tokenizer.mask_id, torch.Generator().manual_seed(0), 2, ar_weight=1.0)
    diffusion_only = build_rad_inputs(model, batch, 4, tiny_tokenizer.mask_id, torch.Generator().manual_seed(0), 2)
    assert diffusion_only.aux_targets is None
    combined = scored_cross_entropy(model, inp)
    assert torch.allclose(combined - scored_cross_entropy(model, diffusion_only), ar, atol=1e-5)
    # without a causal context there is no AR sequence to score, so no auxiliary loss
    blockwise = make_tiny_model(tiny_tokenizer, block_size=4)
    assert build_rad_inputs(blockwise, batch, 4, tiny_tokenizer.mask_id, torch.Generator(), 1, ar_weight=1.0).aux_targets is None
