"""Tiny ECHO models whose outputs VARY: with the image, the position and the previous tokens.

Random tiny models write one token over and over, so a decoder that ignores its cache or
shifts its positions still "matches" the reference. These models are trained for a few
hundred steps with the project's own loss builders (echo_train/stages/batches.py: RAD noisy
copies, plus stage 1's next-token loss on a causal clean copy) to write one distinct report
per image (`varied_report_ids`: shared motifs in different orders, different lengths). So the next token
depends on the image (reports differ), on the previous tokens (the same sentence continues
differently in different reports) and on the position.

Trained once per test session (conftest's session fixtures); about 10 s CPU for all four conventions.
`assert_informative` is what every equivalence test checks before it checks equality.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch

from runtime.text import ReportTokenizer

# Reports as token ids: motifs of the tiny tokenizer's ordinary ids, recombined so that the same
# motif is followed by different ones in different reports (the next token depends on the
# previous tokens, not only on the last one). Token ids, not text: the tiny BPE tokenizer
# (vocab 300) spends ~80 ids on one sample sentence set, too long for 48-token reports.
_MOTIFS = [
    [40, 41, 42, 43, 44],
    [50, 51, 52, 53],
    [60, 61, 62, 63, 64, 65],
    [70, 71, 72],
    [80, 81, 82, 83, 84],
    [90, 91, 92, 93],
    [100, 101, 102],
]
_PLAN = [  # report i of image i: motif numbers, different orders and lengths (7 to 30 ids + EOS)
    [0, 1, 2],
    [3, 1, 4, 6],
    [2, 5],
    [6, 0, 3, 1, 4, 2],
    [4],
    [5, 3, 0, 6, 1],
]
N_IMAGES = len(_PLAN)
MAX_RESPONSE = 48  # every report fits (with its EOS); decoders are run up to this length


def varied_report_ids(tok: ReportTokenizer) -> list[list[int]]:
    """Report ids of image i (without EOS); offset so no special id is ever a report token."""
    special = {tok.pad_id, tok.eos_id, tok.mask_id, tok.image_id, tok.bos_id}
    base = max(special) + 1
    out = [[base + t for m in plan for t in _MOTIFS[m]] for plan in _PLAN]
    assert all(t < tok.vocab_size for r in out for t in r)
    return out
TRAIN_BLOCK_SIZES = (4, 8, 16)  # the RAD loss cycles through them, so every decode B is in-distribution


def varied_images(n: int = N_IMAGES, size: int = 32, seed: int = 0) -> np.ndarray:
    """[n, 1, S, S] float32 in [-1, 1]: distinct structured patterns (noise all looks alike to a
    1-layer ViT), image i the input whose report is varied_report_ids()[i % N_IMAGES]."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        fx, fy = 1 + 2.3 * i, 3 - 0.45 * i
        img = np.sin(xx * fx * np.pi + i) * np.cos(yy * fy * np.pi) + 0.3 * (i % 3 - 1)
        out.append(img + rng.normal(0, 0.05, img.shape))
    return np.clip(np.stack(out), -1, 1)[:, None].astype(np.float32)


def training_batch(tok: ReportTokenizer, n_image_tokens: int, size: int = 32) -> dict:
    """The whole training set as one batch, collated by the real collate (EOS padding, mask)."""
    from echo_train.data.dataset import collate_reports
    from runtime.prompt import PREFIX_ALIGN

    px = torch.from_numpy(varied_images(N_IMAGES, size))
    prefix = torch.tensor(tok.prefix_ids(n_image_tokens))
    items = []
    for i, report in enumerate(varied_report_ids(tok)):
        ids = report + [tok.eos_id]
        assert len(ids) <= MAX_RESPONSE
        items.append({"pixel_values": px[i], "prefix_ids": prefix, "response_ids": torch.tensor(ids), "id": str(i)})
    return collate_reports(items, pad_to_multiple=PREFIX_ALIGN, eos_id=tok.eos_id)


