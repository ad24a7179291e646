"""Import a Qwen2.5-VL-architecture Hugging Face folder (ECHO's published checkpoints, Lingshu,
Qwen2.5-VL itself) as an ECHO checkpoint: `echo-train import-hf`.

The folder's safetensors load by name into ECHO's model: the decoder (backbone.QwenDecoder with
Qwen2.5-VL's multimodal rotary positions, backbone.mrope_cos_sin) and the vision tower
(qwen2_5_vl_vision.Qwen25VisionTower). Both checkpoint layouts are read: the hub's
(`model.layers.*`, `visual.*`) and the one newer `transformers` keeps in memory
(`model.language_model.*`, `model.visual.*`).

Export needs fixed shapes, so the image is resized to one square grid chosen here (default
448 px -> 32 x 32 patches -> 16 x 16 = 256 image tokens), recorded in the config.

Special tokens. ECHO's decoders and runtime read the roles pad / eos / mask / image / bos from the
tokenizer by the names in runtime/special_tokens.py. The imported model already has tokens for
most roles; those tokens take our names in the checkpoint's tokenizer.json, so the model keeps its
own ids and embedding rows:
- mask: config.json `mask_token_id`, else the tokenizer's mask token (tokenizer_config.json
  `mask_token`), else the --mask-token option, as the official inference code resolves it;
- eos: generation_config.json `eos_token_id` (its first), else config.json's;
- image: config.json `image_token_id` (`<|image_pad|>`);
- pad: config.json / tokenizer_config.json pad token, else added;
- bos: Qwen has none; added as a new special token (a new embedding row at the mean of the others).

The prompt: the folder's chat template rendered for one image and the instruction
(qwen2_5_vl_prompt.py), recorded in the config as a runtime.prompt.PromptTemplate; ECHO's own prefix
where the folder has no chat template (or with --no-chat-template).

Decode conventions (recorded in the config, so every decoder and graph follows): the new block is
read from its own positions (shifted_prediction=False) and the clean context is block-causal
(causal_context=False), as in the official inference code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from runtime.native_image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from runtime.preprocess import PREPROCESS_MODES
from runtime.prompt import DEFAULT_IMPORT_PROMPT, PAD_NONE, PAD_START, PROMPT_PRESETS, SUPPORTED_BLOCK_SIZES
from runtime.schedule import DECODE_LAYOUTS, LAYOUT_ECHO, LAYOUT_OFFICIAL
from runtime.special_tokens import BOS, EOS, IMAGE, MASK, PAD
from runtime.text import ReportTokenizer

from .config import STAGES, EchoConfig, LMConfig, VisionConfig
from .pretrained import (PretrainedError, RowMean, check_folder, names_preview, read_json, refuse_unmapped, row_block,
                         weight_files)
from .safetensors_stream import (SafetensorsFormatError, SafetensorsWriter, TensorEntry, TensorSpec, byte_view,
                                 copy_bytes, read_header, read_rows)

MODEL_TYPES = ("qwen2_5_vl",)
OFFICIAL_MASK_TOKEN = "<|MASK|>"
DEFAULT_IMAGE_SIZE = 448  # 32 x 32 patches of 14 px -> 256 image tokens after the 2 x 2 merger
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # Qwen2-VL's processor defaults
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ImportOptions:
    folder: str
    out: str
    stage: str = "dcd"
    block_size: int = 8
    image_size: int = DEFAULT_IMAGE_SIZE
    mask_token: Optional[str] = None  # a token (string) to use when the folder names none
    max_response_tokens: int = 256
    # The prompt (qwen2_5_vl_prompt.py): the folder's chat template rendered for one image and the
    # instruction (None: runtime.prompt.PROMPT_TEXT), with the system turn `system` (None: the
    # template's own default). chat_template=False, or a folder without one: ECHO's own prefix.
    chat_template: bool = True
    # runtime/preprocess.PREPROCESS_MODES: "processor" prepares images as Qwen2-VL's image processor
    # does at the fixed grid (how the published checkpoints saw them); "echo": ECHO's own.
    preprocess: str = "processor"
    instruction: Optional[str] = None  # the user turn's text; None: the `prompt` preset's
    system: Optional[str] = None
    # runtime/prompt.PROMPT_PRESETS: the official inference code's instructions by name
    prompt: str = DEFAULT_IMPORT_PROMPT
    # runtime/schedule.DECODE_LAYOUTS: "official" (the official inference code's: prompt unpadded, the
    # block grid from its first token, argmax over every id) or "echo" (the prompt left-padded to
    # whole blocks of 16, the mask token never an answer: how the engines of earlier versions decoded)
    layout: str = LAYOUT_OFFICIAL
    # Native resolution: each image at the processor's grid for it (aspect ratio kept, its pixels
    # within [min_pixels, max_pixels]), as the official code runs; False: every image at the one
    # square image_size grid. min_pixels None: the folder's preprocessor_config.json's.
    native: Optional[bool] = None  # None: native in the official layout with a chat template
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: Optional[int] = None


# ---------------------------------------------------------------------------- configuration
def _text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings: hub configs keep them at the top level, newer ones in text_config."""
    return {**d, **(d.get("text_config") or {})}


