"""The one mask builder against brute-force definitions written independently."""
import itertools

import torch

from echo_train.model.masks import (
    CAUSAL,
    CLEAN,
    NOISY,
    block_layout,
    prediction_sources,
    build_attention_mask,
    causal_layout,
    rad_layout,
    symmetric_layout,
)


def brute_rad(P, R, B, K, causal_context=False):
    """Token list of (segment, index-in-segment); rules stated in words in ECHO-NOTES.
    causal_context: prefix and clean copy are stage 1's causal sequence instead of block-causal."""
    toks = [("prefix", i) for i in range(P)] + [("clean", i) for i in range(R)]
    for c in range(K):
        toks += [(f"noisy{c}", i) for i in range(R)]
    n = len(toks)
    m = torch.zeros(n, n, dtype=torch.bool)
    for a, b in itertools.product(range(n), range(n)):
        (sa, ia), (sb, ib) = toks[a], toks[b]
        if sa == "prefix":  # prefix never sees the response; block-causal (or causal) inside itself
            ok = sb == "prefix" and (ib <= ia if causal_context else ib // B <= ia // B)
        elif sa == "clean":  # whole prefix, clean response blocks up to its own (or tokens up to itself)
            ok = sb == "prefix" or (sb == "clean" and (ib <= ia if causal_context else ib // B <= ia // B))
        else:  # noisy: prefix, earlier clean blocks, its own block of its own copy
            ok = sb == "prefix" or (sb == "clean" and ib // B < ia // B) or (sb == sa and ib // B == ia // B)
        m[a, b] = ok
    return m


def test_causal_matches_tril():
    assert torch.equal(build_attention_mask(causal_layout(13)), torch.ones(13, 13, dtype=torch.bool).tril())


def test_block_causal_matches_expanded_tril():
    B, nb = 4, 5
    ref = torch.ones(nb, nb).tril().repeat_interleave(B, 0).repeat_interleave(B, 1).bool()
    assert torch.equal(build_attention_mask(block_layout(B * nb, B)), ref)


def test_rad_matches_brute_force():
    for P, R, B, K in [(8, 8, 4, 1), (16, 12, 4, 2), (8, 16, 8, 1), (16, 16, 16, 3)]:
        assert torch.equal(build_attention_mask(rad_layout(P, R, B, K)), brute_rad(P, R, B, K)), (P, R, B, K)


def test_rad_with_causal_context_matches_brute_force():
    for P, R, B, K in [(8, 8, 4, 1), (16, 12, 4, 2), (16, 16, 16, 2)]:
        got = build_attention_mask(rad_layout(P, R, B, K, context=CAUSAL))
        assert torch.equal(got, brute_rad(P, R, B, K, causal_context=True)), (P, R, B, K)
    # the clean part is exactly stage 1's causal mask
    P, R = 8, 8
    assert torch.equal(build_attention_mask(rad_layout(P, R, 4, 1, context=CAUSAL))[: P + R, : P + R],
                       build_attention_mask(causal_layout(P + R)))


def test_symmetric_matches_bd3_definition():
    P, R, B = 8, 8, 4
    n = P + R
    m = build_attention_mask(symmetric_layout(P, R, B))
    for a, b in itertools.product(range(2 * n), range(2 * n)):
        qa_noisy, kb_noisy = a < n, b < n
        ba, bb = (a % n) // B, (b % n) // B
        if qa_noisy:
            want = (kb_noisy and ba == bb) or (not kb_noisy and bb < ba)
        else:
            want = (not kb_noisy) and bb <= ba
        assert bool(m[a, b]) == want, (a, b)


def test_rad_costs_fewer_tokens_than_symmetric():
    P, R, B = 64, 32, 8
    assert len(rad_layout(P, R, B, 1)) == P + 2 * R
    assert len(symmetric_layout(P, R, B)) == 2 * (P + R)


def brute_sources(layout):
    """For each noisy token: same-copy token one position earlier in its block, else the clean
    token one position earlier; otherwise itself."""
    n = len(layout)
    toks = [(int(layout.kind[i]), int(layout.copy[i]), int(layout.block[i]), int(layout.position[i])) for i in range(n)]
    out = []
    for i, (kind, copy, block, pos) in enumerate(toks):
        src = i
        if kind == NOISY:
            same = [j for j, t in enumerate(toks) if t[0] == NOISY and t[1] == copy and t[2] == block and t[3] == pos - 1]
            clean = [j for j, t in enumerate(toks) if t[0] in (CLEAN, CAUSAL) and t[3] == pos - 1]
            src = same[0] if same else (clean[0] if clean else i)
        out.append(src)
    return torch.tensor(out)


def test_prediction_sources_match_brute_force():
    for layout in (rad_layout(8, 12, 4, 2), symmetric_layout(8, 8, 4), rad_layout(16, 16, 8, 1),
                   rad_layout(8, 12, 4, 2, context=CAUSAL)):
        assert torch.equal(prediction_sources(layout), brute_sources(layout))
    src = prediction_sources(rad_layout(8, 8, 4, 1))
    assert src[16].item() == 7 and src[17].item() == 16 and src[20].item() == 11  # block starts read the clean token before