def train_varied(tok: ReportTokenizer, *, shifted: bool = True, causal_context: bool = False, steps: int = 300,
                 seed: int = 0, lr: float = 3e-3, ar_weight: float = 1.0, init=None):
    """A `rad` model trained on (varied_images, varied_report_ids) with the project's RAD loss.

    causal_context=True also trains stage 1's next-token loss on the clean copy (ar_weight), so
    the same weights are a good AR model (`as_stage(model, "ar")`). `init`: start from these
    weights (an aligned model fine-tuned from a shifted one learns in a third of the steps).
    """
    from conftest import make_tiny_model
    from echo_train.stages.batches import build_rad_inputs, scored_cross_entropy

    model = make_tiny_model(tok, stage="rad", block_size=8, seed=seed, shifted=shifted, causal_context=causal_context)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.cfg.max_response_tokens = MAX_RESPONSE
    batch = training_batch(tok, model.n_image_tokens, model.cfg.vision.image_size)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and leaves the other core free
    try:
        model.train()
        for step in range(steps):
            B = TRAIN_BLOCK_SIZES[step % len(TRAIN_BLOCK_SIZES)]
            inp = build_rad_inputs(model, batch, B, tok.mask_id, gen, n_noisy=2, ar_weight=ar_weight)
            loss = scored_cross_entropy(model, inp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.final_loss = float(loss.detach())  # type: ignore[attr-defined]  # for the fixture's sanity check
    return model


def as_stage(model, stage: str, block_size: int | None = None):
    """The same weights under another stage / block size (a deep copy: fixtures are shared)."""
    m = copy.deepcopy(model)
    m.cfg.stage = stage
    if block_size is not None:
        m.cfg.block_size = block_size
    return m


def assert_informative(raw: torch.Tensor | np.ndarray | Sequence[Sequence[int]], eos_id: int, min_distinct: int = 4,
                       min_reports: int | None = None) -> None:
    """The fixture can tell a right decoder from a wrong one: every report (up to EOS) holds at
    least `min_distinct` different tokens, and the reports of different images differ
    (`min_reports` distinct reports; default: all of them)."""
    rows = [list(map(int, r)) for r in (raw.tolist() if hasattr(raw, "tolist") else raw)]
    cut = [r[: r.index(eos_id)] if eos_id in r else r for r in rows]
    distinct = [len(set(r)) for r in cut]
    assert min(distinct) >= min_distinct, f"uninformative fixture: distinct tokens per report {distinct}"
    need = len(cut) if min_reports is None else min_reports
    n_reports = len({tuple(r) for r in cut})
    assert n_reports >= need, f"uninformative fixture: {n_reports} distinct reports of {len(cut)}, need {need}"


# ---- one trained model per decode convention, trained once per test session --------------
# The base (shifted, causal context: also a good AR model) trains from scratch: 120 steps reach
# a loss ~0.1 and reproduce all 6 reports. Each other convention is fine-tuned from it: 60 steps
# (loss ~0.015, all 6 reports; an aligned model from scratch needs ~300). About 10 s CPU in all.
BASE_STEPS, FINETUNE_STEPS = 120, 60
_TRAINED: dict[tuple, object] = {}


def get_varied(tok: ReportTokenizer, shifted: bool = True, causal_context: bool = False):
    """The session's trained model of this convention (shared: copy it before changing it).
    Raises when training did not converge, so that a bad fixture fails loudly, not quietly."""
    vocab = hash(tok.tok.to_str())  # the same tokenizer, even if another instance
    key = (shifted, causal_context, vocab)
    if key not in _TRAINED:
        if (shifted, causal_context) == (True, True):
            m = train_varied(tok, shifted=True, causal_context=True, steps=BASE_STEPS)
        else:
            base = get_varied(tok, True, True)
            m = train_varied(tok, shifted=shifted, causal_context=causal_context, steps=FINETUNE_STEPS, init=base)
        assert m.final_loss < 0.5, f"varied fixture did not train (loss {m.final_loss:.3f})"
        _TRAINED[key] = m
    return _TRAINED[key]


# ---- tensor-level capture: what each forward pass of a decoder computed -------------------
# Measured: cached vs recompute AR logits differ by ~2e-6 (a fused and a multistep case tried were
# bitwise equal); a +3 position shift moves keys by ~6.
ATOL = 1e-4


class ForwardLog:
    """Records every EchoModel.forward while active: position ids, the past K/V it read,
    its logits and the K/V of its own tokens. Instrumentation of the real model, not a stand-in."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[dict] = []

    def __enter__(self) -> "ForwardLog":
        self._h = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._h.remove()

    def _hook(self, module, args, kwargs, out) -> None:
        names = ("inputs_embeds", "position_ids", "mask", "past")
        a = dict(zip(names, args), **kwargs)
        logits, kv = out
        # cache tensors are never written in place (KVCache.append concatenates): references suffice
        self.calls.append({"position_ids": a["position_ids"], "past": a.get("past"), "logits": logits, "kv": kv})


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_kv_close(got, want, what: str, atol: float = ATOL) -> None:
    """Per layer (k, v) lists of equal token span."""
    assert len(got) == len(want)
    for i, ((gk, gv), (wk, wv)) in enumerate(zip(got, want)):
        assert_close(gk, wk, f"{what} layer {i} keys", atol)
        assert_close(gv, wv, f"{what} layer {i} values", atol)


def kv_slice(kv, sl: slice):
    return [(k[:, :, sl], v[:, :, sl]) for k, v in kv]


def kv_cat(parts):
    return [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2)) for i in range(len(parts[0]))]
