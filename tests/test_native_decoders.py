"""The native-resolution decoders, ours and the runtime's, against the official reference, cheaply.

tests/test_official_layout.py and tests/test_teacher_engine.py prove the engines over many cases, each
test building its own engine. This file keeps one tiny random Qwen2.5-VL folder, its two imported
checkpoints (stage dcd and stage rad, block 4), their fp32 engines and the official reference's tokens
in a per-process cache, so each test only decodes. That is what lets `make mutation` judge the native
and multi-step code (a forked worker inherits the cache and pays for its tests' decodes, not for an
import and an export): the PyTorch decoders of echo_train/decoding/native.py and the runtime's
native prefill, one-step and multi-step loops, each held to the official tokens, pass counts and
prompt/image token counts, and the errors for images the runtime cannot take.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hf_fixtures import write_qwen_vl
from official_reference import official_multistep, official_onestep
from test_official_layout import GEN, IMAGE_PX, _engine, _grey_png, _hf_inputs, _instruction_for

transformers = pytest.importorskip("transformers")

BLOCK = 4
TAIL = 3  # P mod B of the first image's prompt: a tail the last prefill block holds
SIZES = [(32, 32), (8, 136), (24, 48), (32, 40)]  # 16, 17, 18 and 20 image tokens: P mod 4 differs
RULES = ("sequential", "low_confidence_static", "low_confidence_dynamic")
STEPS = (4, 2, 1)
_CACHE: dict = {}


class Fixture:
    """The folder, the images, the engines and the official tokens (built once per process)."""

    def __init__(self) -> None:
        import torch

        root = Path(tempfile.mkdtemp(prefix="echo-native-"))  # not tmp_path: kept while the process lives
        self.folder = root / "vl"
        _, self.ids = write_qwen_vl(self.folder, chat_template=True, image_size=IMAGE_PX)
        self.images = [_grey_png(root / f"{i}.png", i, h, w) for i, (h, w) in enumerate(SIZES, 1)]
        self.instruction = _instruction_for(self.folder, self.ids, self.images[0], BLOCK, TAIL)
        self.student = _engine(self.folder, root / "dcd", self.instruction, BLOCK)
        self.teacher = _engine(self.folder, root / "rad", self.instruction, BLOCK, stage="rad")
        self.ck_student, self.ck_teacher = root / "dcd" / "ck", root / "rad" / "ck"
        self.inputs = [_hf_inputs(self.folder, self.ids, self.instruction, p) for p in self.images]
        self.mask_id = json.loads((self.folder / "config.json").read_text())["mask_token_id"]
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(self.folder, attn_implementation="eager")
        hf.eval()
        kw = dict(mask_id=self.mask_id, eos_id=self.ids["<|im_end|>"], image_id=self.ids["<|image_pad|>"],
                  block=BLOCK, gen_length=GEN)
        with torch.no_grad():
            self.onestep = [official_onestep(hf, x, **kw) for x in self.inputs]
            self.multistep = {(s, r): [official_multistep(hf, x, steps=s, rule=r, **kw) for x in self.inputs]
                              for s in STEPS for r in RULES}
        self.prompt_lens = [int(x["input_ids"].shape[1]) for x in self.inputs]
        self.image_tokens = [int(x["image_grid_thw"].prod()) // 4 for x in self.inputs]


@pytest.fixture()
def fx() -> Fixture:
    if "fx" not in _CACHE:
        _CACHE["fx"] = Fixture()
    return _CACHE["fx"]


def _model(ckpt: Path):
    """The checkpoint's PyTorch model, loaded once per process (decoding does not change it)."""
    from echo_train.model.checkpoint import load_checkpoint

    if ckpt not in _CACHE:
        _CACHE[ckpt] = load_checkpoint(ckpt)
    return _CACHE[ckpt]


def _native_images(ckpt: Path, images: list[Path]):
    from runtime.native_image import VisionGridSpec, native_image_from_path

    spec = VisionGridSpec.from_config(json.loads((ckpt / "config.json").read_text())["vision"])
    return [native_image_from_path(p, spec) for p in images]


