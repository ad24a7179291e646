"""Tests written to kill mutants that survived `make mutation` (benchmarks/results/mutation/).

Each test names the mutant it kills and asserts what a correct implementation must produce.
"""
from __future__ import annotations

import numpy as np
import pytest

from runtime.schedule import select_unmask, transfer_schedule


# ---- runtime/schedule.py ------------------------------------------------------------------

def test_transfer_schedule_splits_the_block_evenly_earliest_steps_first():
    """Kills transfer_schedule mutants 13-16 (`or True`, 2 for 1, `<=`, `else 1`): a schedule
    that accepts more than B positions still finishes every block, so only exact counts fail."""
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert transfer_schedule(16, 5) == [4, 3, 3, 3, 3]
    assert transfer_schedule(8, 8) == [1] * 8
    assert transfer_schedule(4, 1) == [4]
    for B, steps in [(8, 3), (16, 5), (16, 16), (8, 1)]:
        assert sum(transfer_schedule(B, steps)) == B


@pytest.mark.parametrize("steps", [0, 9])
def test_transfer_schedule_refusal_says_what_is_allowed(steps):
    """Kills transfer_schedule mutant 5 (the error message dropped)."""
    with pytest.raises(ValueError, match=rf"steps must be in \[1, 8\], got {steps}"):
        transfer_schedule(8, steps)


@pytest.mark.parametrize("rule", ["dynamic-ltr", "dynamic"])
def test_a_confidence_equal_to_the_threshold_is_not_above_it(rule):
    """Kills select_unmask mutants 38 and 84 (`>` -> `>=`): "above threshold" is strict, and the
    runtime and the PyTorch decoders must agree on the boundary. 0.5 is exact in binary."""
    conf = np.array([[0.10, 0.50, 0.75, 0.20]])
    still = np.ones_like(conf, dtype=bool)
    got = np.flatnonzero(select_unmask(conf, still, 1, rule, threshold=0.5)[0]).tolist()
    assert got == ([0, 2] if rule == "dynamic-ltr" else [2])


def test_ties_break_toward_the_lower_position_on_a_16_token_block():
    """Kills select_unmask mutants 42 and 45 (argsort without kind="stable": quicksort, whose
    order among equal confidences differs from the stable one for 16 positions and more)."""
    B = 16
    conf = np.full((1, B), 0.5)
    conf[0, 8] = 0.4
    still = np.ones_like(conf, dtype=bool)
    for rule in ("static", "dynamic"):
        got = np.flatnonzero(select_unmask(conf, still, 13, rule, threshold=0.9)[0]).tolist()
        assert got == [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13], rule


# ---- echo_train/stages/dcd_targets.py: the two ablations no covering test called -----------

def _gt_batch(tok, model, r: int = 12, n_real: tuple = (5, 2)):
    """Reports of n_real ids + EOS, EOS-padded to r = 3 blocks of 4: row 0 scores blocks 0-1,
    row 1 block 0 only."""
    import torch

    resp = torch.full((len(n_real), r), tok.eos_id)
    keep = torch.zeros(len(n_real), r, dtype=torch.bool)
    for i, n in enumerate(n_real):
        resp[i, :n] = torch.arange(10 + i, 10 + i + n)
        keep[i, : n + 1] = True
    return {"pixel_values": torch.zeros(len(n_real), 1, 32, 32),
            "prefix_ids": torch.tensor(tok.prefix_ids(model.n_image_tokens))[None].expand(len(n_real), -1),
            "response_ids": resp, "response_mask": keep}


