"""The prompt of an imported Qwen2.5-VL checkpoint is its own chat template's (issue 17): the ids
around the image come from rendering the folder's chat template, travel in the checkpoint config and
the engine manifest, and the decoder's multimodal positions follow the image inside the prompt as
`transformers`' get_rope_index places it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hf_fixtures import write_qwen_vl

from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl
from runtime.prompt import PREFIX_ALIGN, PROMPT_PRESETS, PROMPT_TEXT
from runtime.preprocess import normalize_image

transformers = pytest.importorskip("transformers")

N_IMAGE = 16  # 32 px, patch 4, merge 2 -> 4 x 4 image tokens


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlchat")
    ref, ids = write_qwen_vl(root / "vl", chat_template=True)
    return root / "vl", ref, ids


def _import(folder, out, **kw):
    from echo_train.model.checkpoint import load_checkpoint

    opts = ImportOptions(folder=str(folder), out=str(out), image_size=32, **{"stage": "dcd", "block_size": 4, **kw})
    import_qwen2_5_vl(opts, log=lambda *a: None)
    return load_checkpoint(out)


def _grey(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.clip(120 + 60 * np.sin(xx / 3 + seed) * np.cos(yy / 5) + rng.normal(0, 25, (size, size)), 0, 255)
    img.flat[0], img.flat[-1] = 0, 255
    return img.astype(np.uint8)


def _messages(instruction=PROMPT_PRESETS["official-zh"], system=None):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}
    return ([{"role": "system", "content": system}] if system else []) + [user]


def test_prompt_is_the_folders_chat_template(vl, tmp_path):
    """The prefix is `transformers`' own rendering and tokenisation of the chat template for one image
    and the official code's default instruction, unpadded (the official layout), recorded in
    config.json; `--layout echo` left-pads it to the block grid instead."""
    folder, _, ids = vl
    model, tok = _import(folder, tmp_path / "ck")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = hf_tok.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    assert tok.template.info["text"] == text and "You are a helpful assistant." in text
    assert tok.template.info["preset"] == "official-zh" and model.cfg.decode_layout == "official"
    want = hf_tok(text, add_special_tokens=False)["input_ids"]
    at = want.index(ids["<|image_pad|>"])
    want = want[:at] + [ids["<|image_pad|>"]] * N_IMAGE + want[at + 1:]  # the processor's expansion
    assert tok.prefix_ids(N_IMAGE) == want  # exactly the official code's input_ids: no pads
    assert model.cfg.image_start == at
    header = hf_tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["prompt"]["before"] == want[:at] and cfg["prompt"]["after"] == want[at + N_IMAGE:]
    assert cfg["lm"]["mrope_image_start"] == at and cfg["decode_layout"] == "official"

    model, tok = _import(folder, tmp_path / "ck-echo", layout="echo", prompt="echo")
    text = hf_tok.apply_chat_template(_messages(PROMPT_TEXT), tokenize=False, add_generation_prompt=True)
    want = hf_tok(text, add_special_tokens=False)["input_ids"]
    want = want[:at] + [ids["<|image_pad|>"]] * N_IMAGE + want[at + 1:]
    prefix = tok.prefix_ids(N_IMAGE)
    n_pad = len(prefix) - len(want)
    assert len(prefix) % PREFIX_ALIGN == 0 and 0 <= n_pad < PREFIX_ALIGN
    assert prefix == [ids["<|endoftext|>"]] * n_pad + want
    s = model.cfg.image_start
    assert s == n_pad + at and prefix[s: s + N_IMAGE] == [ids["<|image_pad|>"]] * N_IMAGE
    assert ids["<|image_pad|>"] not in prefix[-PREFIX_ALIGN:]  # the carried last block is text
    assert prefix[-len(header):] == header  # the prefix ends with the assistant header
    assert model.cfg.decode_layout == "echo"

    # --system / --instruction shape the rendered prompt; --no-chat-template keeps ECHO's own prefix
    from echo_train.cli import main

    r = CliRunner().invoke(main, ["import-hf", str(folder), "--out", str(tmp_path / "ck2"), "--image-size", "32",
                                  "--block-size", "4", "--system", "You are a radiologist.",
                                  "--instruction", "Describe the findings."])
    assert r.exit_code == 0, (r.output, r.exception)
    info = json.loads((tmp_path / "ck2" / "config.json").read_text())["prompt"]["info"]
    assert info["text"] == hf_tok.apply_chat_template(_messages("Describe the findings.", "You are a radiologist."),
                                                      tokenize=False, add_generation_prompt=True)
    assert "helpful assistant" not in info["text"]
    _, plain = _import(folder, tmp_path / "ck3", chat_template=False)
    assert plain.template is None and plain.prefix_ids(N_IMAGE)[:N_IMAGE] == [ids["<|image_pad|>"]] * N_IMAGE


def _hf_inputs(folder, ids, prefix, response):
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    grey = _grey()
    hf_in = processor(Image.fromarray(grey, mode="L").convert("RGB"), return_tensors="pt")
    input_ids = torch.tensor([prefix + response])
    mm = (input_ids == ids["<|image_pad|>"]).int()
    px = torch.from_numpy(normalize_image(grey.astype(np.float32), 32))[None]
    return hf_in, input_ids, mm, px


def test_positions_and_logits_match_transformers_with_the_image_inside_the_prompt(vl, tmp_path):
    """Our MRoPE positions are get_rope_index's for the templated prompt (text, image, text), and the
    logits of the imported model are Qwen2_5_VLForConditionalGeneration's on it (fp32)."""
    from echo_train.model.backbone import mrope_positions
    from echo_train.model.masks import build_attention_mask, causal_layout

    folder, ref, ids = vl
    model, tok = _import(folder, tmp_path / "ck", stage="ar", native=False)  # the fixed grid's index positions
    prefix = tok.prefix_ids(N_IMAGE)
    response = torch.randint(3, 390, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    hf_in, input_ids, mm, px = _hf_inputs(folder, ids, prefix, response)
    s = model.cfg.image_start
    assert 0 < s and s + N_IMAGE < len(prefix)  # the image really is in the middle
    want_pos, _ = ref.model.get_rope_index(input_ids, mm, image_grid_thw=hf_in["image_grid_thw"])
    got_pos = mrope_positions(torch.arange(input_ids.shape[1])[None], model.cfg.lm.mrope_image_grid, s)
    assert torch.equal(got_pos[0].T, want_pos[:, 0])

    layout = causal_layout(input_ids.shape[1])
    mask = build_attention_mask(layout)[None]
    with torch.no_grad():
        want = ref(input_ids=input_ids, pixel_values=hf_in["pixel_values"], image_grid_thw=hf_in["image_grid_thw"],
                   mm_token_type_ids=mm).logits
        embeds = torch.cat([model.embed_prefix(px, input_ids[:, : len(prefix)]),
                            model.embed_tokens(input_ids[:, len(prefix):])], 1)
        got, _ = model(embeds, layout.position[None], mask)
        diff = (want - got[..., : want.shape[-1]]).abs().max().item()
        model.lm.cfg.mrope_image_start = 0  # the image assumed first, as before the template
        wrong, _ = model(embeds, layout.position[None], mask)
        wrong_diff = (want - wrong[..., : want.shape[-1]]).abs().max().item()
    print(f"\n[parity] chat prompt ({input_ids.shape[1]} tokens, image at {s}): logits max |diff| {diff:.2e}; "
          f"with the image start ignored {wrong_diff:.2e}")
    assert diff < 1e-4 and want.abs().max() > 0.1
    assert wrong_diff > 1e-2


def test_chat_prompt_import_exports_and_runs_in_the_runtime(vl, tmp_path):
    """import-hf with the chat template -> echo-export build (fp32) -> echo-report: the manifest
    carries the template, the runtime builds the checkpoint's prefix, and its tokens are
    fused_onestep_generate's."""
    from PIL import Image

    from conftest import write_tiny_dataset
    from echo_export.cli import main as export_main
    from echo_train.decoding import fused_onestep_generate
    from runtime.cli import main as report_main
    from runtime.engine import EchoRuntime
    from runtime.preprocess import preprocess_image

    folder = vl[0]
    model, tok = _import(folder, tmp_path / "ck", max_response_tokens=16, prompt="official-en", native=False)
    data = write_tiny_dataset(tmp_path / "data", n_train=2, n_test=2)
    r = CliRunner().invoke(export_main, ["build", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "engine"),
                                         "--precision", "fp32", "--data", str(data), "--verify-n", "2"])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["model_config"]["prompt"] == model.cfg.prompt
    assert manifest["prefix_len"] == len(tok.prefix_ids(N_IMAGE))
    rt = EchoRuntime(tmp_path / "engine")
    assert rt.prefix.tolist() == tok.prefix_ids(N_IMAGE)

    assert manifest["model_config"]["vision"]["preprocess"] == model.cfg.vision.preprocess == "processor"
    names = []
    for seed in (2, 5, 7):  # 40 px, not the full 0..255 range: processor and echo preprocessing differ
        Image.fromarray((_grey(seed, 40) // 2 + 40).astype(np.uint8), mode="L").save(tmp_path / f"{seed}.png")
        names.append(tmp_path / f"{seed}.png")
    r = CliRunner().invoke(report_main, ["--engine-dir", str(tmp_path / "engine"), "--format", "json", *map(str, names)])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    got = [json.loads(x)["tokens"] for x in r.output.strip().splitlines()]
    px = torch.from_numpy(np.stack([preprocess_image(n, 32, "processor") for n in names]))
    want = fused_onestep_generate(model, tok, px, 4, 16).tokens
    print(f"\n[import-hf chat prompt] runtime fp32 tokens {got} == PyTorch {want}")
    assert got == want and len({tuple(t) for t in got}) > 1


def test_cli_renders_the_chat_template_in_a_fresh_process(vl, tmp_path):
    """`echo-train import-hf` as its own process: rendering the chat template must not rely on a
    module another import happened to load (jinja2.ext, which transformers loads in the tests)."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "echo_train.cli", "import-hf", str(vl[0]), "--out", str(tmp_path / "ck"),
                        "--image-size", "32", "--block-size", "4"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[import-hf]" in r.stdout and "the chat prompt of tokenizer_config.json" in r.stdout