def _blocks(prompt_len: int, n_tokens: int, eos: bool) -> int:
    """Blocks the official layout decodes: the first holds the prompt's tail, the last the EOS (at
    generated index n_tokens) or the GEN-th token."""
    tail = prompt_len % BLOCK
    return (tail + n_tokens) // BLOCK + 1 if eos else -(-(tail + GEN) // BLOCK)


def test_the_fixture_is_informative(fx):
    """Different prompt tails, image-dependent tokens, reports of more than one block: a decoder that
    ignored the image, the cache or the tail would not meet these references."""
    assert len({p % BLOCK for p in fx.prompt_lens}) >= 3
    assert len({tuple(t) for t in fx.onestep}) == len(fx.images)
    assert all(len(t) > BLOCK for t in fx.onestep)
    assert len({tuple(v[0]) for v in fx.multistep.values()}) > 1  # steps and rules change the tokens


def test_pytorch_native_onestep_writes_the_official_tokens(fx):
    from echo_train.decoding.native import native_onestep_generate, native_prompt

    model, tok = _model(fx.ck_student)
    for img, want, P, n_img in zip(_native_images(fx.ck_student, fx.images), fx.onestep, fx.prompt_lens,
                                   fx.image_tokens):
        ids, pos, delta = native_prompt(model, tok, img)
        assert (len(ids), img.n_tokens) == (P, n_img)
        assert pos.shape == (3, P) and delta == int(pos.max()) + 1 - P
        r = native_onestep_generate(model, tok, img, max_new_tokens=GEN)
        assert r.tokens[0] == want
        eos = len(want) < GEN
        assert int(np.asarray(r.forward_passes).reshape(-1)[0]) == 1 + _blocks(P, len(want), eos)  # the prefill, then a pass a block


@pytest.mark.parametrize("rule", RULES)
def test_pytorch_native_multistep_writes_the_official_tokens(fx, rule):
    from echo_train.decoding.block_diffusion import MultistepRun
    from echo_train.decoding.native import native_multistep_generate

    model, tok = _model(fx.ck_teacher)
    natives = _native_images(fx.ck_teacher, fx.images)
    for steps in STEPS:
        got = [native_multistep_generate(model, tok, img, MultistepRun(steps, rule), GEN).tokens[0] for img in natives]
        assert got == fx.multistep[(steps, rule)], f"{steps} steps, {rule}"


def test_runtime_native_onestep_writes_the_official_tokens(fx):
    """Tokens, the passes each report took, its prompt and image token counts, and the block events."""
    from runtime.engine import EchoRuntime

    rt = EchoRuntime(fx.student)
    events: list = []
    reps = rt.generate([str(p) for p in fx.images], max_new_tokens=GEN, on_block=events.append)
    assert [r.tokens for r in reps] == fx.onestep
    for i, (r, P, n_img) in enumerate(zip(reps, fx.prompt_lens, fx.image_tokens)):
        assert r.ok and (r.prompt_tokens, r.image_tokens) == (P, n_img)
        eos = len(r.tokens) < GEN
        assert r.stop == ("eos" if eos else "max_new_tokens")
        assert r.forward_passes == 1 + _blocks(P, len(r.tokens), eos), i
        mine = [e for e in events if e.index == i]
        assert [e.block for e in mine] == list(range(len(mine))) and len(mine) == r.forward_passes - 1
        assert mine[-1].text == r.text and sum((e.tokens for e in mine), []) == r.tokens


