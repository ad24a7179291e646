"""`echo-train import-hf`: a Qwen2.5-VL folder (tiny, random, written by the test) becomes an ECHO
checkpoint whose vision features and logits are `transformers`' own, which exports and runs in the
runtime; folders that do not fit are refused with one message, exit status 2, nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hf_fixtures import rewrite_config, write_qwen_vl

from echo_train.model.pretrained import PretrainedError
from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl
from runtime.preprocess import normalize_image

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    ref, ids = write_qwen_vl(root / "vl")
    return root / "vl", ref, ids


def _grey(seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.clip(120 + 60 * np.sin(xx / 3 + seed) * np.cos(yy / 5) + rng.normal(0, 25, (size, size)), 0, 255)
    img.flat[0], img.flat[-1] = 0, 255  # our preprocessing stretches each image to its own range
    return img.astype(np.uint8)


def _import(folder, out, **kw):
    from echo_train.model.checkpoint import load_checkpoint

    opts = ImportOptions(folder=str(folder), out=str(out), image_size=32, **{"stage": "dcd", "block_size": 4, **kw})
    import_qwen2_5_vl(opts, log=lambda *a: None)
    return load_checkpoint(out)


def test_vision_features_and_logits_match_transformers(vl, tmp_path):
    """The same image and prompt through transformers' Qwen2_5_VLForConditionalGeneration and through
    our imported model: the image tokens and every logit agree (fp32)."""
    from PIL import Image

    from echo_train.model.masks import build_attention_mask, causal_layout

    folder, ref, ids = vl
    model, tok = _import(folder, tmp_path / "ck", stage="ar")
    grey = _grey()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    hf_in = processor(Image.fromarray(grey, mode="L").convert("RGB"), return_tensors="pt")
    assert hf_in["image_grid_thw"].tolist() == [[1, 8, 8]]
    px = torch.from_numpy(normalize_image(grey.astype(np.float32), 32))[None]
    prefix = tok.prefix_ids(model.n_image_tokens)
    assert prefix[: model.n_image_tokens] == [ids["<|image_pad|>"]] * 16  # the model's own placeholder id
    response = torch.randint(3, 390, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    input_ids = torch.tensor([prefix + response])
    with torch.no_grad():
        want_img = ref.model.get_image_features(hf_in["pixel_values"], hf_in["image_grid_thw"]).pooler_output[0]
        got_img = model.vision(px)[0]
        want = ref(input_ids=input_ids, pixel_values=hf_in["pixel_values"], image_grid_thw=hf_in["image_grid_thw"],
                   mm_token_type_ids=(input_ids == ids["<|image_pad|>"]).int()).logits
        embeds = torch.cat([model.embed_prefix(px, input_ids[:, : len(prefix)]),
                            model.embed_tokens(input_ids[:, len(prefix):])], 1)
        layout = causal_layout(input_ids.shape[1])
        got, _ = model(embeds, layout.position[None], build_attention_mask(layout)[None])
    vis_diff = (want_img - got_img).abs().max().item()
    logit_diff = (want - got[..., : want.shape[-1]]).abs().max().item()
    print(f"\n[parity] Qwen2.5-VL: vision features max |diff| {vis_diff:.2e}, logits max |diff| {logit_diff:.2e} "
          f"({input_ids.shape[1]} tokens, {model.n_image_tokens} image tokens)")
    assert vis_diff < 1e-4 and logit_diff < 1e-4
    assert want.abs().max() > 0.1  # logits that carry signal, not a near-zero model


# ---------------------------------------------------------------------------- mask token, refusals
def _cli(*args):
    from echo_train.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(r, out, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


def test_mask_token_from_config_else_tokenizer_else_option(tmp_path):
    ids = {}
    for where in ("config", "tokenizer", "none"):
        _, ids[where] = write_qwen_vl(tmp_path / where, mask=where)
    for where in ("config", "tokenizer"):
        _, tok = _import(tmp_path / where, tmp_path / f"ck-{where}")
        assert tok.mask_id == ids[where]["<|MASK|>"]
    # named nowhere: the official code's last resort, the id of <|MASK|>
    _, tok = _import(tmp_path / "none", tmp_path / "ck-none")
    assert tok.mask_id == ids["none"]["<|MASK|>"]
    # without <|MASK|> in the vocabulary only --mask-token can give it
    tj = tmp_path / "none" / "tokenizer.json"
    tj.write_text(tj.read_text().replace("<|MASK|>", "<|extra_mask|>"))
    r = _cli("import-hf", tmp_path / "none", "--out", tmp_path / "ck-none2", "--image-size", "32")
    _refused(r, tmp_path / "ck-none2", "no mask token", "--mask-token")
    _, tok = _import(tmp_path / "none", tmp_path / "ck-none3", mask_token="<|extra_mask|>")
    assert tok.mask_id == ids["none"]["<|MASK|>"]
    # the decode conventions of the official inference code are recorded in the checkpoint
    cfg = json.loads((tmp_path / "ck-none" / "config.json").read_text())
    assert (cfg["shifted_prediction"], cfg["causal_context"], cfg["stage"]) == (False, False, "dcd")
    assert cfg["n_image_tokens"] == 16 and cfg["vision"]["image_size"] == 32


def test_import_refusals(vl, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = vl[0]
    out = tmp_path / "out"
    bad = tmp_path / "qwen2vl"
    shutil.copytree(folder, bad)
    rewrite_config(bad, model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    _refused(_cli("import-hf", bad, "--out", out, "--image-size", "32"), out, "unsupported architecture 'qwen2_vl'")

    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    state = load_file(str(renamed / "model.safetensors"))
    state["visual.blocks.0.attn.qkv_x.weight"] = state.pop("visual.blocks.0.attn.qkv.weight")
    save_file(state, str(renamed / "model.safetensors"))
    line = _refused(_cli("import-hf", renamed, "--out", out, "--image-size", "32"), out, "tensors do not map")
    assert "visual.blocks.0.attn.qkv_x.weight" in line and "vision.tower.blocks.0.attn.qkv.weight" in line
    with pytest.raises(PretrainedError, match="qkv_x"):  # the library raises; only the CLI exits
        import_qwen2_5_vl(ImportOptions(folder=str(renamed), out=str(out), image_size=32))

    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (sharded / "model-00001-of-00002.safetensors").unlink()
    _refused(_cli("import-hf", sharded, "--out", out, "--image-size", "32"), out,
             "missing shard model-00001-of-00002.safetensors")

    _refused(_cli("import-hf", folder, "--out", out, "--image-size", "36"), out, "not a multiple of")


# ---------------------------------------------------------------------------- streamed weights
@pytest.mark.parametrize("tie", [False, True])
def test_import_streams_the_source_tensors_in_their_dtype(tmp_path, tie):
    """model.safetensors holds each source tensor under our name, in its own dtype (a bf16 folder in
    two shards: bf16), the embedding grown by mean rows, a tied head not at all; load_checkpoint
    gives the model the whole-model import gave (a model built, each tensor copied in as fp32, the
    embedding grown by grow_rows)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from echo_train.model.checkpoint import load_checkpoint
    from echo_train.model.echo_model import EchoModel
    from echo_train.model.families.qwen2_5_vl import FAMILY
    from echo_train.model.hf_folder import grow_rows

    folder = tmp_path / "vl"
    write_qwen_vl(folder, tie=tie)
    src = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
    (folder / "model.safetensors").unlink()
    # rows for exactly the tokenizer's ids, so that ours (+ BOS) grow them
    from tokenizers import Tokenizer

    n_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    for k in src:
        if k.endswith("embed_tokens.weight") or k == "lm_head.weight":
            src[k] = src[k][:n_ids].clone()
    d = json.loads((folder / "config.json").read_text())
    d["text_config"]["vocab_size"] = n_ids
    (folder / "config.json").write_text(json.dumps(d))
    names = sorted(src)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: src[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    lines = []
    import_qwen2_5_vl(ImportOptions(folder=str(folder), out=str(tmp_path / "ck"), image_size=32), log=lines.append)
    model, _ = load_checkpoint(tmp_path / "ck")

    mapped = {FAMILY.ours_of(k): k for k in src if not (tie and k == "lm_head.weight") and "rotary_emb" not in k}
    assert len(lines) == 1 and f"{len(mapped)} tensors" in lines[0]
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters" in lines[0]
    rows = model.cfg.lm.vocab_size
    got = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert set(got) == set(mapped) and ("lm.lm_head.weight" in got) != tie
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as st:
        assert (st.metadata().get("lm.lm_head.weight") == "lm.model.embed_tokens.weight") == tie
    grown = 0
    for ours, theirs in mapped.items():
        assert got[ours].dtype == torch.bfloat16, ours
        want = src[theirs]
        if got[ours].shape != want.shape:  # the embedding (and an untied head): our tokens' rows
            grown += 1
            assert got[ours].shape[0] == rows > want.shape[0]
            want = grow_rows(want, rows)
        assert torch.equal(got[ours], want), ours
    assert grown == (1 if tie else 2)

    ref = EchoModel(model.cfg)  # the import as it was: the whole model in memory, fp32
    own = ref.state_dict()
    with torch.no_grad():
        for ours, theirs in mapped.items():
            t = src[theirs]
            own[ours].copy_((grow_rows(t, rows) if t.shape != own[ours].shape else t).float())
    for (n, a), (m, b) in zip(ref.eval().state_dict().items(), model.state_dict().items()):
        assert n == m and a.dtype == b.dtype == torch.float32 and torch.equal(a, b), n
    for (n, a), (_, b) in zip(ref.named_buffers(), model.named_buffers()):
        assert torch.equal(a, b), n
    assert (model.lm.lm_head.weight is model.lm.model.embed_tokens.weight) == tie


# ---------------------------------------------------------------------------- export and runtime
def test_imported_student_exports_and_runs_in_the_runtime(vl, tmp_path):
    """import-hf (stage dcd) -> echo-export build -> echo-report on a PNG and a DICOM: the runtime's
    fp32 tokens are the PyTorch reference's (fused one-step, aligned reading, block-causal context)."""
    from PIL import Image

    from conftest import write_tiny_dataset
    from echo_export.cli import main as export_main
    from echo_train.decoding import fused_onestep_generate
    from echo_train.model.checkpoint import load_checkpoint
    from runtime.cli import main as report_main
    from runtime.preprocess import preprocess_image
    from test_preprocess import dicom_bytes

    folder = vl[0]
    r = _cli("import-hf", folder, "--out", tmp_path / "ck", "--stage", "dcd", "--block-size", "4", "--image-size", "32",
             "--max-response-tokens", "16")
    assert r.exit_code == 0, (r.output, r.exception)
    data = write_tiny_dataset(tmp_path / "data", n_train=2, n_test=2)
    r = CliRunner().invoke(export_main, ["build", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "engine"),
                                         "--precision", "fp32", "--data", str(data), "--verify-n", "2"])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["model_config"]["n_image_tokens"] == 16 and manifest["model_config"]["shifted_prediction"] is False

    grey = _grey(2)
    Image.fromarray(grey, mode="L").save(tmp_path / "a.png")
    (tmp_path / "b.dcm").write_bytes(dicom_bytes(_grey(5).astype(np.uint16) * 16))
    r = CliRunner().invoke(report_main, ["--engine-dir", str(tmp_path / "engine"), "--format", "json",
                                         str(tmp_path / "a.png"), str(tmp_path / "b.dcm")])
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    got = [json.loads(x)["tokens"] for x in r.output.strip().splitlines()]
    model, tok = load_checkpoint(tmp_path / "ck")
    px = torch.from_numpy(np.stack([preprocess_image(tmp_path / n, 32, model.cfg.vision.preprocess)
                                    for n in ("a.png", "b.dcm")]))
    want = fused_onestep_generate(model, tok, px, 4, 16).tokens
    print(f"\n[import-hf] runtime fp32 tokens {got} == PyTorch {want}")
    assert got == want and got[0] != got[1]