@pytest.mark.parametrize("p_intermediate", [0.0, 1.0])
def test_gt_onestep_targets_are_the_report_blocks_on_all_positions(tiny_tokenizer, p_intermediate):
    """build_gt_onestep_inputs (ablation): copy 1 all-mask, copy 2 (p_intermediate > 0) a partly
    masked report; both scored on ALL positions of the blocks up to the one holding the EOS."""
    import torch

    from conftest import make_tiny_model
    from echo_train.model.masks import build_attention_mask, rad_layout
    from echo_train.stages.dcd_targets import build_gt_onestep_inputs

    tok = tiny_tokenizer
    model = make_tiny_model(tok, stage="dcd", block_size=4)
    batch = _gt_batch(tok, model)
    P, R = batch["prefix_ids"].shape[1], 12
    n_copies = 2 if p_intermediate > 0 else 1
    with torch.no_grad():
        torch.manual_seed(7)
        inp = build_gt_onestep_inputs(model, batch, tok.mask_id, torch.Generator().manual_seed(0), p_intermediate)
        torch.manual_seed(8)  # only the generator may decide the draw
        again = build_gt_onestep_inputs(model, batch, tok.mask_id, torch.Generator().manual_seed(0), p_intermediate)
        mask_row = model.embed_tokens(torch.tensor([tok.mask_id]))[0]
    assert torch.equal(inp.embeds, again.embeds)
    if p_intermediate > 0:  # at p = 1/2 too, where the generator also decides which blocks are partial
        with torch.no_grad():
            torch.manual_seed(7)
            half = build_gt_onestep_inputs(model, batch, tok.mask_id, torch.Generator().manual_seed(0), 0.5)
            torch.manual_seed(8)
            half_again = build_gt_onestep_inputs(model, batch, tok.mask_id, torch.Generator().manual_seed(0), 0.5)
        assert torch.equal(half.embeds, half_again.embeds)
    assert inp.targets.shape == (2, P + R * (1 + n_copies))
    assert torch.equal(inp.mask[0], build_attention_mask(rad_layout(P, R, 4, n_copies)))
    for row, n_ok in ((0, 8), (1, 4)):  # blocks up to the one holding the EOS, on all their positions
        resp = batch["response_ids"][row]
        with torch.no_grad():
            clean_rows = model.embed_tokens(resp)
        tg = inp.targets[row]
        assert (tg[: P + R] == -100).all()  # prefix and clean copy never scored
        want = torch.cat([resp[:n_ok], torch.full((R - n_ok,), -100)])
        for c in range(n_copies):
            assert torch.equal(tg[P + R * (1 + c) : P + R * (2 + c)], want), (row, c)
        assert torch.equal(inp.embeds[row, P + R : P + 2 * R], mask_row.expand(R, -1))  # copy 1: all-mask
        assert torch.equal(inp.embeds[row, P : P + R], clean_rows)  # the clean copy is the report
        if n_copies == 2:
            x = inp.embeds[row, P + 2 * R :]
            is_mask = (x == mask_row).all(-1)
            assert torch.equal(x[~is_mask], clean_rows[~is_mask]) and is_mask.any() and (~is_mask).any()
    pos = inp.position_ids[0]
    for c in range(n_copies):
        assert torch.equal(pos[P + R * (1 + c) : P + R * (2 + c)], pos[P : P + R])
    assert inp.sources is not None  # a shifted model reads token j from j-1


