"""Engines of imported checkpoints write the official ECHO inference code's tokens (issue 28).

The reference (tests/official_reference.py) is the official one-step decoder written around
`transformers`' Qwen2_5_VLForConditionalGeneration, with the cache cropped where the official model
stores nothing or part of a pass; it is checked against a no-cache recompute first. Then tiny random
Qwen2.5-VL folders go through import-hf -> echo-export build (fp32) -> EchoRuntime, and every case
must give the reference's tokens exactly: block 4 and 8, prompt lengths P with every P mod B, nine
image sizes and aspect ratios (one over 1,000 image tokens), EOS inside the block that holds the prompt's tail and mid-block later, and a
length limit that is not a multiple of B."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_fixtures import write_qwen_vl
from official_reference import official_onestep, official_onestep_uncached

transformers = pytest.importorskip("transformers")

GEN = 13  # a length limit that is not a multiple of the block size: the last block is whole anyway
IMAGE_PX = 32  # the fixture processor's min_pixels is 32 x 32
MAX_PIXELS = 2_250_000  # what the official script passes to the processor
WORDS = "the heart size is normal there is no pleural effusion and no pneumothorax".split()
CASES: list[str] = []  # every compared case, printed at the end


def _grey_png(path: Path, seed: int, h: int = IMAGE_PX, w: int = IMAGE_PX) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 120 + 60 * np.sin(xx / (2 + seed)) * np.cos(yy / (3 + seed)) + rng.normal(0, 30, (h, w))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("official")
    _, ids = write_qwen_vl(root / "vl", chat_template=True, image_size=IMAGE_PX)
    return root / "vl", ids


# Native resolution: each image keeps its aspect ratio, so its token count (8 x 8 px a token here) and
# with it the prompt length P follow its size. These take 16..23 image tokens, every residue mod 8
# (and mod 4), so one engine meets every P mod B; the last one takes 1,089 image tokens.
IMAGE_SIZES = [(32, 32), (8, 136), (24, 48), (8, 152), (32, 40), (24, 56), (16, 88), (8, 184), (264, 264)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("official_png")
    return [_grey_png(root / f"{s}.png", s, h, w) for s, (h, w) in enumerate(IMAGE_SIZES, 1)]


def some(images: list[Path]) -> list[Path]:
    """Four of them, the largest included, for the tests that decode each image many times."""
    return [images[0], images[2], images[5], images[-1]]


def _hf_inputs(folder: Path, ids: dict, instruction: str, png: Path) -> dict:
    """What the official script's processor call gives: the chat template rendered for [image, text]
    with the generation prompt, the image pad expanded to the image's tokens, the RGB image's pixels."""
    from PIL import Image

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    px = processor(Image.open(png).convert("RGB"), max_pixels=MAX_PIXELS, return_tensors="pt")
    n_image = int(px["image_grid_thw"].prod()) // 4  # merge 2 x 2
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    at = prompt.index(ids["<|image_pad|>"])
    prompt = prompt[:at] + [ids["<|image_pad|>"]] * n_image + prompt[at + 1:]
    return {"input_ids": torch.tensor([prompt]), "pixel_values": px["pixel_values"],
            "image_grid_thw": px["image_grid_thw"]}


def _instruction_for(folder: Path, ids: dict, png: Path, block: int, tail: int) -> str:
    """An instruction whose prompt length P has P mod block == tail."""
    for n in range(1, 40):
        instruction = "Describe " + " ".join(WORDS[i % len(WORDS)] for i in range(n)) + "."
        if _hf_inputs(folder, ids, instruction, png)["input_ids"].shape[1] % block == tail:
            return instruction
    raise AssertionError(f"no instruction gives P mod {block} == {tail}")


def _reference(folder: Path, ids: dict, instruction: str, pngs: list[Path], block: int, cached: bool = True):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    cfg = json.loads((folder / "config.json").read_text())
    decode = official_onestep if cached else official_onestep_uncached
    out = []
    for png in pngs:
        out.append(decode(model, _hf_inputs(folder, ids, instruction, png), mask_id=cfg["mask_token_id"],
                          eos_id=ids["<|im_end|>"], image_id=ids["<|image_pad|>"], block=block, gen_length=GEN))
    return out


def _engine(folder: Path, out: Path, instruction: str, block: int, stage: str = "dcd") -> Path:
    from echo_export.build import BuildOptions, build
    from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl

    import_qwen2_5_vl(ImportOptions(folder=str(folder), out=str(out / "ck"), image_size=IMAGE_PX, block_size=block,
                                    instruction=instruction, max_response_tokens=GEN, stage=stage),
                      log=lambda *a: None)
    return build(BuildOptions(ckpt=out / "ck", out=out / "engine", precisions=["fp32"], verify_n=0),
                 log=lambda *a: None)


def _engine_tokens(engine: Path, pngs: list[Path]) -> list[list[int]]:
    from runtime.engine import EchoRuntime

    return [r.tokens for r in EchoRuntime(engine).generate([str(p) for p in pngs], max_new_tokens=GEN)]


def _swap_head_rows(src: Path, dst: Path, a: int, b: int) -> None:
    """A copy of the folder whose LM head answers token a where it answered b and back: the model now
    writes EOS wherever it wrote the chosen token."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(dst / "model.safetensors")
    head = w["lm_head.weight"]
    head[[a, b]] = head[[b, a]]
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})


