"""A random-weight Qwen2.5-VL folder at a real model's sizes, written without building the model:

    python -m benchmarks.random_qwen_vl --size 3b --out DIR              # Qwen2.5-VL-3B-Instruct's shapes
    python -m benchmarks.random_qwen_vl --size 7b --out DIR              # Qwen2.5-VL-7B-Instruct's
    python -m benchmarks.random_qwen_vl --size 3b --layers 2 --vision-layers 2 --out DIR  # a quick check

What `echo-train import-hf` and then `echo-export build` run on to measure time and memory at full
scale on a machine without the hub's files (speed and memory do not depend on the values).

The tensors: names and shapes from `transformers`' Qwen2_5_VLForConditionalGeneration built on the
meta device (shapes only, no memory), renamed to the hub's layout as save_pretrained writes it
(`model.*`, `visual.*`, `lm_head.*`; no lm_head when the embeddings are tied). Values in bf16, as
the hub ships them: weights N(0, 0.02), norms 1, biases N(0, 0.02). They are generated and written
a chunk at a time into ~2 GB shards (`model-0000i-of-0000N.safetensors` +
`model.safetensors.index.json`), so the peak memory is one chunk, not a shard or the model.

The other files are the hub's, with a small BPE tokenizer trained here (the model's embedding keeps
the real vocabulary's rows; the special tokens take ids after the BPE's, and config.json names
those ids): config.json (with mask_token_id, as ECHO's published checkpoints have it),
tokenizer.json, tokenizer_config.json (Qwen's chat template), generation_config.json,
preprocessor_config.json. tests/hf_fixtures.py writes its tiny folders with the same functions.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

# Qwen's own special tokens (in its tokenizer.json as added tokens); ours are added after them
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5-VL's added tokens, in its order (ids after the BPE vocabulary)
QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
MASK_TOKEN = "<|MASK|>"  # as ECHO's published checkpoints add it
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

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

# The published configs' sizes (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct config.json)
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_chans=3)
_TEXT = dict(max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[16, 24, 24])
SIZES: dict[str, dict[str, Any]] = {
    "3b": dict(text=dict(_TEXT, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2),
               vision=dict(_VISION, out_hidden_size=2048), tie=True),
    "7b": dict(text=dict(_TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4),
               vision=dict(_VISION, out_hidden_size=3584), tie=False),
}
SHARD_BYTES = 2 * 10**9
CHUNK_ELEMENTS = 1 << 24  # random values made at a time: 64 MB of fp32, 32 MB of bf16
STD = 0.02


# ---------------------------------------------------------------------------- non-weight files
def train_qwen_tokenizer(folder: Path, texts: Iterable[str], vocab_size: int) -> int:
    """tokenizer.json: a byte-level BPE trained on `texts` in the layout of Qwen2's (NFC normaliser,
    split regex then ByteLevel, Qwen's special tokens). Returns its number of ids."""
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


def add_qwen_vl_specials(folder: Path) -> tuple[dict[str, int], int]:
    """Qwen2.5-VL's added tokens and the mask token into folder/tokenizer.json: their ids, and the
    tokenizer's number of ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([t for t in QWEN_VL_SPECIALS if tok.token_to_id(t) is None] + [MASK_TOKEN])
    tok.save(str(folder / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in QWEN_VL_SPECIALS + [MASK_TOKEN]}, tok.get_vocab_size(with_added_tokens=True)


def qwen_vl_config(text: dict[str, Any], vision: dict[str, Any], ids: dict[str, int], tie: bool):
    """transformers' Qwen2_5_VLConfig with the tokenizer's special ids. `text` takes rope_theta and
    mrope_section (made into rope_parameters) beside the config's own fields."""
    import transformers

    text = dict(text)
    rope = {"rope_type": "default", "rope_theta": float(text.pop("rope_theta", 10000.0)),
            "mrope_section": list(text.pop("mrope_section"))}
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(text, rope_parameters=rope, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(vision), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie)


def write_qwen_vl_files(folder: Path, ids: dict[str, int], mask: str = "config", chat_template: bool = False,
                        patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                        min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384, model_max_length: int = 1024) -> None:
    """Everything of a Qwen2.5-VL folder but its weights, tokenizer.json and config.json, which must
    be there (config.json gets mask_token_id): tokenizer_config.json, generation_config.json,
    preprocessor_config.json.

    mask: where the mask token is named: "config" (config.json mask_token_id), "tokenizer"
    (tokenizer_config.json mask_token) or "none" (only import-hf's --mask-token can give it).
    chat_template: tokenizer_config.json carries Qwen's chat template."""
    import transformers

    d = json.loads((folder / "config.json").read_text())
    d.pop("mask_token_id", None)
    if mask == "config":
        d["mask_token_id"] = ids[MASK_TOKEN]
    (folder / "config.json").write_text(json.dumps(d, indent=1))
    tcfg: dict[str, Any] = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": model_max_length}
    if mask == "tokenizer":
        tcfg["mask_token"] = MASK_TOKEN
    if chat_template:
        tcfg["chat_template"] = QWEN_VL_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}))
    processor = transformers.Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size,
                                                   temporal_patch_size=temporal_patch_size, min_pixels=min_pixels,
                                                   max_pixels=max_pixels, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor.save_pretrained(folder)


