"""The shared unmasking rules (runtime/schedule.py), checked on hand-made confidences."""
import numpy as np
import pytest

from runtime.schedule import UNMASK_RULES, select_unmask, transfer_schedule

CONF = np.array([[0.30, 0.20, 0.95, 0.40, 0.90, 0.10, 0.50, 0.60]])


def _accepted(rule, still=None, min_count=1, threshold=0.85):
    still = np.ones_like(CONF, dtype=bool) if still is None else still
    return np.flatnonzero(select_unmask(CONF, still, min_count, rule, threshold)[0]).tolist()


def test_dynamic_takes_the_most_confident_and_everything_above_threshold():
    assert _accepted("dynamic") == [2, 4]
    assert _accepted("dynamic", min_count=3) == [2, 4, 7]


def test_dynamic_ltr_takes_the_leftmost_and_everything_above_threshold():
    assert _accepted("dynamic-ltr") == [0, 2, 4]
    assert _accepted("dynamic-ltr", min_count=2) == [0, 1, 2, 4]
    still = np.array([[False, False, True, True, False, True, True, True]])
    # leftmost still-masked positions, never an already-accepted one
    assert _accepted("dynamic-ltr", still=still, min_count=2) == [2, 3]
    assert _accepted("dynamic-ltr", still=still, min_count=2, threshold=0.55) == [2, 3, 7]


def test_static_takes_exactly_the_scheduled_count():
    assert _accepted("static", min_count=2) == [2, 4]
    assert _accepted("static", min_count=1, threshold=0.0) == [2]


@pytest.mark.parametrize("rule", UNMASK_RULES)
def test_every_rule_finishes_a_block_in_its_scheduled_steps(rule):
    rng = np.random.default_rng(0)
    for B, steps in [(8, 8), (8, 3), (16, 5), (4, 1)]:
        still = np.ones((3, B), dtype=bool)
        for n in transfer_schedule(B, steps):
            accept = select_unmask(rng.random((3, B)), still, n, rule)
            assert not (accept & ~still).any()
            assert (accept.sum(-1) >= np.minimum(n, still.sum(-1))).all()
            still &= ~accept
        assert not still.any(), (rule, B, steps)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown unmask rule"):
        select_unmask(CONF, np.ones_like(CONF, dtype=bool), 1, "random")


def test_cut_at_eos_keeps_the_ids_before_the_first_eos_of_each_row():
    from runtime.schedule import cut_at_eos, cut_rows_at_eos

    eos = 2
    rows = np.array([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 6, 7, 8, 9]])
    assert cut_rows_at_eos(rows, eos) == [[5, 6], [], [5, 6, 7, 8, 9]]
    assert cut_at_eos(np.array([9, 2, 9]), eos) == [9] and cut_at_eos([], eos) == []
    assert all(type(i) is int for i in cut_at_eos(np.array([4, 5]), eos))


def test_holds_eos_is_per_row():
    from runtime.schedule import holds_eos

    rows = np.array([[5, 6, 2, 7], [5, 5, 5, 5], [2, 2, 2, 2]])
    assert holds_eos(rows, 2).tolist() == [True, False, True]


def test_fused_block_slice_reads_the_current_block():
    from runtime.schedule import fused_block_slice

    pass_positions = np.arange(8)  # [previous block 0..3, current block 4..7], B = 4
    assert pass_positions[fused_block_slice(4, shifted=False)].tolist() == [4, 5, 6, 7]
    assert pass_positions[fused_block_slice(4, shifted=True)].tolist() == [3, 4, 5, 6]  # token j from j-1


def test_block_layout_keeps_the_prompt_tail_in_block_zero():
    """The official grid: from the first prompt token; the prompt's P mod B tail opens block 0; the
    canvas is P + max_new rounded up to whole blocks."""
    import numpy as np
    import pytest

    from runtime.schedule import BlockLayout, cut_at_eos

    g = BlockLayout(13, 4)
    assert (g.aligned_len, g.tail, g.fused_prefill_len) == (12, 1, 8)
    assert g.block_positions(0).tolist() == [12, 13, 14, 15] and g.block_positions(-1).tolist() == [8, 9, 10, 11]
    assert g.num_blocks(3) == 1 and g.num_blocks(4) == 2 and g.num_blocks(7) == 2 and g.num_blocks(8) == 3
    assert np.array_equal(g.fused_positions(0), np.arange(8, 16))
    assert BlockLayout(16, 4).tail == 0 and BlockLayout(16, 4).num_blocks(8) == 2
    with pytest.raises(ValueError):
        BlockLayout(3, 4)
    assert cut_at_eos([5, 7, 9, 2, 7], eos_id=2, mask_id=9) == [5, 7]  # EOS first, then the mask
    assert cut_at_eos([5, 9, 2], eos_id=2) == [5, 9]
