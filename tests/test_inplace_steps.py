"""echo_export/inplace_steps.py: the AR and one-step passes in onnxruntime's CPU form, one GroupQueryAttention per
layer over caches written in place. Its engine-level checks (verified identical to the PyTorch
reference, the runtime's choice on the CPU, pass by pass against ar_generate) are in test_export.py
and test_runtime_engine.py; here: the module's eager arithmetic, and the ONNX graph's semantics at
a batch whose caches differ per row and per layer, against the standard ar_step graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tokenizer

CAP = 40


@pytest.fixture(scope="module")
def ar_model():
    from varied_models import as_stage, get_varied

    tok = make_tokenizer()
    return as_stage(get_varied(tok, shifted=True, causal_context=True), "ar").eval(), tok


def _caches(cfg, batch: int, past: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stacked caches [L,b,kvH,CAP,dh]: random KV in the first `past` slots, zeros after."""
    lm = cfg.lm
    rng = np.random.default_rng(seed)
    shape = (lm.num_hidden_layers, batch, lm.num_key_value_heads, CAP, lm.head_dim)
    kc, vc = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    kc[:, :, :, :past] = rng.standard_normal(kc[:, :, :, :past].shape)
    vc[:, :, :, :past] = rng.standard_normal(vc[:, :, :, :past].shape)
    return kc, vc


def _standard_and_inplace(model, tok, role: str, batch: int, folder):
    """Runners (decode_loop) of the exported standard step `role` and of its in-place form, the same IO."""
    from echo_export.decode_loop import inplace_runner, ort_runner
    from echo_export.graphs import example_inputs, export_graph, make_graph
    from runtime import graph_io as gio

    inplace = next(r for r, std in gio.CPU_ONLY_ROLES.items() if std == role)
    for r in (role, inplace):
        export_graph(make_graph(r, model, CAP, 0, tok.mask_id), example_inputs(r, model.cfg, batch, CAP, 0),
                     folder / f"{r}.onnx")
    return ort_runner(folder / f"{role}.onnx", 1), inplace_runner(folder / f"{inplace}.onnx", CAP, 1)


def test_eager_module_equals_the_standard_step(ar_model):
    """In PyTorch, the in-place module's tokens and the KV it writes at past_len are ArStepGraph's."""
    from echo_export.graphs import ArStepGraph
    from echo_export.inplace_steps import ArStepInPlaceGraph

    model, tok = ar_model
    std, inp = ArStepGraph(model, CAP, tok.mask_id).eval(), ArStepInPlaceGraph(model, tok.mask_id, CAP).eval()
    kc, vc = _caches(model.cfg, 2, 17)
    ids = torch.tensor([[5], [9]])
    pos, past = torch.tensor([[17], [17]]), torch.tensor([17, 17])
    with torch.no_grad():
        t_std, pk, pv = std(ids, pos, torch.from_numpy(kc), torch.from_numpy(vc), past)
        L = kc.shape[0]
        spare = lambda c: torch.from_numpy(np.concatenate([c, np.zeros_like(c[:, :, :, :1])], 3))  # noqa: E731
        out = inp(ids, pos, past, *spare(kc).unbind(0), *spare(vc).unbind(0))
    assert torch.equal(out[0], t_std)
    new_k = torch.stack([k[:, :, 17] for k in out[1 : 1 + L]])
    assert torch.allclose(new_k, pk[:, :, :, 0], atol=1e-5)
    assert torch.allclose(torch.stack(out[1 : 1 + L])[:, :, :, :17], torch.from_numpy(kc[:, :, :, :17]))


def test_onnx_graph_equals_the_standard_graph_on_real_caches(ar_model, tmp_path):
    """onnxruntime: the exported in-place step (GroupQueryAttention, shared buffers) against the
    exported ar_step, batch 2, rows with different caches, over 6 steps that feed each step's token
    to the next: the same tokens, the KV of each step where ar_step says, slots before it untouched."""
    from runtime import graph_io as gio

    model, tok = ar_model
    std, inp = _standard_and_inplace(model, tok, gio.AR_STEP, 2, tmp_path)
    kc, vc = _caches(model.cfg, 2, 11, seed=3)
    ids = np.array([[5], [9]], np.int64)
    written = []
    for step in range(6):
        past = 11 + step
        feeds = {"input_ids": ids, "position_ids": np.full((2, 1), past, np.int64), "past_key": kc, "past_value": vc,
                 "past_len": np.full((2,), past, np.int64)}
        t_std, pk_std, pv_std = std(feeds)
        t_inp, pk_inp, pv_inp = inp(feeds)
        assert np.array_equal(t_std, t_inp), step
        assert np.abs(pk_std - pk_inp).max() < 1e-5 and np.abs(pv_std - pv_inp).max() < 1e-5
        kc[:, :, :, past : past + 1], vc[:, :, :, past : past + 1] = pk_std, pv_std
        written.append(t_std[:, 0].tolist())
        ids = t_std.astype(np.int64)
    assert len({tuple(w) for w in written}) > 2 and any(a != b for a, b in written)  # tokens move, rows differ
    with pytest.raises(ValueError, match="one past_len"):
        inp({**feeds, "past_len": np.array([11, 12], np.int64)})