# ---------------------------------------------------------------------------- weights
def hub_name(name: str) -> str:
    """A parameter's name in `transformers`' model -> in the hub's files (what save_pretrained writes)."""
    for ours, hub in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(ours):
            return hub + name[len(ours):]
    return name


def tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(hub name, shape) of every tensor of the model of `cfg`, in the model's order, from a model
    built on the meta device. A tied lm_head is left out, as save_pretrained leaves it."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    tied = cfg.tie_word_embeddings
    return [(hub_name(n), tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)
            if not (tied and n == "lm_head.weight")]


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int, itemsize: int = 2) -> list[list[str]]:
    """Names per shard, in order, each shard under shard_bytes unless one tensor alone is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _random_chunks(name: str, shape: tuple[int, ...], gen) -> Iterable:
    """The tensor's bf16 values, CHUNK_ELEMENTS at a time: norms (the only 1-D weights: RMSNorm's
    and the merger's ln_q) 1, everything else N(0, STD)."""
    import torch

    norm = len(shape) == 1 and name.endswith(".weight")
    numel = math.prod(shape)
    for a in range(0, numel, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, numel - a)
        if norm:
            yield torch.ones(n, dtype=torch.bfloat16)
        else:
            yield torch.randn(n, generator=gen).mul_(STD).to(torch.bfloat16)


def write_random_weights(folder: Path, shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int = SHARD_BYTES,
                         seed: int = 0) -> int:
    """The shards and model.safetensors.index.json; returns the tensor bytes written."""
    import torch

    from echo_train.model.safetensors_stream import SafetensorsWriter, TensorSpec, byte_view

    shape_of = dict(shapes)
    shards = plan_shards(shapes, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        specs = [TensorSpec(n, torch.bfloat16, shape_of[n]) for n in names]
        with SafetensorsWriter(folder / fname, specs, {"format": "pt"}) as w:
            for spec in specs:
                w.start(spec.name)
                for chunk in _random_chunks(spec.name, spec.shape, gen):
                    w.write_bytes(byte_view(chunk))
                weight_map[spec.name] = fname
                total += spec.nbytes
        print(f"[random-qwen-vl] {fname}: {len(specs)} tensors, {sum(s.nbytes for s in specs) / 1e9:.2f} GB", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def report_corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Synthetic chest X-ray reports (the synth grammar's): what the BPE tokenizer is trained on."""
    import numpy as np

    from echo_train.data.synth.findings import sample_findings
    from echo_train.data.synth.reports import write_report

    rng = np.random.default_rng(seed)
    return [write_report(rng, sample_findings(rng))["report"] for _ in range(n)]


def sizes(size: str, layers: Optional[int] = None, vision_layers: Optional[int] = None) -> dict[str, Any]:
    """SIZES[size] (text, vision, tie), with fewer decoder layers / vision blocks where given (a
    cut-down model keeps only the full-attention blocks it still has)."""
    spec = SIZES[size]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    if layers is not None:
        text["num_hidden_layers"] = layers
    if vision_layers is not None:
        vision["depth"] = vision_layers
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_layers]
    return {"text": text, "vision": vision, "tie": spec["tie"]}


def write_random_qwen_vl(out: Path, text: dict[str, Any], vision: dict[str, Any], tie: bool,
                         shard_bytes: int = SHARD_BYTES, seed: int = 0, vocab: int = 2048) -> dict[str, Any]:
    """The whole folder `out` for these sizes (written beside it, then renamed into place; an
    existing `out` is replaced). Returns a summary."""
    from echo_train.model.checkpoint import swap_into_place

    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    train_qwen_tokenizer(tmp, report_corpus(), vocab)
    ids, n_ids = add_qwen_vl_specials(tmp)
    if n_ids > text["vocab_size"]:
        raise ValueError(f"the tokenizer's {n_ids} ids do not fit the model's {text['vocab_size']} rows")
    cfg = qwen_vl_config(text, vision, ids, tie)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(tmp)
    write_qwen_vl_files(tmp, ids, mask="config", chat_template=True, patch_size=vision["patch_size"],
                        merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"],
                        model_max_length=text["max_position_embeddings"])
    shapes = tensor_shapes(cfg)
    total = write_random_weights(tmp, shapes, shard_bytes, seed)
    swap_into_place(tmp, out)
    return {"parameters": sum(math.prod(s) for _, s in shapes), "tensors": len(shapes), "bytes": total,
            "files_bytes": sum(f.stat().st_size for f in out.iterdir()), "seconds": time.perf_counter() - t0}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.random_qwen_vl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", type=Path, required=True, help="the folder to write (replaced if it exists)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: the real model's)")
    ap.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9, help="shard size, GB (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    spec = sizes(a.size, a.layers, a.vision_layers)
    s = write_random_qwen_vl(a.out, **spec, shard_bytes=int(a.shard_gb * 1e9), seed=a.seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"[random-qwen-vl] {a.out}: Qwen2.5-VL-{a.size.upper()} shapes ({spec['text']['num_hidden_layers']} decoder "
          f"layers, {spec['vision']['depth']} vision blocks), {s['parameters'] / 1e9:.3f}B parameters in {s['tensors']} bf16 "
          f"tensors, {s['bytes'] / 1e9:.2f} GB of weights ({s['files_bytes'] / 1e9:.2f} GB on disk) in "
          f"{s['seconds']:.1f} s; peak RSS {peak / 1e9:.2f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