def test_runtime_takes_decoded_arrays_as_it_takes_files(fx):
    """prepare_decoded keeps a native engine's image at its own size; the array decodes to the file's
    tokens, and an array that is not a finite 2-D image fails that image alone."""
    from runtime.engine import EchoRuntime
    from runtime.preprocess import read_image

    rt = EchoRuntime(fx.student)
    decoded = read_image(fx.images[1])
    arr = rt.prepare_decoded(decoded.astype(np.uint8))  # an 8-bit decode: made float32, kept at its size
    assert arr.dtype == np.float32 and arr.shape == decoded.shape and np.array_equal(arr, decoded)
    bad3d, bad_nan = np.zeros((2, 32, 32), np.float32), np.full((32, 32), np.nan, np.float32)
    thin = np.full((8, 2000), 100.0, np.float32)  # aspect ratio 250: the processor refuses over 200
    reps = rt.generate([arr, bad3d, bad_nan, thin], max_new_tokens=GEN)
    assert reps[0].tokens == fx.onestep[1] and reps[0].image_tokens == fx.image_tokens[1]
    assert reps[1].error == "<array 1>: expected a finite 2-D image array, got shape (2, 32, 32)"
    assert reps[2].error.startswith("<array 2>: expected a finite 2-D image array")
    assert reps[3].error.startswith("<array 3>: ") and "aspect ratio" in reps[3].error
    assert not any(r.tokens for r in reps[1:])


def test_runtime_refuses_an_image_its_cache_cannot_hold(fx):
    """The error names the image's tokens, the slots the prompt and the new tokens need, and the
    engine's capacity, and the other images still decode."""
    from runtime.engine import EchoRuntime
    from runtime.manifest import load_manifest

    cap = load_manifest(fx.student).capacity
    rt = EchoRuntime(fx.student)
    reps = rt.generate([str(fx.images[0])], max_new_tokens=cap)
    n_img = fx.image_tokens[0]
    assert not reps[0].ok and reps[0].path == str(fx.images[0])
    assert reps[0].error.startswith(f"{fx.images[0]}: the image takes {n_img} tokens; ")
    assert f"the engine has {cap}" in reps[0].error and "--max-pixels" in reps[0].error
    P = fx.prompt_lens[0]
    need = int(reps[0].error.split(" need ")[1].split()[0])
    assert cap < need <= P + cap + BLOCK  # the prompt's cached blocks and the new tokens' passes
    ok = rt.generate([str(fx.images[0])], max_new_tokens=GEN)[0]
    assert ok.tokens == fx.onestep[0]


@pytest.mark.parametrize("rule", RULES)
def test_runtime_teacher_writes_the_official_multistep_tokens(fx, rule):
    from runtime.engine import EchoRuntime
    from runtime.multistep import MultistepOptions

    rt = EchoRuntime(fx.teacher, mode="multistep")
    for steps in STEPS:
        events: list = []
        reps = rt.generate([str(p) for p in fx.images], max_new_tokens=GEN, mode="multistep",
                           multistep=MultistepOptions(steps, rule), on_block=events.append)
        assert [r.tokens for r in reps] == fx.multistep[(steps, rule)], f"{steps} steps, {rule}"
        for i, (r, P, n_img) in enumerate(zip(reps, fx.prompt_lens, fx.image_tokens)):
            assert (r.prompt_tokens, r.image_tokens) == (P, n_img)
            assert r.timings["decode"] > r.timings["prefill"] > 0
            assert r.timings["session"] > r.timings["prefill_session"] > 0  # onnxruntime's own seconds
            eos = len(r.tokens) < GEN
            assert r.stop == ("eos" if eos else "max_new_tokens")
            blocks = _blocks(P, len(r.tokens), eos)
            # the prefill, then per block its denoise passes (one per transfer: at most `steps`, at most
            # one per masked position; exactly that for the static rules) and the commit pass
            masked = [BLOCK - P % BLOCK] + [BLOCK] * (blocks - 1)
            most = 1 + sum(min(steps, m) + 1 for m in masked)
            if rule != "low_confidence_dynamic":
                assert r.forward_passes == most, (i, steps, rule)
            else:
                assert 1 + 2 * blocks <= r.forward_passes <= most, (i, steps, rule)
            mine = [e for e in events if e.index == i]
            assert len(mine) == blocks and sum((e.tokens for e in mine), []) == r.tokens
            assert r.timings["prefill"] > 0 and len(r.timings["blocks"]) > 0


def test_fp16_cpu_sessions_hold_an_fp32_copy_each():
    from runtime.engine import fp16_cpu_session_bytes

    assert fp16_cpu_session_bytes(1000) == 2000
    assert fp16_cpu_session_bytes(1000, sessions=3) == 6000
