"""echo_export/inplace_ar_step.py: the AR step in onnxruntime's CPU form, one GroupQueryAttention per
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


def test_eager_module_equals_the_standard_step(ar_model):
    """In PyTorch, the in-place module's tokens and the KV it writes at past_len are ArStepGraph's."""
    from echo_export.graphs import ArStepGraph
    from echo_export.inplace_ar_step import ArStepInPlaceGraph

    model, tok = ar_model
    std, inp = ArStepGraph(model, CAP, tok.mask_id).eval(), ArStepInPlaceGraph(model, tok.mask_id).eval()
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
    from echo_export.decode_loop import inplace_runner, ort_runner
    from echo_export.graphs import example_inputs, export_graph, make_graph
    from runtime import graph_io as gio

    model, tok = ar_model
    paths = {}
    for role in (gio.AR_STEP, gio.AR_STEP_INPLACE):
        paths[role] = tmp_path / f"{role}.onnx"
        export_graph(make_graph(role, model, CAP, 0, tok.mask_id), example_inputs(role, model.cfg, 2, CAP, 0), paths[role])
    std, inp = ort_runner(paths[gio.AR_STEP], 1), inplace_runner(paths[gio.AR_STEP_INPLACE], CAP, 1)
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
