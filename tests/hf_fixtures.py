"""Tiny Hugging Face folders written by the tests themselves (nothing is downloaded): a Qwen2 /
Qwen3 causal LM with a real byte-level BPE tokenizer.json in Qwen's layout, and SigLIP / ViT
vision models with their preprocessor_config.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import SAMPLE_REPORTS

# Qwen's own special tokens (in its tokenizer.json as added tokens); ours are added after them
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_qwen_tokenizer(folder: Path, texts=SAMPLE_REPORTS, vocab_size: int = 400) -> int:
    """A byte-level BPE in the layout of Qwen2's tokenizer.json (NFC normaliser, split regex then
    ByteLevel, Qwen's special tokens). Returns its number of ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from runtime.prompt import PROMPT_TEXT

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    qwen_split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen_split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # the prompt is deliberately NOT in the corpus: a real LM's tokenizer has never seen it
    tok.train_from_iterator(list(texts) * 4 + ["Write a report. " + PROMPT_TEXT[:20]], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


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


# Qwen2.5-VL's added tokens, in its order (ids after the BPE vocabulary)
QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


# Qwen2-VL / Qwen2.5-VL's chat template (as the hub's tokenizer_config.json carries it)
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def write_qwen_vl(folder: Path, mask: str = "config", image_size: int = 32, seed: int = 0, tie: bool = False,
                  chat_template: bool = False):
    """A tiny random Qwen2.5-VL folder as the hub ships one: config.json, model.safetensors,
    tokenizer.json with Qwen's special tokens (+ "<|MASK|>" as ECHO's checkpoints add it),
    tokenizer_config.json, generation_config.json, preprocessor_config.json.

    mask: where the mask token is named: "config" (mask_token_id), "tokenizer" (tokenizer_config
    mask_token) or "none" (only --mask-token can give it). chat_template: tokenizer_config.json
    carries Qwen's chat template."""
    import transformers
    from tokenizers import Tokenizer

    write_qwen_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([t for t in QWEN_VL_SPECIALS if tok.token_to_id(t) is None] + ["<|MASK|>"])
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN_VL_SPECIALS + ["<|MASK|>"]}
    n_ids = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=n_ids + 24, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie)
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
    d = json.loads((folder / "config.json").read_text())
    d.pop("mask_token_id", None)
    if mask == "config":
        d["mask_token_id"] = ids["<|MASK|>"]
    (folder / "config.json").write_text(json.dumps(d, indent=1))
    tcfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 1024}
    if mask == "tokenizer":
        tcfg["mask_token"] = "<|MASK|>"
    if chat_template:
        tcfg["chat_template"] = QWEN_VL_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}))
    px = image_size * image_size
    processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=px, max_pixels=px)
    processor.save_pretrained(folder)
    return model, ids