def test_factorised_loss_is_the_cross_entropy_to_the_teachers_mask_free_distribution(tiny_tokenizer):
    """factorised_distillation_loss (ablation) from its definition: at the all-mask state, on the
    scored positions of valid blocks, -sum softmax(teacher, MASK excluded) * log_softmax(student),
    averaged over positions; gradients reach the student only."""
    import torch
    import torch.nn.functional as F

    from conftest import make_tiny_model
    from echo_train.model.masks import build_attention_mask, prediction_sources, rad_layout
    from echo_train.stages.dcd_targets import factorised_distillation_loss

    tok = tiny_tokenizer
    B, R = 4, 12
    teacher = make_tiny_model(tok, stage="rad", block_size=B, seed=1)
    student = make_tiny_model(tok, stage="dcd", block_size=B, seed=2)
    ids = torch.tensor([[10, 11, 12, 13, 14, tok.eos_id] + [tok.eos_id] * 6,
                        [20, 21, tok.eos_id] + [tok.eos_id] * 9])
    batch = {"pixel_values": torch.zeros(2, 1, 32, 32),
             "prefix_ids": torch.tensor(tok.prefix_ids(teacher.n_image_tokens))[None].expand(2, -1),
             "teacher_ids": ids, "block_valid": torch.tensor([[True, True, False], [True, False, False]])}
    P = batch["prefix_ids"].shape[1]
    loss = factorised_distillation_loss(student, teacher, batch, tok.mask_id)

    def logits_at_scored(model):
        layout = rad_layout(P, R, B, 1, model.cfg.context_kind)
        emb = torch.cat([model.embed_prefix(batch["pixel_values"], batch["prefix_ids"]), model.embed_tokens(ids),
                         model.embed_tokens(torch.full_like(ids, tok.mask_id))], 1)
        h, _ = model.lm(emb, layout.position[None].expand(2, -1), build_attention_mask(layout)[None])
        src = prediction_sources(layout)[P + R :]
        # row 0: its two valid blocks (8 positions), row 1: its one valid block (4), in row order
        return model.lm.lm_head(torch.cat([h[0, src[:8]], h[1, src[:4]]])).float()

    with torch.no_grad():
        t = logits_at_scored(teacher)
        t[:, tok.mask_id] = float("-inf")
        p = F.softmax(t, -1)
    want = -(p * F.log_softmax(logits_at_scored(student), -1)).sum(-1).mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(q.grad is None for q in teacher.parameters())
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in student.parameters())


def test_dcd_intermediate_states_are_drawn_strictly_between_all_mask_and_final(tiny_tokenizer):
    """build_dcd_inputs with p_intermediate > 0 (stage 3 defaults to 0, so only this test draws
    intermediate states). Kills build_dcd_inputs mutants 1, 37, 41-43, 45, 49-58, 60, 64-67, 85:
    copy 2 of a block holds one of the states strictly between all-mask and final (each of them
    occurs, a lone one too), a block without such a state stays all-mask, p in (0, 1) mixes both,
    two studies of a batch draw on their own, the draw follows the generator only, and the
    defaults add neither a second copy nor the AR loss."""
    import torch

    from conftest import make_tiny_model
    from echo_train.stages.dcd_targets import build_dcd_inputs
    from echo_train.stages.stage3_dcd import make_trajectory_collate

    tok = tiny_tokenizer
    m, eos = tok.mask_id, tok.eos_id
    model = make_tiny_model(tok, stage="rad", block_size=4, causal_context=True)
    prefix = torch.tensor(tok.prefix_ids(model.n_image_tokens))
    final0, final1, final2 = [7, 8, 9, 10], [11, 12, 13, 14], [15, eos, eos, eos]
    mids = [[7, m, m, m], [7, 8, m, m], [7, 8, m, 10]]  # block 0: three states strictly between
    mid1 = [11, m, 13, m]  # block 1: exactly one; block 2: none

    def item(i):
        states = [torch.tensor([[m] * 4, *mids, final0]), torch.tensor([[m] * 4, mid1, final1]),
                  torch.tensor([[m] * 4, final2])]
        return {"pixel_values": torch.zeros(1, 32, 32), "prefix_ids": prefix, "response_ids": torch.tensor([7, eos]),
                "id": str(i), "teacher": {"tokens": torch.tensor(final0 + final1 + final2), "states": states}}

    batch = make_trajectory_collate(tok, 4)([item(0), item(1)])  # two studies, three blocks each
    P, R = prefix.shape[0], batch["teacher_ids"].shape[1]
    assert R == 12
    with torch.no_grad():
        emb = model.embed_tokens
        mask_block = emb(torch.tensor([m] * 4))
        mid_rows = [emb(torch.tensor(s)) for s in mids]
        mid1_row = emb(torch.tensor(mid1))

        def copy2(p, seed, global_seed=0):
            torch.manual_seed(global_seed)  # only `gen` may decide the draw, not the global RNG
            inp = build_dcd_inputs(model, batch, m, torch.Generator().manual_seed(seed), p_intermediate=p)
            assert inp.targets.shape[1] == P + 3 * R  # prefix, clean, copy 1, copy 2
            return inp, inp.embeds[:, P + 2 * R :]

        def which(block0):
            hits = [k for k, rows in enumerate(mid_rows) if torch.equal(block0, rows)]
            return hits[0] if hits else ("mask" if torch.equal(block0, mask_block) else None)

        seen, rows_differ = set(), False
        for seed in range(16):
            inp, x = copy2(1.0, seed)
            picks = [which(x[r, :4]) for r in range(2)]
            assert all(k in (0, 1, 2) for k in picks), (seed, picks)  # never all-mask, never final
            seen |= set(picks)
            rows_differ |= picks[0] != picks[1]
            for r in range(2):
                assert torch.equal(x[r, 4:8], mid1_row)  # the lone intermediate state
                assert torch.equal(x[r, 8:], mask_block)  # no state strictly between: all-mask
            assert torch.equal(inp.targets[:, P + 2 * R :], inp.targets[:, P + R : P + 2 * R])  # same targets
        assert seen == {0, 1, 2} and rows_differ
        halves = [[which(x[r, :4]) == "mask" for r in range(2)] for seed in range(16) for x in [copy2(0.5, seed)[1]]]
        assert {h for pair in halves for h in pair} == {True, False}  # p = 1/2: both kinds of block 0
        assert any(h0 != h1 for h0, h1 in halves)  # each study draws its own
        for seed in range(4):  # the draw follows the generator, whatever the global RNG holds
            assert torch.equal(copy2(0.5, seed, global_seed=1)[1], copy2(0.5, seed, global_seed=2)[1])
        plain = build_dcd_inputs(model, batch, m, torch.Generator().manual_seed(0))
    assert plain.targets.shape[1] == P + 2 * R and plain.aux_targets is None  # defaults: one copy, no AR loss


