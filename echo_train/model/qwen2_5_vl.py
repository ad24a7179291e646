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
from typing import Any, Callable, Optional

from tokenizers import Tokenizer

from runtime.native_image import DEFAULT_MAX_PIXELS
from runtime.preprocess import PREPROCESS_MODES
from runtime.prompt import DEFAULT_IMPORT_PROMPT, PAD_NONE, PAD_START, PROMPT_PRESETS, SUPPORTED_BLOCK_SIZES
from runtime.schedule import DECODE_LAYOUTS, LAYOUT_ECHO, LAYOUT_OFFICIAL
from runtime.special_tokens import BOS, EOS, IMAGE, MASK, PAD
from runtime.text import ReportTokenizer

from ..data.tokenizer import lost_prompt_text, tokenizer_rows
from .checkpoint import parameters_on_meta, write_checkpoint
from .config import STAGES, EchoConfig
from .echo_model import EchoModel
from .errors import PretrainedError, names_preview
from .families import family_of_folder
from .families.qwen2_5_vl import FAMILY, pixel_bounds, text_config
from .hf_folder import check_folder, grown_row_blocks, read_json, weight_files
from .qwen2_5_vl_prompt import chat_prompt_template, find_chat_template
from .safetensors_stream import (SafetensorsFormatError, SafetensorsWriter, TensorEntry, TensorSpec, byte_view,
                                 copy_bytes, read_header, read_rows)

OFFICIAL_MASK_TOKEN = "<|MASK|>"
DEFAULT_IMAGE_SIZE = 448  # 32 x 32 patches of 14 px -> 256 image tokens after the 2 x 2 merger


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
def configs_from_folder(folder: Path, opts: ImportOptions) -> tuple[EchoConfig, dict[str, Any]]:
    """The checkpoint's config (before the prompt and the decode layout) and the folder's config.json."""
    d = read_json(folder / "config.json", "the model's configuration")
    family_of_folder(folder, d, FAMILY.taken_by)
    lm, vision = FAMILY.configs(folder, d, opts.image_size, preprocess=opts.preprocess, native=opts.native)
    if opts.native:
        vision.min_pixels, vision.max_pixels = pixel_bounds(folder, opts.min_pixels, opts.max_pixels)
    # at a fixed grid the rotary positions follow from the token index; natively each image has its
    # own grid, so the graphs take explicit (time, row, column) positions instead (backbone.rotary)
    llm_grid = opts.image_size // vision.patch_size // vision.merge_size
    lm.mrope_image_grid = None if opts.native else [llm_grid, llm_grid]
    cfg = EchoConfig(lm=lm, vision=vision, stage=opts.stage, block_size=opts.block_size,
                     max_response_tokens=opts.max_response_tokens, shifted_prediction=False, causal_context=False)
    return cfg, d


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
    tokenizer = Tokenizer.from_str(json.dumps(tok_json))
    tcfg = read_json(folder / "tokenizer_config.json", "") if (folder / "tokenizer_config.json").is_file() else {}
    gen = read_json(folder / "generation_config.json", "") if (folder / "generation_config.json").is_file() else {}
    text = text_config(cfg)

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
    tok_json = read_json(folder / "tokenizer.json", "the tokenizer")
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


def plan_weights(folder: Path, model: EchoModel, index: SourceIndex) -> dict[str, str]:
    """Checkpoint name -> our name for every tensor; refused when any does not map. `model` may
    hold meta parameters (shapes only): nothing is read here."""
    shapes = {name: entry.shape for name, (_, entry) in index.items()}
    return FAMILY.name_map(folder, model.state_dict(), shapes, model.cfg.lm.vocab_size, model.cfg.lm.tie_word_embeddings)


def write_weights(path: Path, model: EchoModel, index: SourceIndex, mapping: dict[str, str]) -> int:
    """model.safetensors straight from the source files: each tensor under our name in its own
    dtype (bf16 stays bf16; loading converts), its bytes copied a chunk at a time, the embedding
    (and an untied head) grown to our rows with the mean row (hf_folder.grown_row_blocks). Memory:
    one chunk, never a whole tensor or model. A tied head is not written (it is the embedding), as
    save_model leaves one name of a tied pair and records the other in the metadata. Returns the
    bytes written."""
    own = model.state_dict()  # shapes only
    by_ours = {ours: name for name, ours in mapping.items()}
    specs = [TensorSpec(ours, index[by_ours[ours]][1].dtype, tuple(own[ours].shape)) for ours in sorted(by_ours)]
    meta = {"format": "pt"}
    if model.cfg.lm.tie_word_embeddings:
        meta["lm.lm_head.weight"] = "lm.model.embed_tokens.weight"
    files: dict[Path, Any] = {}
    try:
        with SafetensorsWriter(path, specs, meta) as w:
            for spec in specs:
                src, entry = index[by_ours[spec.name]]
                if src not in files:
                    files[src] = open(src, "rb", buffering=0)
                w.start(spec.name)
                for chunk in _source_bytes(files[src], entry, spec):
                    w.write_bytes(chunk)
    finally:
        for f in files.values():
            f.close()
    return w.total