def _mrope(model, on: bool):
    """The model's copy with Qwen2.5-VL's MRoPE of a fixed 2x3 image grid at index 1 (token indices
    in, angles per frequency section out: the table form must carry them), or as it is."""
    if not on:
        return model
    import copy

    m = copy.deepcopy(model)
    half = m.cfg.lm.head_dim // 2
    m.cfg.lm.mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    m.cfg.lm.mrope_image_grid, m.cfg.lm.mrope_image_start = [2, 3], 1
    return m


@pytest.fixture(scope="module")
def student():
    from varied_models import get_varied

    tok = make_tokenizer()
    return get_varied(tok, shifted=True, causal_context=False).eval(), tok


def test_eager_block_module_equals_the_standard_block_step(student):
    """In PyTorch, block_step_inplace's tokens, confidence and the previous block's KV it writes at
    past_len are BlockStepGraph's, at positions shifted from the slots (a native image's rope delta)."""
    from echo_export.graphs import BlockStepGraph
    from echo_export.inplace_steps import BlockStepInPlaceGraph

    model, tok = student
    B = model.cfg.block_size
    std, inp = BlockStepGraph(model, CAP, tok.mask_id).eval(), BlockStepInPlaceGraph(model, tok.mask_id, CAP).eval()
    kc, vc = _caches(model.cfg, 1, 17)
    ids = torch.from_numpy(np.random.default_rng(1).integers(5, 60, (1, 2 * B)))
    pos, past = torch.arange(14, 14 + 2 * B)[None], torch.tensor([17])
    spare = lambda c: torch.from_numpy(np.concatenate([c, np.zeros_like(c[:, :, :, : 2 * B])], 3))  # noqa: E731
    with torch.no_grad():
        t_std, c_std, pk, _ = std(ids, pos, torch.from_numpy(kc), torch.from_numpy(vc), past)
        out = inp(ids, pos, past, *spare(kc).unbind(0), *spare(vc).unbind(0))
    L = kc.shape[0]
    assert torch.equal(out[0], t_std) and torch.allclose(out[1], c_std, atol=1e-5)
    new_k = torch.stack([k[:, :, 17 : 17 + B] for k in out[2 : 2 + L]])
    assert torch.allclose(new_k, pk, atol=1e-5)


@pytest.mark.parametrize("mrope", [False, True], ids=["rope-delta", "mrope-grid"])
def test_onnx_block_graph_equals_the_standard_graph(student, tmp_path, mrope):
    """onnxruntime: the exported block_step_inplace (GroupQueryAttention not causal, the block mask
    as a bias over the cache's slots, rotary by table) against the exported block_step over 3
    passes that feed each pass's block to the next as the previous block: the same tokens and
    confidence, the previous block's KV where block_step says. Positions run 3 below the slots."""
    from runtime import graph_io as gio

    base, tok = student
    model = _mrope(base, mrope)
    B = model.cfg.block_size
    std, inp = _standard_and_inplace(model, tok, gio.BLOCK_STEP, 1, tmp_path)
    kc, vc = _caches(model.cfg, 1, 11, seed=5)
    ids = np.concatenate([np.random.default_rng(2).integers(5, 60, (1, B)), np.full((1, B), tok.mask_id)], 1)
    written = []
    for step in range(3):
        past = 11 + step * B
        feeds = {"input_ids": ids.astype(np.int64), "position_ids": np.arange(past - 3, past - 3 + 2 * B)[None],
                 "past_key": kc, "past_value": vc, "past_len": np.array([past], np.int64)}
        t_std, c_std, pk_std, pv_std = std(feeds)
        t_inp, c_inp, pk_inp, pv_inp = inp(feeds)
        assert np.array_equal(t_std, t_inp), step
        assert np.abs(c_std - c_inp).max() < 1e-5
        assert np.abs(pk_std - pk_inp).max() < 1e-5 and np.abs(pv_std - pv_inp).max() < 1e-5
        kc[:, :, :, past : past + B], vc[:, :, :, past : past + B] = pk_std, pv_std
        written.append(t_std[0].tolist())
        ids = np.concatenate([t_std, np.full((1, B), tok.mask_id)], 1)
    assert len({t for w in written for t in w}) > 4  # the passes write varied tokens


def test_block_graph_is_built_at_batch_1_only(student):
    """onnxruntime's GroupQueryAttention takes several new tokens over a past for one row at a time
    ("batch_size must be 1 when sequence_length > 1 and past context is given"): the build makes
    block_step_inplace at batch 1 only; larger batches keep block_step."""
    from echo_export.build import _Family
    from runtime import graph_io as gio
    from runtime.decode_mode import FUSED

    from varied_models import as_stage

    cfg = as_stage(student[0], "dcd").cfg  # (a teacher keeps block_step: its passes share the stacked cache)
    assert _Family(FUSED, student[0].cfg, 8, 16, inplace=True).graphs([1]) == \
        [(r, 1) for r in (gio.VISION_PREFILL, gio.BLOCK_STEP, *gio.MULTISTEP_ROLES)]
    fam = _Family(FUSED, cfg, 8, 16, inplace=True)
    assert (gio.BLOCK_STEP_INPLACE, 1) in fam.graphs([1, 4]) and (gio.BLOCK_STEP_INPLACE, 4) not in fam.graphs([1, 4])
    assert (gio.BLOCK_STEP, 4) in fam.graphs([1, 4])