# ---- echo_train/model/masks.py --------------------------------------------------------------

def test_symmetric_layout_keeps_a_causal_context_causal():
    """Kills symmetric_layout mutant 18 (`kind=context` dropped): with a causal context (the
    causal-context teacher's ablation) the clean half is the AR model's causal attention, not
    block-causal; the noisy half is unchanged."""
    import torch

    from echo_train.model.masks import CAUSAL, NOISY, build_attention_mask, causal_layout, symmetric_layout

    P, R, B = 4, 8, 4
    lay = symmetric_layout(P, R, B, context=CAUSAL)
    n = P + R
    assert (lay.kind[:n] == NOISY).all() and (lay.kind[n:] == CAUSAL).all()
    mask = build_attention_mask(lay)
    assert torch.equal(mask[n:, n:], build_attention_mask(causal_layout(n)))
    assert not mask[n:, :n].any()  # the clean half never reads the noisy one


def test_prediction_sources_with_one_token_blocks_and_a_gap():
    """Kills prediction_sources mutants 43 (`position > 1`), 61 (missing-source sentinel +1),
    74 and 75 (`found > 0`, `found >= 1`): with B = 1 the first noisy token can sit at position 1
    and read the clean token at index 0; a noisy block whose previous position holds no clean
    token reads itself (the docstring's "tokens without such a source map to themselves")."""
    import torch

    from echo_train.model.masks import CLEAN, NOISY, TokenLayout, block_layout, prediction_sources, rad_layout

    # P = 1, R = 3, B = 1: clean tokens 0..3 at positions 0..3, noisy tokens 4..6 at positions 1..3
    assert prediction_sources(rad_layout(1, 3, 1)).tolist() == [0, 1, 2, 3, 0, 1, 2]
    # clean positions 0-1, then a noisy block at positions 4-5: position 3 is absent
    gap = TokenLayout.cat([block_layout(2, 2, kind=CLEAN), block_layout(2, 2, start=4, kind=NOISY, copy=1)])
    assert prediction_sources(gap).tolist() == [0, 1, 2, 2]
    assert (gap.kind == torch.tensor([CLEAN, CLEAN, NOISY, NOISY])).all()


