"""`echo-train stage1 --init-lm --init-vision`: pretrained Hugging Face parts (tiny random folders the
tests write) load exactly, train through stages 1-3, export and run in the runtime; folders that do
not fit are refused with one message and exit status 2, nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hf_fixtures import CLIP_MEAN, CLIP_STD, QWEN_SPECIALS, rewrite_config, write_qwen_lm, write_vision

from echo_train.model.pretrained import PretrainedError, build_pretrained_model, plan_pretrained
from echo_train.stages.common import preset
from runtime.preprocess import normalize_image
from runtime.special_tokens import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    lm = write_qwen_lm(root / "qwen2", "qwen2", extra_rows=0, tie=False)
    vis = write_vision(root / "siglip", "siglip")
    return root, lm, vis


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.clip(120 + 60 * np.sin(xx / 3) * np.cos(yy / 5) + rng.normal(0, 25, (size, size)), 0, 255)
    # the full 0..255 range: runtime/preprocess.py stretches every image to its own range first
    img.flat[0], img.flat[-1] = 0, 255
    return img.astype(np.uint8)


def _tower_output(model, pixels: torch.Tensor) -> torch.Tensor:
    """Our tower's last hidden state for our [-1, 1] grey pixels (normalisation inside the model)."""
    seen = {}

    def keep(module, inputs, output) -> None:  # returns None: the output itself is not replaced
        seen["h"] = output.last_hidden_state

    h = model.vision.tower.register_forward_hook(keep)
    try:
        model.vision(pixels)
    finally:
        h.remove()
    return seen["h"]


@pytest.mark.parametrize("kind,family,tie,extra", [("qwen2", "siglip", False, 0), ("qwen3", "vit", True, 16),
                                                    ("qwen2", "dinov2", True, 0)])
