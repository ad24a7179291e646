"""Tiny Hugging Face folders written by the tests themselves (nothing is downloaded): a Qwen2 /
Qwen3 causal LM with a real byte-level BPE tokenizer.json in Qwen's layout, and SigLIP / ViT
vision models with their preprocessor_config.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import SAMPLE_REPORTS

# A Qwen2.5-VL folder's files other than its weights: the benchmark's random full-size folders
# and the tiny ones here share one implementation. (CLIP_MEAN, CLIP_STD, QWEN_SPECIALS: for the tests.)
from benchmarks.random_qwen_vl import (CLIP_MEAN, CLIP_STD, QWEN_SPECIALS, add_qwen_vl_specials,  # noqa: F401
                                       qwen_vl_config, train_qwen_tokenizer, write_qwen_vl_files)


def write_qwen_tokenizer(folder: Path, texts=SAMPLE_REPORTS, vocab_size: int = 400) -> int:
    """A byte-level BPE in the layout of Qwen2's tokenizer.json (benchmarks/random_qwen_vl.py).
    Returns its number of ids."""
    return train_qwen_tokenizer(folder, texts, vocab_size)


def perturb_norms_and_biases(model: torch.nn.Module, scale: float = 0.1, weights: float = 0.05) -> None:
    """Random non-trivial norms and biases, so that every parameter matters in a parity check, and
    weights larger than the 0.02 init, so that attention (to the image, to earlier tokens) moves
    the outputs enough that a random model's reports differ between images and positions."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (scale if ("norm" in n or n.endswith("bias")) else weights))


def write_qwen_lm(folder: Path, kind: str = "qwen2", extra_rows: int = 0, tie: bool = False, seed: int = 0):
    """A tiny random Qwen2 / Qwen3 causal LM + tokenizer.json. `extra_rows`: embedding rows beyond
    the tokenizer (real Qwen checkpoints pad theirs to a multiple of 64 or more)."""
    import transformers

    n_ids = write_qwen_tokenizer(folder)
    torch.manual_seed(seed)
    common = dict(vocab_size=n_ids + extra_rows, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                  tie_word_embeddings=tie)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=24))
    perturb_norms_and_biases(model.eval())
    model.save_pretrained(folder, safe_serialization=True)
    return model


def write_vision(folder: Path, family: str = "siglip", image_size: int = 32, patch_size: int = 8, seed: int = 0,
                 mean=CLIP_MEAN, std=CLIP_STD):
    """A tiny random SigLIP / ViT vision model and its image processor config (CLIP mean/std, so
    that the normalisation is not the identity of our [-1, 1] pixels)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_channels=3)
    if family == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
        processor = transformers.SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                                      image_mean=mean, image_std=std)
    elif family == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**common), add_pooling_layer=False)
        processor = transformers.ViTImageProcessor(size={"height": image_size, "width": image_size},
                                                   image_mean=mean, image_std=std)
    elif family == "dinov2":  # built for a larger image than it runs at: DINOv2 interpolates its positions
        cfg = {**common, "image_size": 2 * image_size, "mlp_ratio": 2}
        cfg.pop("intermediate_size")
        model = transformers.Dinov2Model(transformers.Dinov2Config(**cfg))
        processor = transformers.BitImageProcessor(size={"shortest_edge": image_size}, do_center_crop=True,
                                                   crop_size={"height": image_size, "width": image_size},
                                                   image_mean=mean, image_std=std)
    else:
        raise ValueError(family)
    perturb_norms_and_biases(model.eval())
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model


def rewrite_config(folder: Path, **changes) -> None:
    p = folder / "config.json"
    d = json.loads(p.read_text())
    d.update(changes)
    p.write_text(json.dumps(d))


def write_qwen_vl(folder: Path, mask: str = "config", image_size: int = 32, seed: int = 0, tie: bool = False,
                  chat_template: bool = False):
    """A tiny random Qwen2.5-VL folder as the hub ships one: config.json, model.safetensors,
    tokenizer.json with Qwen's special tokens (+ "<|MASK|>" as ECHO's checkpoints add it),
    tokenizer_config.json, generation_config.json, preprocessor_config.json.

    mask: where the mask token is named: "config" (mask_token_id), "tokenizer" (tokenizer_config
    mask_token) or "none" (only --mask-token can give it). chat_template: tokenizer_config.json
    carries Qwen's chat template."""
    import transformers

    write_qwen_tokenizer(folder)
    ids, n_ids = add_qwen_vl_specials(folder)
    torch.manual_seed(seed)
    cfg = qwen_vl_config(
        text=dict(vocab_size=n_ids + 24, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                  rope_theta=10000.0, mrope_section=[2, 3, 3]),
        vision=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
        ids=ids, tie=tie)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random non-trivial norms and biases, and weights large enough to matter
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if ("norm" in n or n.endswith("bias")) else 0.05))
        # peaked attention: each masked position of a block then reads its own part of the context
        # (image, prompt), so that a random model's reports vary between images and positions
        for n, p in model.named_parameters():
            if "language_model" in n and ("q_proj" in n or "k_proj" in n):
                p.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    px = image_size * image_size
    write_qwen_vl_files(folder, ids, mask=mask, chat_template=chat_template, patch_size=4, merge_size=2,
                        temporal_patch_size=2, min_pixels=px, max_pixels=px)
    return model, ids