# ---- echo_train/stages/batches.py -----------------------------------------------------------

def _rad_batch(tok, model, b=2, r=16, n_real=9):
    import torch

    resp = torch.full((b, r), tok.eos_id)
    resp[:, :n_real] = torch.arange(10, 10 + n_real)
    keep = torch.zeros(b, r, dtype=torch.bool)
    keep[:, : n_real + 1] = True
    return {"pixel_values": torch.zeros(b, 1, 32, 32),
            "prefix_ids": torch.tensor(tok.prefix_ids(model.n_image_tokens))[None].expand(b, -1),
            "response_ids": resp, "response_mask": keep}


def test_rad_inputs_default_to_one_noisy_copy_and_follow_the_generator(tiny_tokenizer):
    """Kills build_rad_inputs mutants 1 (default n_noisy 2) and 79 (the symmetric noise drawn
    without the generator): the default is one noisy copy, and the same seed gives the same input."""
    import torch

    from conftest import make_tiny_model
    from echo_train.stages.batches import build_rad_inputs

    tok = tiny_tokenizer
    model = make_tiny_model(tok, block_size=4)
    batch = _rad_batch(tok, model)
    P, R = batch["prefix_ids"].shape[1], 16
    with torch.no_grad():
        one = build_rad_inputs(model, batch, 4, tok.mask_id, torch.Generator().manual_seed(0))
        assert one.targets.shape == (2, P + 2 * R)
        for symmetric in (False, True):
            torch.manual_seed(1)  # the global RNG differs between the calls: only `gen` may matter
            a = build_rad_inputs(model, batch, 4, tok.mask_id, torch.Generator().manual_seed(3), 1, symmetric)
            torch.manual_seed(2)
            b = build_rad_inputs(model, batch, 4, tok.mask_id, torch.Generator().manual_seed(3), 1, symmetric)
            assert torch.equal(a.embeds, b.embeds) and torch.equal(a.targets, b.targets), symmetric


def test_symmetric_inputs_use_the_symmetric_layout_of_the_models_context(tiny_tokenizer):
    """Kills build_rad_inputs mutants 126-129 (symmetric_layout called with wrong arguments or
    without the model's context kind): mask, positions and sources are those of
    symmetric_layout(P, R, B, context) for a block-causal and for a causal-context model."""
    import torch

    from conftest import make_tiny_model
    from echo_train.model.masks import build_attention_mask, prediction_sources, symmetric_layout
    from echo_train.stages.batches import build_rad_inputs

    tok = tiny_tokenizer
    for causal in (False, True):
        model = make_tiny_model(tok, block_size=4, causal_context=causal)
        batch = _rad_batch(tok, model)
        P, R = batch["prefix_ids"].shape[1], 16
        with torch.no_grad():
            inp = build_rad_inputs(model, batch, 4, tok.mask_id, torch.Generator().manual_seed(0), 1, True)
        lay = symmetric_layout(P, R, 4, model.cfg.context_kind)
        assert inp.embeds.shape[1] == len(lay) == 2 * (P + R)
        assert torch.equal(inp.mask[0], build_attention_mask(lay)), causal
        assert torch.equal(inp.position_ids[1], lay.position)
        assert torch.equal(inp.sources, prediction_sources(lay))


