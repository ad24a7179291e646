"""The decode-mode description (runtime/decode_mode.py) and the export's decode loop over it
(echo_export/decode_loop.decode), on scripted graphs: each pass checks that the cache holds every
earlier position's KV in its own slot, and answers with ids made from its positions, so the loop's
feeds, cache writes, kept prompt tail and EOS stop are all visible in the result."""
import numpy as np
import pytest

from echo_export.decode_loop import LoopSettings, decode
from runtime.decode_mode import AR, FUSED, DecodeMode
from runtime.schedule import BlockLayout

L, KVH, DH, OFFSET = 2, 1, 3, 100  # a pass's new id at position p is OFFSET + p


def test_fused_mode_of_a_prompt_with_a_tail():
    m = DecodeMode.of(FUSED, 22, 4)  # whole blocks end at 20: the tail is 2 ids
    grid = BlockLayout(22, 4)
    assert (m.prefill, m.step, m.cached, m.feed, m.width, m.tail, m.prefill_ids) == (
        "vision_prefill", "block_step", 16, 8, 4, 2, 0)
    assert m.positions(0).tolist() == list(range(16, 24))
    assert all((m.positions(k) == grid.fused_positions(k)).all() for k in range(5))
    assert m.passes(10) == grid.num_blocks(10) == 3
    assert m.slots_needed(10) == 16 + 2 * 4  # the last block's KV is never stored


def test_ar_mode():
    m = DecodeMode.of(AR, 22, 4)
    assert (m.prefill, m.step, m.cached, m.feed, m.width, m.tail, m.prefill_ids) == ("ar_prefill", "ar_step", 22, 1,
                                                                                      1, 0, 1)
    assert m.positions(3).tolist() == [25]
    assert m.passes(10) == 9 and m.slots_needed(10) == 22 + 9
    with pytest.raises(ValueError, match="unknown decode mode"):
        DecodeMode.of("multistep", 22, 4)


def _kv(positions: np.ndarray, b: int) -> np.ndarray:
    """KV whose every value is the position it was computed at: [L, b, kvH, n, dh]."""
    return np.broadcast_to(positions.astype(np.float32)[None, None, None, :, None], (L, b, KVH, len(positions), DH)).copy()


def _scripted(mode: DecodeMode, b: int, seen: list):
    def prefill(feeds):
        kv = _kv(np.arange(mode.cached), b)
        out = {"present_key": kv, "present_value": kv, "tokens": np.full((b, 1), OFFSET + mode.prefix_len)}
        return [out[k] for k in mode.prefill_outputs]

    def step(feeds):
        past, pos = int(feeds["past_len"][0]), feeds["position_ids"]
        assert (feeds["past_key"][:, :, :, :past] == np.arange(past)[None, None, None, :, None]).all()
        seen.append(feeds["input_ids"].copy())
        new = pos[:, mode.feed - mode.width :] + OFFSET if mode.name == FUSED else pos + OFFSET + 1
        out = {"tokens": new, "confidence": np.ones(new.shape, np.float32),
               "present_key": _kv(pos[0, : mode.width], b), "present_value": _kv(pos[0, : mode.width], b)}
        return [out[k] for k in mode.step_outputs]

    return prefill, step


@pytest.mark.parametrize("name", [FUSED, AR])
def test_the_loop_feeds_stores_and_stops_as_the_mode_says(name):
    P, B, b, mask = 22, 4, 2, 7
    mode = DecodeMode.of(name, P, B)
    prompt = np.tile(np.arange(1, P + 1), (b, 1))
    eos = OFFSET + P + 9  # the id at canvas position P + 9: the report's 10th token
    seen: list = []
    r = decode(mode, *_scripted(mode, b, seen), prompt, {}, LoopSettings(64, L, KVH, DH, mask, eos, max_new_tokens=30))
    want = list(range(OFFSET + P, OFFSET + P + 9))  # every generated id, each at its own position, cut at EOS
    assert r.tokens == [want, want]
    if name == FUSED:
        assert seen[0][0].tolist() == list(range(17, 21)) + [21, 22, mask, mask]  # last block, then tail + masks
        assert seen[1][0, :4].tolist() == [21, 22, OFFSET + 22, OFFSET + 23]  # the tail kept, whatever was read
        assert r.passes == 1 + 3 and r.raw.shape == (b, 3 * B - mode.tail)  # stops after the block holding EOS
    else:
        assert [s[0, 0] for s in seen[:2]] == [OFFSET + P, OFFSET + P + 1]  # each pass feeds the last token
        assert r.passes == 10 and r.raw.shape == (b, 10)
    with pytest.raises(ValueError, match="cache capacity"):
        decode(mode, *_scripted(mode, b, []), prompt, {}, LoopSettings(mode.slots_needed(30) - 1, L, KVH, DH, mask,
                                                                           eos, max_new_tokens=30))