def _rope(text: dict[str, Any]) -> tuple[float, list[int]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = float(text.get("rope_theta") or rope.get("rope_theta") or 1000000.0)
    section = rope.get("mrope_section")
    if not section:
        raise PretrainedError("config.json: no mrope_section (rope_scaling / rope_parameters): not a Qwen2.5-VL decoder")
    return theta, [int(x) for x in section]


# What only a Qwen2.5-VL vision tower's config has (Qwen2-VL's has none of them)
QWEN2_5_VL_VISION_KEYS = ("fullatt_block_indexes", "window_size", "out_hidden_size")


def _is_qwen2_5_vl_shaped(d: dict[str, Any]) -> bool:
    """A folder whose own model class is remote code (the released ECHO checkpoints: `auto_map`, their
    own architecture names) but whose config is Qwen2.5-VL's: its vision tower's settings and the
    decoder's mrope_section. Recognised from the config alone: no remote code is ever executed."""
    return bool(d.get("auto_map")) and not _missing_qwen2_5_vl(d)


def _missing_qwen2_5_vl(d: dict[str, Any]) -> list[str]:
    vision = d.get("vision_config") if isinstance(d.get("vision_config"), dict) else {}
    rope = _text_config(d).get("rope_parameters") or _text_config(d).get("rope_scaling") or {}
    missing = [f"vision_config.{k}" for k in QWEN2_5_VL_VISION_KEYS if k not in vision]
    return missing + ([] if rope.get("mrope_section") else ["rope_parameters.mrope_section"])


def configs_from_folder(folder: Path, opts: ImportOptions) -> tuple[EchoConfig, dict[str, Any]]:
    d = read_json(folder / "config.json", "the model's configuration")
    mt = d.get("model_type")
    if mt not in MODEL_TYPES and not _is_qwen2_5_vl_shaped(d):
        arch = ", ".join(d.get("architectures") or []) or "no architectures listed"
        hint = " (a Qwen2 / Qwen3 LM: echo-train stage1 --init-lm)" if mt in ("qwen2", "qwen3") else ""
        if d.get("auto_map"):  # remote code (never run): say which Qwen2.5-VL setting its config lacks
            hint = f" (its model class is remote code; its config lacks {', '.join(_missing_qwen2_5_vl(d))})"
        raise PretrainedError(f"{folder}: unsupported architecture {mt!r} ({arch}); import-hf takes Qwen2.5-VL "
                              f"(model_type qwen2_5_vl){hint}")
    vision = d.get("vision_config")
    if not isinstance(vision, dict):
        raise PretrainedError(f"{folder / 'config.json'}: no vision_config")
    text = _text_config(d)
    theta, section = _rope(text)
    try:
        heads = int(text["num_attention_heads"])
        lm = LMConfig(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]), num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text["hidden_size"]) // heads, rope_theta=theta, rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            qk_norm=False, attention_bias=True, tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)), mrope_section=section)
        patch, merge = int(vision.get("patch_size", 14)), int(vision.get("spatial_merge_size", 2))
        hidden = int(vision["hidden_size"])
        out_width = int(vision["out_hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{folder / 'config.json'}: incomplete Qwen2.5-VL configuration ({e!r})") from None
    if out_width != lm.hidden_size:
        raise PretrainedError(f"{folder}: the vision merger writes width {out_width}, the decoder takes {lm.hidden_size}")
    if opts.image_size % (patch * merge):
        raise PretrainedError(f"--image-size {opts.image_size} is not a multiple of patch x merge = {patch * merge} px")
    llm_grid = opts.image_size // patch // merge
    # at a fixed grid the rotary positions follow from the token index; natively each image has its
    # own grid, so the graphs take explicit (time, row, column) positions instead (backbone.rotary)
    lm.mrope_image_grid = None if opts.native else [llm_grid, llm_grid]
    lo, hi = _pixel_bounds(folder, opts) if opts.native else (None, None)
    mean, std = _mean_std(folder)
    vcfg = VisionConfig(family="qwen2_5_vl", image_size=opts.image_size, patch_size=patch, merge_size=merge,
                        hidden_size=hidden, num_hidden_layers=int(vision.get("depth", 32)),
                        num_attention_heads=int(vision.get("num_heads", 16)),
                        intermediate_size=int(vision.get("intermediate_size", hidden * 4)),
                        num_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
                        hf_config={k: v for k, v in vision.items() if k not in ("dtype", "torch_dtype")},
                        image_mean=mean, image_std=std, preprocess=opts.preprocess, native=opts.native,
                        min_pixels=lo, max_pixels=hi)
    cfg = EchoConfig(lm=lm, vision=vcfg, stage=opts.stage, block_size=opts.block_size,
                     max_response_tokens=opts.max_response_tokens,
                     shifted_prediction=False, causal_context=False)
    return cfg, d


def _processor_config(folder: Path) -> dict[str, Any]:
    p = folder / "preprocessor_config.json"
    if not p.is_file():
        raise PretrainedError(f"{folder}: no preprocessor_config.json (the image processor's mean, std and pixel "
                              "bounds are read from it)")
    return read_json(p, "the image processor's configuration")


def _mean_std(folder: Path) -> tuple[list[float], list[float]]:
    pre = _processor_config(folder)
    mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
    return [float(x) for x in mean], [float(x) for x in std]


def _pixel_bounds(folder: Path, opts: ImportOptions) -> tuple[int, int]:
    """(min_pixels, max_pixels) of native resolution: --min-pixels, else the folder's processor's
    (`min_pixels`, or `size.shortest_edge` as newer processors write it); --max-pixels (the official
    code passes 2,250,000 whatever the folder says)."""
    pre = _processor_config(folder)
    lo = opts.min_pixels or pre.get("min_pixels") or (pre.get("size") or {}).get("shortest_edge") or DEFAULT_MIN_PIXELS
    if not 0 < int(lo) <= opts.max_pixels:
        raise PretrainedError(f"--max-pixels {opts.max_pixels} is below the processor's min_pixels {lo}")
    return int(lo), int(opts.max_pixels)


# ---------------------------------------------------------------------------- tokenizer
def _token_name(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first_id(value: Any) -> Optional[int]:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def _first_of(*ids: Optional[int]) -> Optional[int]:
    """The first id that is given (0 is an id, not a missing one)."""
    return next((i for i in ids if i is not None), None)


def roles_of(folder: Path, cfg: dict[str, Any], tok_json: dict[str, Any], mask_option: Optional[str]) -> dict[str, Any]:
    """Our role name -> the folder's token (its id), or None where the role gets a new token."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(tok_json))
    tcfg = read_json(folder / "tokenizer_config.json", "") if (folder / "tokenizer_config.json").is_file() else {}
    gen = read_json(folder / "generation_config.json", "") if (folder / "generation_config.json").is_file() else {}
    text = _text_config(cfg)

    def by_name(name: Optional[str]) -> Optional[int]:
        return None if name is None else tokenizer.token_to_id(name)

    mask = _first_id(cfg.get("mask_token_id"))
    if mask is None:
        mask = by_name(_token_name(tcfg.get("mask_token")))
    if mask is None and mask_option:
        mask = by_name(mask_option)
        if mask is None:
            mask = mask_option  # a new token, added under our name
    if mask is None:
        mask = by_name(OFFICIAL_MASK_TOKEN)  # the official code's last resort: the id of <|MASK|>
    if mask is None:
        raise PretrainedError(f"{folder}: no mask token: config.json has no mask_token_id, the tokenizer no "
                              f"mask_token and no {OFFICIAL_MASK_TOKEN}; pass --mask-token TOKEN")
    # the official decoders stop at the tokenizer's eos_token: it comes first
    eos = _first_of(by_name(_token_name(tcfg.get("eos_token"))), _first_id(gen.get("eos_token_id")),
                    _first_id(cfg.get("eos_token_id")), _first_id(text.get("eos_token_id")))
    if eos is None:
        raise PretrainedError(f"{folder}: the tokenizer lacks an end-of-text token: no eos_token_id in "
                              "generation_config.json or config.json, no eos_token in tokenizer_config.json")
    image = _first_id(cfg.get("image_token_id"))
    if image is None:
        image = by_name("<|image_pad|>")
    if image is None:
        raise PretrainedError(f"{folder}: the tokenizer lacks the image placeholder token (config.json image_token_id, "
                              "<|image_pad|>)")
    pad = _first_of(_first_id(cfg.get("pad_token_id")), _first_id(text.get("pad_token_id")),
                    by_name(_token_name(tcfg.get("pad_token"))))
    return {MASK: mask, EOS: eos, IMAGE: image, PAD: pad, BOS: None}


def rename_roles(folder: Path, tok_json: dict[str, Any], roles: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json with each role's token renamed to our role name, keeping every id.

    Only added (special) tokens can take a role. `tokenizers` gives an added token the id of its
    text in the model's vocabulary when it is there, so a token is renamed in both places."""
    out = json.loads(json.dumps(tok_json))
    added = {int(t["id"]): t for t in out.get("added_tokens", [])}
    vocab = (out.get("model") or {}).get("vocab")
    ids = [v for v in roles.values() if isinstance(v, int)]
    if len(ids) != len(set(ids)):
        raise PretrainedError(f"{folder}: one token plays two roles ({roles}); ECHO needs distinct pad, eos, mask, "
                              "image tokens")
    for role, tid in roles.items():
        if not isinstance(tid, int):
            continue
        entry = added.get(tid)
        if entry is None:
            raise PretrainedError(f"{folder}: the {role} token (id {tid}) is not an added special token of "
                                  "tokenizer.json; it cannot take that role")
        old = entry["content"]
        entry["content"], entry["special"] = role, True
        if isinstance(vocab, dict) and vocab.get(old) == tid:
            vocab[role] = vocab.pop(old)
    return out


def check_ids_kept(folder: Path, tokenizer, tok_json: dict[str, Any]) -> None:
    """Every added token still has the id the folder gave it (the model's embedding rows)."""
    moved = [f"{t['content']} {t['id']}->{tokenizer.token_to_id(t['content'])}" for t in tok_json.get("added_tokens", [])
             if tokenizer.token_to_id(t["content"]) != int(t["id"])]
    if moved:
        raise PretrainedError(f"{folder / 'tokenizer.json'}: added tokens do not keep their ids: {names_preview(moved)}")


def import_tokenizer(folder: Path, cfg: dict[str, Any], mask_option: Optional[str]) -> tuple[ReportTokenizer, dict]:
    from tokenizers import Tokenizer

    from ..data.tokenizer import lost_prompt_text

    p = folder / "tokenizer.json"
    if not p.is_file():
        raise PretrainedError(f"{folder}: no tokenizer.json")
    try:
        tok_json = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{p}: not valid JSON ({e})") from None
    roles = roles_of(folder, cfg, tok_json, mask_option)
    renamed = rename_roles(folder, tok_json, roles)
    tmp = Tokenizer.from_str(json.dumps(renamed))
    check_ids_kept(folder, tmp, renamed)
    missing = [r for r in (PAD, EOS, MASK, IMAGE, BOS) if tmp.token_to_id(r) is None]
    if missing:
        tmp.add_special_tokens(missing)
    tok = ReportTokenizer(tmp)
    tok.added_special_tokens = missing
    lost = lost_prompt_text(tok)
    if lost:
        raise PretrainedError(f"{p}: the tokenizer lacks the tokens to encode the prompt (lost: {lost!r})")
    return tok, {r: (v if isinstance(v, int) else None) for r, v in roles.items()}


def _check_image_before_last_blocks(template, cfg: EchoConfig) -> None:
    """The fused decoder feeds the prompt's last whole block and its tail as token ids: the image
    must end before them, whatever the prompt's length modulo the block size."""
    need = 2 * cfg.block_size - 1
    if len(template.after) < need:
        raise PretrainedError(f"the prompt has {len(template.after)} tokens after the image; block size {cfg.block_size} "
                              f"needs at least {need} there (its last whole block and tail are decoded as token ids): "
                              "use a longer --instruction")


def prompt_template(folder: Path, opts: ImportOptions, image_id: int):
    """The folder's chat prompt as a template (None: ECHO's own prefix), ids of its own tokenizer."""
    from tokenizers import Tokenizer

    from .qwen2_5_vl_prompt import chat_prompt_template

    if not opts.chat_template:
        if opts.instruction is not None or opts.system is not None:
            raise PretrainedError("--instruction / --system shape the chat prompt; they do not apply with "
                                  "--no-chat-template")
        return None
    if opts.prompt not in PROMPT_PRESETS:
        raise PretrainedError(f"--prompt {opts.prompt!r}: choose from {', '.join(PROMPT_PRESETS)}")
    instruction = PROMPT_PRESETS[opts.prompt] if opts.instruction is None else opts.instruction
    pad = PAD_NONE if opts.layout == LAYOUT_OFFICIAL else PAD_START
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = chat_prompt_template(folder, original, original.id_to_token(image_id), instruction, opts.system, pad)
    if template is not None and opts.instruction is None:
        template = replace(template, info={**template.info, "preset": opts.prompt})
    return template


# ---------------------------------------------------------------------------- weights
def our_name(name: str) -> Optional[str]:
    """A checkpoint tensor's name in EchoModel, or None when it has no place there."""
    for prefix, ours in (("model.visual.", "vision.tower."), ("visual.", "vision.tower."),
                         ("model.language_model.", "lm.model."), ("lm_head.", "lm.lm_head."), ("model.", "lm.model.")):
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return None


SourceIndex = dict[str, tuple[Path, TensorEntry]]  # checkpoint name -> (its file, its header entry)


def tensor_index(files: list[Path]) -> SourceIndex:
    """name -> (file, header entry: dtype, shape, bytes) of every tensor, from the headers alone."""
    out: SourceIndex = {}
    for f in files:
        try:
            out.update((name, (f, e)) for name, e in read_header(f).items())
        except (SafetensorsFormatError, OSError) as e:
            raise PretrainedError(f"{f}: unreadable safetensors file ({e})") from None
    return out


def plan_weights(folder: Path, model, index: SourceIndex) -> dict[str, str]:
    """Checkpoint name -> our name for every tensor; refused when any does not map. `model` may
    hold meta parameters (shapes only): nothing is read here."""
    own = model.state_dict()
    tied = model.cfg.lm.tie_word_embeddings
    rows = model.cfg.lm.vocab_size
    mapping, unexpected, wrong = {}, [], []
    for name, (_, entry) in sorted(index.items()):
        if "rotary_emb" in name:
            continue
        ours = our_name(name)
        if ours == "lm.lm_head.weight" and tied:
            continue
        if ours is None or ours not in own:
            unexpected.append(name)
            continue
        shape, want = entry.shape, tuple(own[ours].shape)
        grown = ours in ("lm.model.embed_tokens.weight", "lm.lm_head.weight") and shape[0] <= rows and shape[1:] == want[1:]
        if shape != want and not grown:
            wrong.append(f"{name} {shape} vs {want}")
            continue
        mapping[name] = ours
    skip = {"lm.lm_head.weight"} if tied else set()
    missing = sorted(set(own) - set(mapping.values()) - skip)
    refuse_unmapped(folder, "a Qwen2.5-VL model", unexpected, missing, wrong)
    return mapping


def write_weights(path: Path, model, index: SourceIndex, mapping: dict[str, str]) -> int:
    """model.safetensors straight from the source files: each tensor under our name in its own
    dtype (bf16 stays bf16; loading converts), its bytes copied a chunk at a time, the embedding
    (and an untied head) grown to our rows with the mean row (grow_rows). Memory: one chunk, never
    a whole tensor or model. A tied head is not written (it is the embedding), as save_model
    leaves one name of a tied pair and records the other in the metadata. Returns the bytes written."""
    own = model.state_dict()  # shapes only
    by_ours = {ours: name for name, ours in mapping.items()}
    specs = [TensorSpec(ours, index[by_ours[ours]][1].dtype, tuple(own[ours].shape)) for ours in sorted(by_ours)]
    meta = {"format": "pt"}
    if model.cfg.lm.tie_word_embeddings:
        meta["lm.lm_head.weight"] = "lm.model.embed_tokens.weight"
    files: dict[Path, object] = {}
    try:
        with SafetensorsWriter(path, specs, meta) as w:
            for spec in specs:
                src, entry = index[by_ours[spec.name]]
                if src not in files:
                    files[src] = open(src, "rb", buffering=0)
                f = files[src]
                w.start(spec.name)
                if entry.shape == spec.shape:
                    for chunk in copy_bytes(f, entry):
                        w.write_bytes(chunk)
                    continue
                width = entry.shape[1]  # grown rows: copy the rows, summing them, then the mean row
                acc, step = RowMean(width), row_block(width)
                for a in range(0, entry.shape[0], step):
                    block = read_rows(f, entry, a, min(a + step, entry.shape[0]))
                    acc.add(block)
                    w.write_bytes(byte_view(block))
                w.write_bytes(byte_view(acc.mean(entry.dtype).expand(spec.shape[0] - entry.shape[0], -1).contiguous()))
    finally:
        for f in files.values():
            f.close()
    return w.total


# ---------------------------------------------------------------------------- the import
def import_qwen2_5_vl(opts: ImportOptions, log=print) -> Path:
    """Check everything, then write the ECHO checkpoint folder opts.out (nothing written on refusal)."""
    from ..data.tokenizer import tokenizer_rows
    from .checkpoint import parameters_on_meta, write_checkpoint
    from .echo_model import EchoModel

    if opts.stage not in STAGES:
        raise PretrainedError(f"--stage {opts.stage!r}: choose from {', '.join(STAGES)}")
    if opts.preprocess not in PREPROCESS_MODES:
        raise PretrainedError(f"--preprocess {opts.preprocess!r}: choose from {', '.join(PREPROCESS_MODES)}")
    if opts.block_size not in SUPPORTED_BLOCK_SIZES:
        raise PretrainedError(f"--block-size {opts.block_size}: choose from {SUPPORTED_BLOCK_SIZES}")
    folder = check_folder(opts.folder, "import-hf")
    if opts.native is None:  # native where the official layout applies: the folder's chat prompt
        from .qwen2_5_vl_prompt import find_chat_template

        has_template = opts.chat_template and find_chat_template(folder) is not None
        opts = replace(opts, native=opts.layout == LAYOUT_OFFICIAL and has_template)
    cfg, raw = configs_from_folder(folder, opts)
    files = weight_files(folder)
    index = tensor_index(files)
    tok, roles = import_tokenizer(folder, raw, opts.mask_token)
    template = prompt_template(folder, opts, roles[IMAGE])
    if opts.layout not in DECODE_LAYOUTS:
        raise PretrainedError(f"--layout {opts.layout!r}: choose from {', '.join(DECODE_LAYOUTS)}")
    layout = opts.layout if template is not None else LAYOUT_ECHO  # ECHO's own prefix: ECHO's own layout
    if opts.native and layout != LAYOUT_OFFICIAL:
        raise PretrainedError("native resolution decodes in the official layout (the chat template, --layout "
                              "official); pass --fixed-grid with --layout echo or --no-chat-template")
    cfg = replace(cfg, prompt=None if template is None else template.to_dict(), decode_layout=layout)
    if template is not None:
        _check_image_before_last_blocks(template, cfg)
    tok.template = template
    cfg.lm.vocab_size = max(cfg.lm.vocab_size, tokenizer_rows(tok))
    with parameters_on_meta():  # shapes only: the weights go from the source files to ours unloaded
        model = EchoModel(cfg)
    mapping = plan_weights(folder, model, index)
    out = write_checkpoint(opts.out, cfg, lambda p: write_weights(p, model, index, mapping), tok)
    prompt_txt = "ECHO's own prompt (no chat template)" if template is None else (
        f"the chat prompt of {template.info['source']} ({len(tok.prefix_ids(cfg.n_image_tokens))} tokens, image at "
        f"{cfg.image_start})")
    roles_txt = ", ".join(f"{r}={tok.tok.token_to_id(r)}" + ("" if roles.get(r) is not None else " (added)")
                          for r in (PAD, EOS, MASK, IMAGE, BOS))
    images = (f"native resolution ({cfg.vision.min_pixels}..{cfg.vision.max_pixels} pixels an image)" if opts.native
              else f"{opts.image_size} px -> {cfg.n_image_tokens} image tokens ({opts.preprocess} preprocessing)")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log(f"[import-hf] {folder} -> {out}: stage {cfg.stage}, block {cfg.block_size}, {cfg.decode_layout} layout, "
        f"{images}, {n_params:.1f}M parameters, {len(mapping)} tensors; special tokens {roles_txt}; {prompt_txt}")
    return out