def test_block_noise_masks_half_on_average_and_each_row_on_its_own():
    """Kills sample_block_noise mutants 14 (t ~ U(eps, 2): most blocks fully masked) and 27 (one
    noise row shared by the whole batch). t ~ U(eps, 1] per block, so the mean masked share is
    1/2 and within a block positions are masked independently at the block's rate."""
    import torch

    from echo_train.stages.batches import sample_block_noise

    resp = torch.arange(10, 10 + 64).repeat(256, 1)  # 256 identical rows of 16 blocks of 4
    noisy, masked = sample_block_noise(resp, 4, 3, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, torch.where(masked, torch.full_like(resp, 3), resp))
    share = masked.float().mean().item()
    assert 0.47 < share < 0.53, share  # 16384 blocks: sd of the mean ~0.003
    full = masked.reshape(256, 16, 4).all(-1).float().mean().item()
    assert full < 0.3, full  # E[t^4] = 1/5 for t ~ U(0, 1]; 0.6 if t ~ U(0, 2) capped at 1
    # each position is masked in about half of the rows; a noise row shared by the batch would
    # mask position j wherever t > u_j, i.e. in a share 1 - u_j of the rows, spread over [0, 1]
    per_position = masked.float().mean(0)
    assert (per_position - 0.5).abs().max().item() < 0.15, per_position  # sd 0.031 per position


def test_rad_layout_defaults_to_one_noisy_copy():
    """Kills rad_layout mutant 1 (default n_noisy 2): the existing length checks pass n_noisy."""
    from echo_train.model.masks import NOISY, rad_layout

    lay = rad_layout(8, 12, 4)
    assert len(lay) == 8 + 2 * 12
    assert (lay.kind == NOISY).sum().item() == 12 and set(lay.copy[lay.kind == NOISY].tolist()) == {1}


# ---- echo_train/decoding/run.py: decode_batch, which no covering test called -------------------

@pytest.mark.parametrize("spec_kw, want", [
    ({"mode": "ar", "max_new_tokens": 24}, ("ar", 24)),
    ({"mode": "onestep", "block_size": 4, "max_new_tokens": 24}, ("fused", 4, 24)),
    ({"mode": "onestep-unfused", "block_size": 4, "steps": 3, "max_new_tokens": 24, "rule": "static"},
     ("multistep", 4, 1, 24, "static", True)),
    ({"mode": "multistep", "block_size": 8, "max_new_tokens": 16, "rule": "dynamic"},
     ("multistep", 8, 8, 16, "dynamic", True)),
    ({"mode": "multistep", "block_size": 8, "steps": 2, "max_new_tokens": 16}, ("multistep", 8, 2, 16, "dynamic-ltr", True)),
])
def test_decode_batch_calls_the_decoder_of_its_mode_with_the_specs_settings(monkeypatch, spec_kw, want):
    """Kills decode_batch's mutants: each mode reaches its decoder with the spec's block size, steps
    (multistep default = B; onestep-unfused = 1), rule and length; keep_trajectory is passed on."""
    import echo_train.decoding.run as run

    calls = []
    args = (object(), object(), object())  # model, tokenizer, pixels: passed on as they are

    def seen(*a):
        assert a[:3] == args
        return a[3:]

    monkeypatch.setattr(run, "ar_generate", lambda m, t, px, n: calls.append(("ar", *seen(m, t, px, n))) or "r")
    monkeypatch.setattr(run, "fused_onestep_generate",
                        lambda m, t, px, B, n: calls.append(("fused", *seen(m, t, px, B, n))) or "r")
    monkeypatch.setattr(run, "multistep_generate", lambda m, t, px, B, steps, n, rule, keep_trajectory=None:
                        calls.append(("multistep", *seen(m, t, px, B, steps, n, rule), keep_trajectory)) or "r")
    spec = run.DecodeSpec(**spec_kw)
    assert run.decode_batch(*args, spec, keep_trajectory=True) == "r"
    assert calls == [want]
    calls.clear()
    assert run.decode_batch(*args, spec) == "r"  # keep_trajectory defaults to False
    assert calls == [want[:-1] + (False,) if want[0] == "multistep" else want]


def test_decode_spec_refuses_an_unknown_mode():
    from echo_train.decoding.run import MODES, DecodeSpec

    with pytest.raises(ValueError, match="unknown decode mode 'fast'; choose from"):
        DecodeSpec(mode="fast")
    assert [DecodeSpec(mode=m).mode for m in MODES] == list(MODES)