def test_pretrained_parts_match_transformers(tmp_path, kind, family, tie, extra):
    from PIL import Image

    ref_lm = write_qwen_lm(tmp_path / "lm", kind, extra_rows=extra, tie=tie)
    ref_vis = write_vision(tmp_path / "vis", family)
    parts = plan_pretrained(preset("test"), tmp_path / "lm", tmp_path / "vis")
    tok = parts.tokenizer
    n_ids = ref_lm.config.vocab_size
    # our special tokens come after Qwen's vocabulary and its own special tokens
    assert tok.added_special_tokens == list(SPECIAL_TOKENS)
    for name in QWEN_SPECIALS:
        assert tok.tok.token_to_id(name) is not None
    assert min(tok.pad_id, tok.eos_id, tok.mask_id, tok.image_id, tok.bos_id) >= n_ids - extra
    rows = parts.config.lm.vocab_size
    assert rows == max(n_ids, n_ids - extra + len(SPECIAL_TOKENS))
    model = build_pretrained_model(parts)

    # LM: logits over the original vocabulary equal transformers'
    ids = torch.randint(0, n_ids - extra, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref_lm(input_ids=ids).logits
        got = model.lm.causal_logits(ids)[..., :n_ids]
    lm_diff = (want - got).abs().max().item()
    emb = model.lm.model.embed_tokens.weight
    if rows > n_ids:  # grown rows start at the mean of the loaded ones
        assert torch.allclose(emb[n_ids:], emb[:n_ids].mean(0).expand(rows - n_ids, -1))
    assert (model.lm.lm_head.weight is emb) == tie

    # vision: transformers' processor + tower on the RGB image == our grey pipeline + tower
    grey = _image()
    hf_px = transformers.AutoImageProcessor.from_pretrained(tmp_path / "vis")(
        Image.fromarray(grey, mode="L").convert("RGB"), return_tensors="pt")["pixel_values"]
    ours_px = torch.from_numpy(normalize_image(grey.astype(np.float32), 32))[None]
    with torch.no_grad():
        want_v = ref_vis(pixel_values=hf_px).last_hidden_state
        got_v = _tower_output(model, ours_px)
    vis_diff = (want_v - got_v).abs().max().item()
    print(f"\n[parity] {kind} + {family}: LM logits max |diff| {lm_diff:.2e}, vision features max |diff| {vis_diff:.2e}")
    assert lm_diff < 1e-4 and vis_diff < 1e-4
    assert parts.config.vision.image_mean == pytest.approx(CLIP_MEAN)
    assert parts.config.vision.image_std == pytest.approx(CLIP_STD)
    # the projector starts image tokens at the size of the token embeddings
    with torch.no_grad():
        img = model.vision(ours_px)
    ratio = img.pow(2).mean().sqrt() / emb.pow(2).mean().sqrt()
    assert 0.3 < ratio.item() < 3.0


def test_prompt_uses_the_lms_tokenizer(folders):
    root, _, _ = folders
    parts = plan_pretrained(preset("test"), root / "qwen2", root / "siglip")
    tok = parts.tokenizer
    from runtime.prompt import PROMPT_TEXT

    prefix = tok.prefix_ids(parts.config.n_image_tokens)
    text = prefix[prefix.index(tok.bos_id) + 1:]
    assert tok.tok.decode(text) == " " + PROMPT_TEXT  # the prompt, in the LM's own tokens
    assert len(prefix) % 16 == 0


# ---------------------------------------------------------------------------- refusals (item 3)
def _stage1(tmp_path, lm, vis, data=None):
    from echo_train.cli import main

    out = tmp_path / "out"
    args = ["stage1", "--data", str(data or tmp_path / "no-data"), "--out", str(out), "--preset", "test",
            "--steps", "1", "--threads", "1"]
    if lm:
        args += ["--init-lm", str(lm)]
    if vis:
        args += ["--init-vision", str(vis)]
    r = CliRunner().invoke(main, args)
    return r, out


def _refused(r, out, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output  # one message, no traceback
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


def test_unsupported_architecture_is_refused(tmp_path, folders):
    root, _, _ = folders
    lm = tmp_path / "llama"
    shutil.copytree(root / "qwen2", lm)
    rewrite_config(lm, model_type="llama", architectures=["LlamaForCausalLM"])
    _refused(*_stage1(tmp_path, lm, root / "siglip"), "unsupported architecture 'llama'", "LlamaForCausalLM")
    vl = tmp_path / "vl"
    shutil.copytree(root / "qwen2", vl)
    rewrite_config(vl, model_type="qwen2_5_vl")
    _refused(*_stage1(tmp_path, vl, None), "import-hf")
    vis = tmp_path / "clip"
    shutil.copytree(root / "siglip", vis)
    rewrite_config(vis, model_type="clip_vision_model")
    _refused(*_stage1(tmp_path, root / "qwen2", vis), "unsupported architecture 'clip_vision_model'", "SigLIP")


def test_missing_shard_is_refused(tmp_path, folders):
    from safetensors.torch import load_file, save_file

    root, _, _ = folders
    lm = tmp_path / "sharded"
    shutil.copytree(root / "qwen2", lm)
    state = load_file(str(lm / "model.safetensors"))
    (lm / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(lm / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (lm / "model.safetensors.index.json").write_text(json.dumps(index))
    # complete: it loads
    assert plan_pretrained(preset("test"), lm, None).lm_folder == lm
    (lm / "model-00002-of-00002.safetensors").unlink()
    _refused(*_stage1(tmp_path, lm, root / "siglip"), "missing shard model-00002-of-00002.safetensors")


def test_tensors_that_do_not_map_are_listed(tmp_path, folders):
    from safetensors.torch import load_file, save_file

    root, _, _ = folders
    lm = tmp_path / "renamed"
    shutil.copytree(root / "qwen2", lm)
    state = load_file(str(lm / "model.safetensors"))
    state["model.layers.0.self_attn.qkv_proj.weight"] = state.pop("model.layers.0.self_attn.q_proj.weight")
    state["model.extra.weight"] = torch.zeros(3)
    save_file(state, str(lm / "model.safetensors"))
    line = _refused(*_stage1(tmp_path, lm, root / "siglip"), "tensors do not map")
    assert "model.extra.weight" in line and "model.layers.0.self_attn.qkv_proj.weight" in line
    assert "model.layers.0.self_attn.q_proj.weight" in line  # the parameter left without a tensor
    with pytest.raises(PretrainedError, match="qkv_proj"):  # the library raises; only the CLI exits
        build_pretrained_model(plan_pretrained(preset("test"), lm, None))
    vis = tmp_path / "vis-renamed"
    shutil.copytree(root / "siglip", vis)
    state = load_file(str(vis / "model.safetensors"))
    name = next(k for k in sorted(state) if k.endswith("self_attn.q_proj.weight"))
    state[name.replace("q_proj", "query")] = state.pop(name)
    save_file(state, str(vis / "model.safetensors"))
    line = _refused(*_stage1(tmp_path, root / "qwen2", vis), "tensors do not map onto a siglip vision tower")
    assert name.replace("q_proj", "query") in line and name in line


def test_tokenizer_without_needed_tokens_is_refused(tmp_path, folders):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root, _, _ = folders
    lm = tmp_path / "wordlevel"
    shutil.copytree(root / "qwen2", lm)
    vocab = {"[UNK]": 0, "the": 1, "heart": 2, "is": 3, "normal": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(lm / "tokenizer.json"))
    _refused(*_stage1(tmp_path, lm, root / "siglip"), "lacks the tokens to encode the prompt", "Write")
    (lm / "tokenizer.json").unlink()
    _refused(*_stage1(tmp_path, lm, root / "siglip"), "no tokenizer.json")


def test_vision_folder_without_processor_config_is_refused(tmp_path, folders):
    root, _, _ = folders
    vis = tmp_path / "noproc"
    shutil.copytree(root / "siglip", vis)
    (vis / "preprocessor_config.json").unlink()
    _refused(*_stage1(tmp_path, root / "qwen2", vis), "preprocessor_config.json", "mean")


# ---------------------------------------------------------------------------- stages 1-3, export, runtime
def _data(tmp_path):
    from echo_train.data.synth import generate_synth

    data = tmp_path / "synth"
    if not data.exists():
        generate_synth(data, n_train=6, n_val=2, n_test=2, image_size=32, seed=0, workers=1)
    return data


def _dicom(path, grey: np.ndarray) -> None:
    from test_preprocess import dicom_bytes

    path.write_bytes(dicom_bytes(grey.astype(np.uint16) * 16))


def _train(*args) -> None:
    from echo_train.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)


def test_pretrained_parts_train_through_every_stage_export_and_run(tmp_path, folders):
    """stage 1 from --init-lm/--init-vision (resuming exactly), stage 2, stage 3, echo-export build,
    echo-report on a PNG and a DICOM: the runtime's fp32 tokens are the PyTorch reference's."""
    from PIL import Image
    from safetensors.torch import load_file

    from echo_export.cli import main as export_main
    from echo_train.decoding import fused_onestep_generate
    from echo_train.model.checkpoint import load_checkpoint
    from runtime.cli import main as report_main
    from runtime.preprocess import preprocess_image

    root, _, _ = folders
    data = _data(tmp_path)
    common = ["--data", data, "--preset", "test", "--init-lm", root / "qwen2", "--init-vision", root / "siglip",
              "--steps", "4", "--batch-size", "2", "--threads", "1", "--precision", "fp32", "--eval-every", "100",
              "--lr", "1e-4"]  # a small step: the reports then still vary by image and position (a strong check)
    _train("stage1", "--out", tmp_path / "ar_full", *common)
    _train("stage1", "--out", tmp_path / "ar", *common, "--stop-after", "2")
    assert json.loads((tmp_path / "ar" / "config.json").read_text())["vision"]["image_mean"] == pytest.approx(CLIP_MEAN)
    _train("stage1", "--out", tmp_path / "ar", *common)  # resumes at step 2
    full, cut = load_file(str(tmp_path / "ar_full" / "model.safetensors")), load_file(str(tmp_path / "ar" / "model.safetensors"))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)  # exact resume
    fast = ["--data", data, "--steps", "2", "--batch-size", "2", "--threads", "1", "--precision", "fp32",
            "--eval-every", "100", "--lr", "1e-4"]
    _train("stage2", "--init", tmp_path / "ar", "--out", tmp_path / "base", "--block-size", "4", *fast)
    _train("stage3", "--init", tmp_path / "base", "--out", tmp_path / "echo", *fast)

    model, tok = load_checkpoint(tmp_path / "echo")
    assert model.cfg.stage == "dcd" and tok.tok.token_to_id("<|im_end|>") is not None  # the LM's own tokenizer
    model.cfg.max_response_tokens = 12
    r = CliRunner().invoke(export_main, ["build", "--ckpt", str(tmp_path / "echo"), "--out", str(tmp_path / "engine"),
                                         "--precision", "fp32", "--data", str(data), "--verify-n", "2",
                                         "--max-new-tokens", "12"])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["model_config"]["vision"]["image_std"] == pytest.approx(CLIP_STD)  # travels with the engine

    grey = _image(3)
    Image.fromarray(grey, mode="L").save(tmp_path / "a.png")
    _dicom(tmp_path / "b.dcm", grey[::-1].copy())
    r = CliRunner().invoke(report_main, ["--engine-dir", str(tmp_path / "engine"), "--format", "json", "--max-new-tokens", "12",
                                         str(tmp_path / "a.png"), str(tmp_path / "b.dcm")])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    got = [json.loads(x)["tokens"] for x in r.output.strip().splitlines()]
    px = torch.from_numpy(np.stack([preprocess_image(tmp_path / n, model.cfg.vision.image_size) for n in ("a.png", "b.dcm")]))
    want = fused_onestep_generate(model, tok, px, model.cfg.block_size, 12).tokens
    print(f"\n[init-pretrained] runtime fp32 tokens {got} == PyTorch {want}")
    assert got == want and got[0] != got[1] and len(set(got[0] + got[1])) > 2  # reports that vary


@pytest.mark.parametrize("family", ["vit", "siglip", "dinov2"])
def test_every_vision_family_of_the_presets_builds(family):
    """`stage1 --vision FAMILY` without a pretrained folder: a random tower of the preset's size
    (DINOv2 once failed here: transformers 5 takes only a whole mlp_ratio)."""
    from echo_train.model.echo_model import EchoModel

    cfg = preset("test")
    cfg.vision.family = family
    model = EchoModel(cfg)
    with torch.no_grad():
        img = model.vision(torch.zeros(1, 1, cfg.vision.image_size, cfg.vision.image_size))
    assert img.shape == (1, cfg.n_image_tokens, cfg.lm.hidden_size)