def _source_bytes(f, entry: TensorEntry, spec: TensorSpec):
    """The bytes of `spec` from the source tensor `entry` of the open file `f`: copied as they are,
    or (an embedding with fewer rows) its rows followed by the grown ones."""
    if entry.shape == spec.shape:
        yield from copy_bytes(f, entry)
        return
    blocks = grown_row_blocks(lambda a, b: read_rows(f, entry, a, b), entry.shape, spec.shape[0], entry.dtype)
    yield from (byte_view(block) for block in blocks)


# ---------------------------------------------------------------------------- the import
def import_qwen2_5_vl(opts: ImportOptions, log: Callable[[str], Any] = print) -> Path:
    """Check everything, then write the ECHO checkpoint folder opts.out (nothing written on refusal)."""
    _check_options(opts)
    folder = check_folder(opts.folder, "import-hf")
    if opts.native is None:  # native where the official layout applies: the folder's chat prompt
        has_template = opts.chat_template and find_chat_template(folder) is not None
        opts = replace(opts, native=opts.layout == LAYOUT_OFFICIAL and has_template)
    cfg, raw = configs_from_folder(folder, opts)
    index = tensor_index(weight_files(folder))
    tok, roles = import_tokenizer(folder, raw, opts.mask_token)
    cfg, tok.template = _with_prompt(cfg, folder, opts, roles[IMAGE])
    cfg.lm.vocab_size = max(cfg.lm.vocab_size, tokenizer_rows(tok))
    with parameters_on_meta():  # shapes only: the weights go from the source files to ours unloaded
        model = EchoModel(cfg)
    mapping = plan_weights(folder, model, index)
    out = write_checkpoint(opts.out, cfg, lambda p: write_weights(p, model, index, mapping), tok)
    log(_summary(folder, out, opts, cfg, tok, roles, model, len(mapping)))
    return out


def _check_options(opts: ImportOptions) -> None:
    if opts.stage not in STAGES:
        raise PretrainedError(f"--stage {opts.stage!r}: choose from {', '.join(STAGES)}")
    if opts.preprocess not in PREPROCESS_MODES:
        raise PretrainedError(f"--preprocess {opts.preprocess!r}: choose from {', '.join(PREPROCESS_MODES)}")
    if opts.block_size not in SUPPORTED_BLOCK_SIZES:
        raise PretrainedError(f"--block-size {opts.block_size}: choose from {SUPPORTED_BLOCK_SIZES}")


def _with_prompt(cfg: EchoConfig, folder: Path, opts: ImportOptions, image_id: int):
    """The config with its prompt template and decode layout, and the template (None: ECHO's own
    prefix, decoded in ECHO's own layout)."""
    template = prompt_template(folder, opts, image_id)
    if opts.layout not in DECODE_LAYOUTS:
        raise PretrainedError(f"--layout {opts.layout!r}: choose from {', '.join(DECODE_LAYOUTS)}")
    layout = opts.layout if template is not None else LAYOUT_ECHO
    if opts.native and layout != LAYOUT_OFFICIAL:
        raise PretrainedError("native resolution decodes in the official layout (the chat template, --layout "
                              "official); pass --fixed-grid with --layout echo or --no-chat-template")
    cfg = replace(cfg, prompt=None if template is None else template.to_dict(), decode_layout=layout)
    if template is not None:
        _check_image_before_last_blocks(template, cfg)
    return cfg, template


def _summary(folder: Path, out: Path, opts: ImportOptions, cfg: EchoConfig, tok: ReportTokenizer,
             roles: dict[str, Any], model: EchoModel, n_tensors: int) -> str:
    """The one log line of an import: what was written and how its tokens and images are read."""
    template = tok.template
    prompt_txt = "ECHO's own prompt (no chat template)" if template is None else (
        f"the chat prompt of {template.info['source']} ({len(tok.prefix_ids(cfg.n_image_tokens))} tokens, image at "
        f"{cfg.image_start})")
    roles_txt = ", ".join(f"{r}={tok.tok.token_to_id(r)}" + ("" if roles.get(r) is not None else " (added)")
                          for r in (PAD, EOS, MASK, IMAGE, BOS))
    images = (f"native resolution ({cfg.vision.min_pixels}..{cfg.vision.max_pixels} pixels an image)" if opts.native
              else f"{opts.image_size} px -> {cfg.n_image_tokens} image tokens ({opts.preprocess} preprocessing)")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"[import-hf] {folder} -> {out}: stage {cfg.stage}, block {cfg.block_size}, {cfg.decode_layout} layout, "
            f"{images}, {n_params:.1f}M parameters, {n_tensors} tensors; special tokens {roles_txt}; {prompt_txt}")