# ---- echo_train/decoding/block_diffusion.py and common.py -------------------------------------

def test_denoise_step_applies_the_threshold_it_is_given():
    """Kills denoise_step mutant 28 (threshold dropped: the default 0.85 used instead). The
    decoders always pass the default, so no decoding test can tell."""
    import torch

    from echo_train.decoding.block_diffusion import denoise_step

    mask_id = 0
    logits = torch.full((1, 3, 5), -10.0)
    logits[0, 0, 1] = 10.0  # position 0: token 1, confidence ~1
    logits[0, 1, 2], logits[0, 1, 3] = 1.0, 0.0  # position 1: token 2 at confidence ~0.73
    logits[0, 2, 4] = 10.0
    x = torch.full((1, 3), mask_id)
    x[0, 2] = 9  # already committed: kept
    assert denoise_step(logits, x, mask_id, 1, "static", 0.5).tolist() == [[1, 0, 9]]
    assert denoise_step(logits, x, mask_id, 1, "dynamic", 0.5).tolist() == [[1, 2, 9]]
    assert denoise_step(logits, x, mask_id, 1, "dynamic", 0.85).tolist() == [[1, 0, 9]]


def test_kv_cache_length_counts_the_stored_tokens():
    """Kills KVCache.__len__'s mutants (no covering test read the length)."""
    import torch

    from echo_train.decoding.common import KVCache
    from echo_train.model.masks import causal_layout

    cache = KVCache()
    assert len(cache) == 0
    kv = [(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)) for _ in range(2)]
    cache.append(kv, causal_layout(5))
    assert len(cache) == 5
    cache.append(kv, causal_layout(5, start=5), keep=slice(1, 3))
    assert len(cache) == 7 and len(cache.layout) == 7


# ---- runtime/engine.py ----------------------------------------------------------------------

def test_generate_ar_streams_its_blocks_too(tmp_path_factory):
    """Kills EchoRuntime.generate_ar mutant 3 (on_block not passed on): the AR mode streams each
    pass's ids, and the events add up to the final report."""
    from runtime import EchoRuntime
    from test_runtime_graphs import GRAPH_BATCH, images, shared_engine

    eng = shared_engine(tmp_path_factory.mktemp("engines"))  # the session's engine folder (cached)
    rt = EchoRuntime(eng.path, batch_size=GRAPH_BATCH, threads=1)
    events = []
    reps = rt.generate_ar(list(images(2)), on_block=events.append)
    assert events
    for i, r in enumerate(reps):
        mine = [e for e in events if e.index == i]
        assert mine and sum((e.tokens for e in mine), []) == r.tokens
        assert mine[-1].text == r.text


def test_report_to_dict_holds_every_field():
    """Kills Report.to_dict mutant 1 (`asdict(None)`): no covering test serialised a Report."""
    from runtime.engine import Report

    r = Report(path="a.png", text="No effusion.", tokens=[5, 6], timings={"total": 0.5}, forward_passes=3, stop="eos")
    assert r.to_dict() == {"path": "a.png", "text": "No effusion.", "tokens": [5, 6], "timings": {"total": 0.5},
                           "forward_passes": 3, "error": None, "stop": "eos", "image_tokens": 0, "prompt_tokens": 0}


# ---- decoder loops (echo_train/decoding: multistep_generate, recompute_*_generate) -------------
# Survivors of the decoder-loop mutants: the pass count, the EOS cut of `.tokens` and the stop at
# max_new_tokens were never checked (the equivalence tests compare `.raw`, and the varied
# reports end at EOS well before the limit).


