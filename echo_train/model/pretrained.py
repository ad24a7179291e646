"""Start ECHO from pretrained Hugging Face parts: a Qwen2 / Qwen2.5 / Qwen3 causal LM and a SigLIP,
ViT or DINOv2 vision tower, each from a local folder.

What comes from where:
- the LM folder: config.json (architecture), the safetensors shards, tokenizer.json. Our special
  tokens are added to that tokenizer (echo_train/data/tokenizer.py) and the embedding rows (and an
  untied lm_head) grow to the tokenizer's ids; the new rows start at the mean of the existing ones,
  so the new tokens begin as "an average token" instead of a random direction of unknown size.
- the vision folder: config.json (the tower's architecture, kept whole in VisionConfig.hf_config so
  the checkpoint rebuilds it without the folder), the weights, and preprocessor_config.json (image
  size, mean, std: the model applies them to the [-1, 1] grey pixels of runtime/preprocess.py).
- the projector: fresh, its output layer scaled so that image tokens start at the size of the
  LM's own token embeddings.

Every way a folder can fail to fit raises PretrainedError with one message, before anything is
written: an unsupported architecture, a missing shard, tensors that do not map (named, first few),
a tokenizer that cannot carry the prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from runtime.text import ReportTokenizer

from .checkpoint import CheckpointError
from .config import EchoConfig, LMConfig, VisionConfig

LM_MODEL_TYPES = ("qwen2", "qwen3")
# model_type in config.json -> our vision family; a full SigLIP (text + vision) folder is "siglip"
VISION_MODEL_TYPES = {"siglip": "siglip", "siglip_vision_model": "siglip", "vit": "vit", "dinov2": "dinov2"}
SHOW_NAMES = 5  # tensors named in a "do not map" message


class PretrainedError(CheckpointError):
    """A Hugging Face folder that cannot be taken in; the message says which and why."""


# ---------------------------------------------------------------------------- folders and shards

def refuse_unmapped(folder, what: str, unexpected: list[str], missing: list[str], wrong: list[str]) -> None:
    """One PretrainedError naming the first few tensors that do not map onto `what`, if any."""
    if not (unexpected or missing or wrong):
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} tensors without a place in {what}: {names_preview(unexpected)}")
    if missing:
        parts.append(f"{len(missing)} parameters of {what} not in the folder: {names_preview(missing)}")
    if wrong:
        parts.append(f"{len(wrong)} of another shape: {names_preview(wrong)}")
    raise PretrainedError(f"{folder}: tensors do not map onto {what}: " + "; ".join(parts))


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PretrainedError(f"{path.parent}: no {path.name} ({what})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise PretrainedError(f"{path}: expected a JSON object")
    return d


def check_folder(folder: str | Path, option: str) -> Path:
    d = Path(folder)
    if not d.is_dir():
        raise PretrainedError(f"{option} {d}: folder not found")
    return d


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder; with an index, every shard it names must be there."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise PretrainedError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise PretrainedError(f"{folder}: missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                  f"(of {len(names)} named in {index.name}); download the whole folder again")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PretrainedError(f"{folder}: no *.safetensors weights (PyTorch .bin files are not read: convert them "
                              "with transformers' save_pretrained(safe_serialization=True))")
    return files


def read_tensors(files: Iterable[Path], keep=lambda name: True) -> dict[str, torch.Tensor]:
    """All tensors of these files whose name `keep` accepts (read lazily, one at a time)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if keep(name):
                        out[name] = st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise PretrainedError(f"{f}: unreadable safetensors file ({e})") from None
    return out


def names_preview(names: list[str]) -> str:
    more = f" and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else ""
    return ", ".join(names[:SHOW_NAMES]) + more


def load_mapped(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], folder: Path, what: str) -> None:
    """Copy `state` into `own` (a module's state_dict, sharing its storage); every tensor must map
    to an entry of the same shape, and every entry must be given."""
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                   if k in own and state[k].shape != own[k].shape)
    refuse_unmapped(folder, what, unexpected, missing, wrong)
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


# ---------------------------------------------------------------------------- the language model
def lm_config_from_folder(folder: Path) -> tuple[LMConfig, dict[str, Any]]:
    d = read_json(folder / "config.json", "the model's configuration")
    mt = d.get("model_type")
    if mt not in LM_MODEL_TYPES:
        arch = ", ".join(d.get("architectures") or []) or "no architectures listed"
        hint = " (a Qwen2.5-VL folder: use `echo-train import-hf`)" if mt in ("qwen2_5_vl", "qwen2_vl") else ""
        raise PretrainedError(f"{folder}: unsupported architecture {mt!r} ({arch}); --init-lm takes a Qwen2, "
                              f"Qwen2.5 or Qwen3 causal LM (model_type {' or '.join(LM_MODEL_TYPES)}){hint}")
    try:
        return LMConfig.from_hf(d), d
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{folder / 'config.json'}: incomplete {mt} configuration (missing {e})") from None


ROW_BLOCK_ELEMENTS = 1 << 22  # the rows summed at a time by row_mean (32 MB of float64)


