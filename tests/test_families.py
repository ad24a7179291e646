"""The backbone families (echo_train/model/families/): every consumer asks a family, so these pin
what each one owns: which folders it takes (and the one refusal naming what takes the others), the
tower it builds and the image tokens it gives, and the tensor names of a Qwen2.5-VL folder."""
from __future__ import annotations

import json

import pytest
import torch

from echo_train.model import hf_folder
from echo_train.model.config import EchoConfig, VisionConfig
from echo_train.model.errors import PretrainedError
from echo_train.model.families import FAMILIES, VISION_FAMILIES, family_of_folder, vision_family
from echo_train.model.families.qwen2 import FAMILY as QWEN2
from echo_train.model.families.qwen2_5_vl import FAMILY as QWEN2_5_VL
from echo_train.model.vision import VisionEncoder

pytest.importorskip("transformers")


def test_every_family_has_its_own_names_and_a_command():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(set(types)) == len(types)  # a folder's model_type picks one family
    assert all(f.title and f.taken_by and f.command.endswith(f.taken_by) for f in FAMILIES)
    assert set(VISION_FAMILIES) == {"vit", "siglip", "dinov2", "qwen2_5_vl"}
    with pytest.raises(ValueError, match="unknown vision family 'clip'"):
        vision_family("clip")


@pytest.mark.parametrize("model_type,taken_by,family", [
    ("vit", "--init-vision", "vit"), ("siglip", "--init-vision", "siglip"),
    ("siglip_vision_model", "--init-vision", "siglip"), ("dinov2", "--init-vision", "dinov2"),
    ("qwen2", "--init-lm", "qwen2"), ("qwen3", "--init-lm", "qwen2"), ("qwen2_5_vl", "import-hf", "qwen2_5_vl")])
def test_a_folder_goes_to_the_family_of_its_model_type(tmp_path, model_type, taken_by, family):
    assert family_of_folder(tmp_path, {"model_type": model_type}, taken_by).name == family


def test_a_folder_for_another_command_is_refused_naming_that_command(tmp_path):
    with pytest.raises(PretrainedError, match=r"'qwen2_5_vl' \(Qwen2_5_VLForConditionalGeneration\); --init-lm takes "
                                              r"Qwen2, Qwen2.5 or Qwen3 causal LM \(model_type qwen2, qwen3\) "
                                              r"\(a Qwen2.5-VL folder: echo-train import-hf\)"):
        family_of_folder(tmp_path, {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]},
                         "--init-lm")
    with pytest.raises(PretrainedError, match=r"import-hf takes Qwen2.5-VL .*echo-train stage1 --init-lm"):
        family_of_folder(tmp_path, {"model_type": "qwen3"}, "import-hf")
    with pytest.raises(PretrainedError, match=r"--init-vision takes SigLIP, ViT or DINOv2 \(model_type dinov2, siglip, "
                                              r"siglip_vision_model, vit\)$"):
        family_of_folder(tmp_path, {"model_type": "clip_vision_model"}, "--init-vision")


def _qwen2_5_vl_config() -> dict:
    return {"model_type": "echo_qwen2_5_vl", "auto_map": {"AutoModel": "modeling_echo.Echo"},
            "rope_scaling": {"mrope_section": [2, 2, 4]},
            "vision_config": {"fullatt_block_indexes": [1], "window_size": 112, "out_hidden_size": 64}}


def test_remote_code_folders_are_taken_by_their_config_alone(tmp_path):
    d = _qwen2_5_vl_config()
    assert family_of_folder(tmp_path, d, "import-hf") is QWEN2_5_VL
    del d["vision_config"]["window_size"], d["rope_scaling"]
    with pytest.raises(PretrainedError, match="remote code; its config lacks vision_config.window_size, "
                                              "rope_parameters.mrope_section"):
        family_of_folder(tmp_path, d, "import-hf")


def test_qwen_decoder_configs():
    d = {"model_type": "qwen3", "vocab_size": 50, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rope_theta": 5e5}
    lm = QWEN2.lm_config(d)
    assert (lm.qk_norm, lm.attention_bias, lm.head_dim, lm.rope_theta, lm.tie_word_embeddings) == (True, False, 32, 5e5, False)
    lm = QWEN2.lm_config({**d, "model_type": "qwen2", "head_dim": None, "tie_word_embeddings": True})
    assert (lm.qk_norm, lm.attention_bias, lm.head_dim, lm.max_position_embeddings) == (False, True, 16, 2048)
    with pytest.raises(PretrainedError, match="incomplete qwen2 configuration"):
        QWEN2.config_of(hf_folder.Path("f"), {"model_type": "qwen2"})


@pytest.mark.parametrize("family,cls_tokens", [("vit", 1), ("siglip", 0), ("dinov2", 1)])
def test_transformers_towers_give_the_patch_tokens_only(family, cls_tokens):
    torch.manual_seed(0)
    cfg = VisionConfig(family=family, image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64, num_channels=1)
    enc = VisionEncoder(cfg, lm_width=48).eval()
    px = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        hidden = enc.tower(pixel_values=px).last_hidden_state
        out = enc(px)
    assert hidden.shape[1] == cfg.n_image_tokens + cls_tokens
    assert out.shape == (2, cfg.n_image_tokens, 48)
    with torch.no_grad():
        assert torch.equal(out, enc.projector(hidden[:, cls_tokens:]))


def test_old_configs_with_pretrained_path_still_load():
    d = EchoConfig().to_dict()
    assert "pretrained_path" not in d["vision"]
    d["vision"]["pretrained_path"] = None  # written by every version before the field went
    assert EchoConfig.from_dict(json.loads(json.dumps(d))) == EchoConfig()


def test_qwen2_5_vl_tensor_names_in_both_layouts():
    for hub, ours in (("visual.blocks.0.attn.qkv.weight", "vision.tower.blocks.0.attn.qkv.weight"),
                      ("model.visual.merger.mlp.0.bias", "vision.tower.merger.mlp.0.bias"),
                      ("model.layers.3.mlp.up_proj.weight", "lm.model.layers.3.mlp.up_proj.weight"),
                      ("model.language_model.norm.weight", "lm.model.norm.weight"),
                      ("lm_head.weight", "lm.lm_head.weight"), ("extra.weight", None)):
        assert QWEN2_5_VL.ours_of(hub) == ours


def test_embedding_rows_grow_alike_in_memory_and_streamed(monkeypatch):
    """grow_rows (--init-lm, in memory) and import-hf's streamed copy share grown_row_blocks: the
    same rows and the same mean row, bit for bit, whatever the block size."""
    monkeypatch.setattr(hf_folder, "ROW_BLOCK_ELEMENTS", 3 * 8)  # blocks of 3 rows of width 8
    w = torch.randn(10, 8).to(torch.bfloat16)
    grown = hf_folder.grow_rows(w, 13)
    assert grown.shape == (13, 8) and torch.equal(grown[:10], w)
    want = w.double().mean(0).float().to(torch.bfloat16)
    assert torch.equal(grown[10:], want.expand(3, -1))
    blocks = list(hf_folder.grown_row_blocks(lambda a, b: w[a:b].clone(), (10, 8), 13, w.dtype))
    assert [b.shape[0] for b in blocks] == [3, 3, 3, 1, 3]
    assert torch.equal(torch.cat(blocks), grown)
    assert hf_folder.grow_rows(w, 10) is w