@pytest.mark.parametrize("max_new", [10, 48])  # 10: stops at the length limit mid-report; 48: at EOS
def test_decoders_count_their_passes_cut_at_eos_and_stop_at_the_limit(varied_model, varied_pixels,
                                                                      tiny_tokenizer, max_new):
    from echo_train.decoding import multistep_generate
    from echo_train.decoding.recompute import recompute_ar_generate, recompute_multistep_generate
    from varied_models import ForwardLog, as_stage

    tok = tiny_tokenizer
    eos = tok.eos_id
    px = varied_pixels[:2]
    model = as_stage(varied_model(True, True), "rad", block_size=4)
    ar = as_stage(model, "ar")
    runs = {
        "multistep": (model, lambda: multistep_generate(model, tok, px, 4, 2, max_new)),
        "recompute_multistep": (model, lambda: recompute_multistep_generate(model, tok, px, 4, 2, max_new)),
        "recompute_ar": (ar, lambda: recompute_ar_generate(ar, tok, px, max_new)),
    }
    for name, (m, run) in runs.items():
        with ForwardLog(m) as log:
            r = run()
        assert r.forward_passes == len(log.calls), (name, r.forward_passes, len(log.calls))  # every forward counted once
        raw = r.raw.tolist()
        # .tokens is .raw cut before the first EOS, row by row
        assert [list(t) for t in r.tokens] == [row[: row.index(eos)] if eos in row else row for row in raw], name
        if max_new == 10:  # no report ends within 10 tokens: each stops at the limit, in whole blocks
            assert all(eos not in row for row in raw), name
            assert r.raw.shape[1] == (10 if name == "recompute_ar" else 12), (name, r.raw.shape)
        else:
            assert all(len(t) < 48 for t in r.tokens), name  # ended at EOS
    r = multistep_generate(model, tok, px, 4, 2, 10)
    assert r.trajectories is None  # only recorded when asked
    assert multistep_generate(model, tok, px, 4, 2, 10, keep_trajectory=True).trajectories is not None


# ---- echo_train/decoding/run.py: decode_studies, which no covering test called ----------------

def test_decode_studies_reports_every_study_and_counts_its_passes_and_tokens(tmp_path, tiny_tokenizer, varied_model):
    """Kills decode_studies' mutants: 5 studies in batches of 2 (2, 2, 1) give each study the report
    its own batch decodes to, and the counts are per report (passes weighted by batch rows, EOS
    counted as a generated token where a report wrote it, 16 new tokens cutting the longer ones).
    Without its progress bar: tqdm's lock deadlocks in the forked workers of `make mutation`."""
    from PIL import Image

    from echo_train.data.study import Study
    from echo_train.decoding.run import DecodeSpec, decode_batch, decode_studies, load_pixels
    from varied_models import varied_images

    tok, model = tiny_tokenizer, varied_model()
    studies = []
    for i, img in enumerate(varied_images(5)):
        path = tmp_path / f"{i}.png"
        Image.fromarray(((img[0] + 1) * 127.5).round().astype(np.uint8), mode="L").save(path)
        studies.append(Study(id=f"s{i}", image_paths=[str(path)], findings="", impression=""))
    spec = DecodeSpec("onestep", 4, max_new_tokens=16)
    preds, stats = decode_studies(model, tok, studies, spec, batch_size=2, progress=False)

    want, passes, tokens, eos = {}, 0, 0, 0
    for chunk in (studies[0:2], studies[2:4], studies[4:5]):
        r = decode_batch(model, tok, load_pixels(chunk, 32), spec)
        passes += r.forward_passes * len(chunk)
        for s, ids, raw in zip(chunk, r.tokens, r.raw.tolist()):
            want[s.id] = tok.decode(ids)
            tokens += len(ids)
            eos += tok.eos_id in raw
    assert preds == want and len(set(want.values())) == 5
    assert 0 < eos < 5  # some reports end with EOS, some at the length limit
    assert stats["reports"] == 5
    assert stats["forward_passes_per_report"] == pytest.approx(passes / 5)
    assert stats["tokens_per_report"] == pytest.approx((tokens + eos) / 5)
    assert stats["tokens_per_forward"] == pytest.approx((tokens + eos) / passes)
    assert 0 < stats["seconds"] < 600  # wall seconds of this call, not a timestamp
