"""benchmarks/random_qwen_vl.py: random Qwen2.5-VL folders at the published sizes, in the hub's
layout, that `transformers` loads with every tensor in place and import-hf takes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.random_qwen_vl import SIZES, qwen_vl_config, sizes, tensor_shapes, write_random_qwen_vl

transformers = pytest.importorskip("transformers")


def test_sizes_are_the_published_models():
    """Parameter counts from the shapes alone (a meta-device model): 3.75B (tied) and 8.29B."""
    ids = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                       "<|vision_start|>", "<|vision_end|>"])}
    counts = {}
    for size in SIZES:
        s = sizes(size)
        shapes = tensor_shapes(qwen_vl_config(s["text"], s["vision"], ids, s["tie"]))
        counts[size] = sum(math.prod(shape) for _, shape in shapes)
        assert ("lm_head.weight" in dict(shapes)) != s["tie"]
    assert counts == {"3b": 3_754_622_976, "7b": 8_292_166_656}
    cut = sizes("3b", layers=2, vision_layers=9)
    assert cut["text"]["num_hidden_layers"] == 2 and cut["vision"]["fullatt_block_indexes"] == [7]
    assert SIZES["3b"]["text"]["num_hidden_layers"] == 36  # the table itself is left alone


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_folder_loads_in_transformers_and_imports(tmp_path, tie):
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from echo_train.model.checkpoint import load_checkpoint
    from echo_train.model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl

    text = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1e6,
                mrope_section=[2, 3, 3])
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1], in_chans=3)
    out = tmp_path / "vl"
    s = write_random_qwen_vl(out, text, vision, tie, shard_bytes=60_000, vocab=400)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == s["bytes"] == 2 * s["parameters"]
    assert not (tmp_path / "vl.writing").exists()

    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert model.config.tie_word_embeddings == tie
    cfg = json.loads((out / "config.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("mask_token_id", "<|MASK|>")):
        assert cfg[key] == tok.token_to_id(token), key
    with safe_open(str(out / shards[0]), framework="pt") as st:
        assert st.metadata() == {"format": "pt"}
    values = {}
    for f in shards:
        with safe_open(str(out / f), framework="pt") as st:
            values.update({k: st.get_tensor(k) for k in st.keys()})
    assert all(v.dtype == torch.bfloat16 for v in values.values())
    assert torch.equal(values["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(values["visual.merger.ln_q.weight"], torch.ones(32, dtype=torch.bfloat16))
    for k in ("model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.bias", "model.embed_tokens.weight"):
        assert abs(values[k].float().std().item() - 0.02) < 0.005, k

    import_qwen2_5_vl(ImportOptions(folder=str(out), out=str(tmp_path / "ck"), image_size=32), log=lambda *a: None)
    echo, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(echo.lm.model.layers[1].mlp.down_proj.weight, values["model.layers.1.mlp.down_proj.weight"].float())
    assert (echo.lm.lm_head.weight is echo.lm.model.embed_tokens.weight) == tie