def test_reference_cached_equals_recompute(folder, images):
    """The cache cropping of the reference changes no token (block 8, a prompt with a tail)."""
    path, ids = folder
    instruction = _instruction_for(path, ids, images[0], 8, 3)
    images = some(images)
    cached = _reference(path, ids, instruction, images, 8)
    assert cached == _reference(path, ids, instruction, images, 8, cached=False)
    assert len({tuple(t) for t in cached}) > 1 and all(len(t) >= 8 for t in cached)  # real, image-dependent output


@pytest.mark.parametrize("block", [4, 8])
def test_engine_writes_the_official_tokens(folder, images, block, tmp_path):
    """One engine per block size; its images give every prompt length P mod B (0, 1 and B-1 among them)."""
    path, ids = folder
    instruction = _instruction_for(path, ids, images[0], block, 0)
    want = _reference(path, ids, instruction, images, block)
    got = _engine_tokens(_engine(path, tmp_path, instruction, block), images)
    tails = [_hf_inputs(path, ids, instruction, p)["input_ids"].shape[1] % block for p in images]
    CASES.append(f"B={block} P%B={tails}")
    assert set(tails) == set(range(block))
    for png, g, w, t in zip(images, got, want, tails):
        assert g == w, f"block {block}, {png.name}, P mod B = {t}"
    assert len({tuple(t) for t in want}) > 1


@pytest.mark.parametrize("where, role", [("tail block", "eos"), ("mid-block later", "eos"), ("mid-block later", "mask")])
def test_engine_stops_where_the_official_code_stops(folder, images, where, role, tmp_path):
    """EOS written inside the block that holds the prompt's tail, or in the middle of a later block;
    or the mask token as a position's argmax (the official code takes the argmax over every id, so
    that position stays masked, is fed masked to the next pass, and the report ends before it)."""
    path, ids = folder
    block, tail = 8, 5
    instruction = _instruction_for(path, ids, images[0], block, tail)
    images = some(images)
    free = _reference(path, ids, instruction, images[:1], block)[0]
    # generated index i sits in block (tail + i) // 8: 0..2 in the tail block, 3..10 in the next
    index = 1 if where == "tail block" else 6
    token = free[index]
    assert token not in free[:index]
    special = ids["<|im_end|>"] if role == "eos" else json.loads((path / "config.json").read_text())["mask_token_id"]
    swapped = tmp_path / "vl"
    _swap_head_rows(path, swapped, token, special)
    want = _reference(swapped, ids, instruction, images, block)
    assert want[0] == free[:index]  # the reference stops there
    got = _engine_tokens(_engine(swapped, tmp_path, instruction, block), images)
    CASES.append(f"{role} answered {where}: {len(images)} images")
    assert got == want


def test_print_case_count():
    n = sum(len(c.split("[")[1].split(",")) if "[" in c else int(c.split(": ")[1].split()[0]) for c in CASES)
    print(f"\n[official layout] engine tokens == official reference: {n} image decodes in {len(CASES)} engines: "
          + "; ".join(CASES))


def test_an_echo_folder_imports_without_running_its_remote_code(folder, tmp_path):
    """A folder as the released ECHO checkpoints ship: their own model class as remote code (`auto_map`,
    their architecture name, model_type), bf16 weights, the mask token only as the tokenizer's <|MASK|>.
    It imports from its config alone (the remote code would leave a marker if it ran), and a folder
    whose config lacks a Qwen2.5-VL setting is refused naming what is missing."""
    from safetensors.torch import load_file, save_file

    from echo_train.model.pretrained import PretrainedError
    from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl

    path, ids = folder
    echo = tmp_path / "ECHO_block8"
    shutil.copytree(path, echo)
    marker = tmp_path / "remote-code-ran"
    (echo / "modeling_echo.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((echo / "config.json").read_text())
    mask_id = cfg.pop("mask_token_id")
    cfg.update(model_type="echo_qwen2_5_vl", architectures=["EchoQwen2_5_VLForConditionalGeneration"],
               auto_map={"AutoModelForCausalLM": "modeling_echo.EchoQwen2_5_VLForConditionalGeneration"},
               torch_dtype="bfloat16")
    (echo / "config.json").write_text(json.dumps(cfg))
    w = load_file(echo / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, echo / "model.safetensors", metadata={"format": "pt"})

    logs: list[str] = []
    import_qwen2_5_vl(ImportOptions(folder=str(echo), out=str(tmp_path / "ck"), block_size=8), log=logs.append)
    assert not marker.exists()
    ck = json.loads((tmp_path / "ck" / "config.json").read_text())
    tok = json.loads((tmp_path / "ck" / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in tok["added_tokens"]}["<|MASK|>"] == mask_id  # found by name
    assert ck["decode_layout"] == "official" and ck["vision"]["native"] and ck["vision"]["max_pixels"] == 2_250_000
    assert ck["prompt"]["info"]["preset"] == "official-zh"
    print(f"\n[ECHO folder] {logs[-1]}")

    del cfg["vision_config"]["fullatt_block_indexes"]
    (echo / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PretrainedError, match="echo_qwen2_5_vl.*lacks vision_config.fullatt_block_indexes"):
        import_qwen2_5_vl(ImportOptions(folder=str(echo), out=str(tmp_path / "ck2"), block_size=8), log=logs.append)
    assert not (tmp_path / "ck2").exists() and not marker.exists()