def row_block(width: int) -> int:
    """Rows per block of a row_mean over rows of `width` (the same blocks everywhere: the same sum)."""
    return max(1, ROW_BLOCK_ELEMENTS // max(width, 1))


class RowMean:
    """The mean of a matrix's rows from blocks of rows (row_block at a time), summed in float64: a
    bf16 embedding of 152k rows is never copied whole to a wider type, and streamed rows give the
    same mean as the whole matrix."""

    def __init__(self, width: int) -> None:
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        self.sum += rows.to(torch.float64).sum(0)
        self.n += rows.shape[0]

    def mean(self, dtype: torch.dtype) -> torch.Tensor:
        """[1, width] in `dtype` (through float32, the precision the rows are used in)."""
        return (self.sum / max(self.n, 1)).to(torch.float32).to(dtype)[None]


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` [n, d] with rows n..rows-1 appended, each the mean of the existing rows."""
    n = weight.shape[0]
    if rows <= n:
        return weight
    acc, step = RowMean(weight.shape[1]), row_block(weight.shape[1])
    for a in range(0, n, step):
        acc.add(weight[a:a + step])
    return torch.cat([weight, acc.mean(weight.dtype).expand(rows - n, -1)], 0)


def load_lm_state(folder: Path, cfg: LMConfig, rows: int) -> dict[str, torch.Tensor]:
    """The decoder's tensors from the folder, embedding (and untied head) grown to `rows`."""
    state = read_tensors(weight_files(folder), keep=lambda n: "rotary_emb" not in n)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = grow_rows(state[name], rows)
    return state


# ---------------------------------------------------------------------------- the vision tower
def _square_size(pre: dict[str, Any], key: str) -> Optional[int]:
    v = pre.get(key)
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        if "height" in v and "width" in v:
            if v["height"] != v["width"]:
                raise PretrainedError(f"preprocessor {key} {v['height']}x{v['width']} is not square; ECHO feeds "
                                      "square images")
            return int(v["height"])
        if "shortest_edge" in v:
            return int(v["shortest_edge"])
    return None


def vision_config_from_folder(folder: Path) -> VisionConfig:
    d = read_json(folder / "config.json", "the vision model's configuration")
    mt = d.get("model_type")
    if mt == "siglip" and isinstance(d.get("vision_config"), dict):  # a full SigLIP: its vision half
        d = {**d["vision_config"], "model_type": "siglip_vision_model"}
    family = VISION_MODEL_TYPES.get(mt)
    if family is None:
        arch = ", ".join(d.get("architectures") or []) or "no architectures listed"
        raise PretrainedError(f"{folder}: unsupported architecture {mt!r} ({arch}); --init-vision takes a SigLIP, "
                              f"ViT or DINOv2 vision model (model_type {', '.join(sorted(VISION_MODEL_TYPES))})")
    pre = read_json(folder / "preprocessor_config.json",
                    "the image processor's configuration: image size, mean and std are read from it")
    size = _square_size(pre, "crop_size") if pre.get("do_center_crop") else None
    size = size or _square_size(pre, "size")
    patch = int(d.get("patch_size", 16))
    own_size = int(d.get("image_size", size or 224))
    if size is None:
        size = own_size
    if family in ("vit", "siglip") and size != own_size:
        # their position embeddings are learned for one grid; DINOv2 interpolates its own
        raise PretrainedError(f"{folder}: the processor resizes to {size} px but the {family} tower was built for "
                              f"{own_size} px")
    if size % patch:
        raise PretrainedError(f"{folder}: image size {size} is not a multiple of the patch size {patch}")
    if pre.get("do_rescale", True) and abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise PretrainedError(f"{folder}: rescale_factor {pre.get('rescale_factor')} is not 1/255")
    channels = int(d.get("num_channels", 3))
    if pre.get("do_normalize", True):
        mean, std = pre.get("image_mean"), pre.get("image_std")
        if mean is None or std is None:
            raise PretrainedError(f"{folder / 'preprocessor_config.json'}: do_normalize without image_mean / image_std")
    else:
        mean, std = [0.0], [1.0]
    mean = [float(x) for x in (mean if isinstance(mean, list) else [mean])]
    std = [float(x) for x in (std if isinstance(std, list) else [std])]
    hidden = int(d.get("hidden_size", 768))
    return VisionConfig(
        family=family, image_size=size, patch_size=patch, hidden_size=hidden,
        num_hidden_layers=int(d.get("num_hidden_layers", 12)), num_attention_heads=int(d.get("num_attention_heads", 12)),
        intermediate_size=int(d.get("intermediate_size") or hidden * float(d.get("mlp_ratio", 4))),
        num_channels=channels, hf_config=d, image_mean=mean, image_std=std,
    )


# Parts of a vision folder ECHO does not use: SigLIP's attention-pooling head (ours is built without
# it), ViT's pooler and classifier, as `transformers` names them when loading.
UNUSED_VISION_PARTS = ("head.", "pooler.", "classifier.", "vision_model.head.")


def load_vision_weights(tower: nn.Module, folder: Path, what: str) -> None:
    """The folder's weights into `tower`, through `transformers`' own loader.

    Its loader knows every checkpoint layout of these families (names as older versions saved
    them, a full SigLIP's vision half, a ViT classifier's base); ECHO adds the refusal: every
    tensor must find its parameter, every parameter its tensor, with the same shape."""
    import transformers

    cls = type(tower)
    extra = {"add_pooling_layer": False} if cls.__name__ == "ViTModel" else {}
    progress = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        loaded, info = cls.from_pretrained(str(folder), config=tower.config, output_loading_info=True,
                                           attn_implementation="eager", **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"{folder}: the vision weights do not load ({str(e).splitlines()[0][:300]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(UNUSED_VISION_PARTS))
    missing = sorted(info.get("missing_keys", []))
    wrong = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", []))
    refuse_unmapped(folder, what, unexpected, missing, wrong)
    tower.load_state_dict(loaded.state_dict())


# ---------------------------------------------------------------------------- the whole model
@dataclass
class PretrainedParts:
    """What `echo-train stage1 --init-lm/--init-vision` starts from."""

    config: EchoConfig
    tokenizer: Optional[ReportTokenizer]  # the LM's own, with our special tokens; None without --init-lm
    lm_folder: Optional[Path] = None
    vision_folder: Optional[Path] = None


def pretrained_tokenizer(folder: Path) -> ReportTokenizer:
    """The LM folder's tokenizer.json with our special tokens added; refused if it cannot carry the prompt."""
    from ..data.tokenizer import load_tokenizer, lost_prompt_text

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no tokenizer.json (the fast tokenizer file); ECHO uses the LM's own "
                              "tokenizer and cannot build one from vocab.json/merges.txt here")
    try:
        tok = load_tokenizer(path, add_missing=True)
    except Exception as e:  # tokenizers raises its own exception types on a damaged file
        raise PretrainedError(f"{path}: unreadable tokenizer ({e})") from None
    lost = lost_prompt_text(tok)
    if lost:
        raise PretrainedError(f"{path}: the tokenizer lacks the tokens to encode the prompt (lost: {lost!r}); "
                              "a tokenizer with byte fallback (byte-level BPE, as Qwen's) is needed")
    return tok


def plan_pretrained(base: EchoConfig, lm_folder: Optional[str | Path], vision_folder: Optional[str | Path]) -> PretrainedParts:
    """Check both folders and work out the model config; reads configs and the tokenizer, no weights."""
    cfg = EchoConfig.from_dict(base.to_dict())
    tok = None
    lm_dir = vis_dir = None
    if lm_folder is not None:
        from ..data.tokenizer import tokenizer_rows

        lm_dir = check_folder(lm_folder, "--init-lm")
        lm_cfg, _ = lm_config_from_folder(lm_dir)
        weight_files(lm_dir)  # a missing shard is refused before anything else is read
        tok = pretrained_tokenizer(lm_dir)
        lm_cfg.vocab_size = max(lm_cfg.vocab_size, tokenizer_rows(tok))
        cfg.lm = lm_cfg
    if vision_folder is not None:
        vis_dir = check_folder(vision_folder, "--init-vision")
        cfg.vision = vision_config_from_folder(vis_dir)
        weight_files(vis_dir)
    return PretrainedParts(cfg, tok, lm_dir, vis_dir)


def build_pretrained_model(parts: PretrainedParts):
    """The EchoModel of `parts.config` with the pretrained weights in and the projector initialised."""
    from .echo_model import EchoModel

    model = EchoModel(parts.config)
    if parts.lm_folder is not None:
        state = load_lm_state(parts.lm_folder, parts.config.lm, parts.config.lm.vocab_size)
        tied = parts.config.lm.tie_word_embeddings  # lm_head is the embedding: loaded once, by that name
        own = {k: v for k, v in model.lm.state_dict().items() if not (tied and k == "lm_head.weight")}
        load_mapped(own, state, parts.lm_folder, f"a {parts.config.lm.num_hidden_layers}-layer Qwen decoder")
    if parts.vision_folder is not None:
        load_vision_weights(model.vision.tower, parts.vision_folder, f"a {parts.config.vision.family} vision tower")
    if parts.lm_folder is not None or parts.vision_folder is not None:
        init_projector(model)
    return model.eval()


@torch.no_grad()
def init_projector(model) -> None:
    """Scale the projector's output layer so image tokens start at the RMS size of the LM's token
    embeddings (measured on a mid-grey image): a pretrained LM has never seen inputs far larger or
    smaller than its own embeddings, and PyTorch's default init gives neither."""
    last = model.vision.projector[-1]
    nn.init.zeros_(last.bias)
    S = model.cfg.vision.image_size
    was_training = model.training
    model.eval()
    img = model.vision(torch.zeros(1, 1, S, S))
    model.train(was_training)
    emb = model.lm.model.embed_tokens.weight
    want = emb.float().pow(2).mean().sqrt()
    got = img.float().pow(2).mean().sqrt()
    if got > 0:
        last.weight.mul_(want / got)
