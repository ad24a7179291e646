"""The real engine folder the runtime tests share, built by `echo_export.build` (no mocks).

A tiny random ECHO model (tests/conftest.py) is saved as a checkpoint and exported with
the project's own exporter: block graphs from a `dcd` checkpoint, AR graphs from an `ar`
checkpoint with the same weights, fp32 + fp16, one batch size (2) to keep export time
down. batch_size=1 runs on the b2 graphs, padded. Built once per test session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

BLOCK = 4
CAPACITY = 96
MAX_NEW = 24
GRAPH_BATCH = 2
MODEL_SEED = 5  # with the images below this random model writes 6 different reports


class EngineFixture:
    def __init__(self, path: Path, model, tokenizer) -> None:
        self.path, self.model, self.tokenizer = path, model, tokenizer


_BUILT: dict[str, EngineFixture] = {}


def make_eos_model(tok):
    """Tiny random dcd model whose reports end at different blocks for different images.

    A random model never says EOS. Make EOS win wherever some frequent token t would (EOS's
    embedding row = 1.02 x t's; tied head, so a clear logit margin, no near-ties), choosing
    the t that gives the most varied report lengths on `images(6)`. Token ids of the BPE
    tokenizer may differ between runs, hence the search instead of a fixed id.
    """
    import collections

    import torch

    from conftest import make_tiny_model
    from echo_train.decoding import fused_onestep_generate

    px = torch.from_numpy(images(6))

    def model_with(t):
        m = make_tiny_model(tok, stage="dcd", block_size=BLOCK, seed=MODEL_SEED, causal_context=True)
        m.cfg.max_response_tokens = MAX_NEW
        if t is not None:
            with torch.no_grad():
                emb = m.lm.model.embed_tokens.weight
                emb[tok.eos_id] = emb[t] * 1.02
        return m

    base = fused_onestep_generate(model_with(None), tok, px, BLOCK, MAX_NEW)
    best, best_score = None, -1
    for t, _ in collections.Counter(sum(base.tokens, [])).most_common(8):
        lens = [len(x) for x in fused_onestep_generate(model_with(t), tok, px, BLOCK, MAX_NEW).tokens]
        # the tests need a report that runs to max_new_tokens AND reports that end at different blocks
        score = 10 * (MAX_NEW in lens) + 10 * any(0 < n < MAX_NEW for n in lens) + len(set(lens))
        if score > best_score:
            best, best_score = t, score
    return model_with(best)


def shared_engine(root: Path) -> EngineFixture:
    """One engine folder per test session (several test modules use it)."""
    if "engine" not in _BUILT:
        from conftest import make_tokenizer
        from echo_export.build import BuildOptions, build
        from echo_train.model.checkpoint import save_checkpoint

        root = Path(root)
        tok = make_tokenizer()
        model = make_eos_model(tok)
        save_checkpoint(root / "ckpt", model, tok)
        model.cfg.stage = "ar"
        save_checkpoint(root / "ar", model, tok)
        model.cfg.stage = "dcd"
        out = build(BuildOptions(ckpt=root / "ckpt", out=root / "echo", precisions=["fp32", "fp16"],
                                 ar_ckpt=root / "ar", batch_sizes=[GRAPH_BATCH], capacity=CAPACITY, verify_n=0),
                    log=lambda s: None)
        _BUILT["engine"] = EngineFixture(out, model, tok)
    return _BUILT["engine"]


@pytest.fixture(scope="session")
def runtime_engine(tmp_path_factory) -> EngineFixture:
    return shared_engine(tmp_path_factory.mktemp("engines"))


VARIED_BLOCK = 4  # more passes per report than the trained B=8: more cache traffic to compare
VARIED_CAPACITY = 128  # prefix (64) + the longest report (27 ids) + a block of slack


def _build_varied(key: str, root: Path, stage: str, shifted_causal: tuple[bool, bool], ar: bool) -> EngineFixture:
    """A trained varied model (tests/varied_models.py) as `stage` at block VARIED_BLOCK, saved and built
    (fp32, graphs at batch GRAPH_BATCH; with `ar`, the AR graphs of the same weights), once per process."""
    if key not in _BUILT:
        from conftest import make_tokenizer
        from echo_export.build import BuildOptions, build
        from echo_train.model.checkpoint import save_checkpoint
        from varied_models import MAX_RESPONSE, as_stage, get_varied

        root = Path(root)
        tok = make_tokenizer()
        model = as_stage(get_varied(tok, *shifted_causal), stage, block_size=VARIED_BLOCK)
        model.cfg.max_response_tokens = MAX_RESPONSE
        save_checkpoint(root / "ckpt", model, tok)
        if ar:
            save_checkpoint(root / "ar", as_stage(model, "ar"), tok)
        out = build(BuildOptions(ckpt=root / "ckpt", out=root / key, precisions=["fp32"],
                                 ar_ckpt=root / "ar" if ar else None, batch_sizes=[GRAPH_BATCH],
                                 capacity=VARIED_CAPACITY, verify_n=0), log=lambda s: None)
        _BUILT[key] = EngineFixture(out, model, tok)
    return _BUILT[key]


def varied_engine_folder(root: Path) -> EngineFixture:
    """An engine folder of the trained varied model (tests/varied_models.py: one report per image,
    7 to 26 ids, all ending at EOS), fp32, both modes from the same weights. The parity tests of
    test_runtime_engine.py compare it with PyTorch pass by pass; a random model could not fail them."""
    return _build_varied("varied", root, "dcd", (True, True), ar=True)


@pytest.fixture(scope="session")
def varied_engine(tmp_path_factory) -> EngineFixture:
    return varied_engine_folder(tmp_path_factory.mktemp("varied_engine"))


def images(n: int, size: int = 32) -> np.ndarray:
    """Preprocessed-looking, structured inputs [n, 1, S, S] in [-1, 1] (noise all looks alike
    to a random vision tower)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = [np.sin(xx * (1 + 2 * i)) * np.cos(yy * (3 - 0.5 * i)) * (1 - 0.3 * (i % 6)) for i in range(n)]
    return np.clip(np.stack(out), -1, 1)[:, None].astype(np.float32)


def test_prepare_decoded_gives_a_fixed_grid_engine_what_a_file_gives(runtime_engine, tmp_path):
    """EchoRuntime.prepare_decoded on a decoded image = the engine's preprocessing of the file: the
    engine's grid and preprocess mode, float32 [1, S, S]."""
    from PIL import Image

    from runtime.engine import EchoRuntime
    from runtime.preprocess import preprocess_image, read_image

    yy, xx = np.mgrid[0:40, 0:56]
    png = tmp_path / "x.png"
    Image.fromarray((120 + 100 * np.sin(xx / 5) * np.cos(yy / 7)).astype(np.uint8), mode="L").save(png)
    rt = EchoRuntime(runtime_engine.path, batch_size=GRAPH_BATCH)
    got = rt.prepare_decoded(read_image(png))
    want = preprocess_image(png, rt.image_size, rt.preprocess_mode)
    assert got.dtype == np.float32 and got.shape == (1, rt.image_size, rt.image_size) == want.shape
    assert np.array_equal(got, want)


def test_engine_folder_verifies_and_lists_both_modes(runtime_engine):
    from runtime import graph_io as gio
    from runtime.manifest import graph_batch_sizes, load_manifest, resolve_graph

    m = load_manifest(runtime_engine.path)
    # a student's folder: no teacher passes; the in-place one-step pass at batch 1 only (none here)
    for role in set(gio.GRAPH_ROLES) - set(gio.MULTISTEP_ROLES) - {gio.BLOCK_STEP_INPLACE}:
        assert resolve_graph(m, role, "fp32", GRAPH_BATCH) in m.files
        assert graph_batch_sizes(m, role, "fp32") == [GRAPH_BATCH]
    assert GRAPH_BATCH > 1 and not graph_batch_sizes(m, gio.BLOCK_STEP_INPLACE, "fp32")
    assert "tokenizer.json" in m.files and m.block_size == BLOCK


def teacher_engine_folder(root: Path) -> EngineFixture:
    """A fixed-grid teacher's engine folder (the varied model as a RAD teacher, block 4, fp32, graphs
    at batch 2): the runtime's multi-step loop at a fixed grid is held to PyTorch's multistep_generate."""
    return _build_varied("teacher", root, "rad", (True, False), ar=False)


@pytest.mark.parametrize("rule", ["dynamic-ltr", "static", "sequential"])
def test_fixed_grid_teacher_engine_writes_pytorchs_multistep_tokens(tmp_path_factory, rule):
    """Tokens equal PyTorch's for B, B/2 and 1 steps on 3 images (one batch of 2 and one padded), one
    pass more per report than PyTorch's (the engine stores the prompt's last block with a commit
    pass of its own), prefill and block timings recorded, one block event per block."""
    import torch

    from echo_train.decoding.block_diffusion import multistep_generate
    from runtime.engine import EchoRuntime
    from runtime.multistep import MultistepOptions
    from varied_models import MAX_RESPONSE, assert_informative, varied_images

    fx = teacher_engine_folder(tmp_path_factory.mktemp("teacher_engine"))
    px = varied_images(3)
    rt = EchoRuntime(fx.path, batch_size=GRAPH_BATCH, mode="multistep")
    for steps in (VARIED_BLOCK, VARIED_BLOCK // 2, 1):
        want = [multistep_generate(fx.model, fx.tokenizer, torch.from_numpy(px[i : i + 1]), VARIED_BLOCK, steps,
                                   MAX_RESPONSE, rule) for i in range(len(px))]
        events: list = []
        got = rt.generate(list(px), MAX_RESPONSE, mode="multistep", multistep=MultistepOptions(steps, rule),
                          on_block=events.append)
        assert [r.tokens for r in got] == [w.tokens[0] for w in want], (steps, rule)
        assert [r.forward_passes for r in got] == [w.forward_passes + 1 for w in want], (steps, rule)
        for i, r in enumerate(got):
            assert r.stop == "eos" and r.timings["prefill"] > 0 and r.timings["decode"] > r.timings["prefill"]
            assert r.timings["session"] > r.timings["prefill_session"] > 0  # onnxruntime's own seconds
            mine = [e for e in events if e.index == i]
            assert sum((e.tokens for e in mine), []) == r.tokens and mine[-1].done
    assert_informative([w.tokens[0] + [fx.tokenizer.eos_id] for w in want], fx.tokenizer.eos_id, min_distinct=3)
