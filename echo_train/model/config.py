"""Model configuration: dataclasses with defaults that give the tiny demo model."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

STAGES = ("ar", "rad", "dcd")


@dataclass
class LMConfig:
    """Qwen2/Qwen3-compatible decoder. Field names follow Hugging Face config.json (a folder's config
    maps onto it in families/qwen2.py and families/qwen2_5_vl.py)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False  # Qwen3 normalises q and k per head
    attention_bias: bool = True  # Qwen2 has q/k/v biases, Qwen3 none
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048
    # Qwen2.5-VL's multimodal rotary positions (MRoPE): the rotary frequencies split into sections
    # that rotate by the (time, row, column) position of a token instead of its index. None: plain
    # RoPE. For a prefix with one image (text, image, text) the positions follow from the index,
    # the image's token grid [rows, columns] and its first index alone (backbone.mrope_cos_sin).
    # mrope_image_start is the prompt template's (EchoConfig.prompt), kept in step by EchoConfig.
    mrope_section: Optional[list[int]] = None
    mrope_image_grid: Optional[list[int]] = None
    mrope_image_start: int = 0


@dataclass
class VisionConfig:
    """A vision tower of a family (families/: vit, siglip, dinov2, qwen2_5_vl)."""

    family: str = "vit"
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    num_channels: int = 1
    # A pretrained tower's own `transformers` config (its config.json, vision part), so that the
    # checkpoint rebuilds exactly that architecture with no access to the original folder; the
    # weights come from model.safetensors. None: the tower is built from the fields above.
    hf_config: Optional[dict[str, Any]] = None
    # Per-channel normalisation the tower was trained with (its processor's image_mean / image_std,
    # on pixels scaled to [0, 1]). Applied inside the model to the [-1, 1] grey image that
    # runtime/preprocess.py gives every caller, so training, the exported graphs and the runtime
    # all follow it. None: the [-1, 1] pixels go in as they are (mean = std = 0.5).
    image_mean: Optional[list[float]] = None
    image_std: Optional[list[float]] = None
    # Patches merged into one image token a side (Qwen2.5-VL's patch merger: 2); 1 elsewhere.
    merge_size: int = 1
    # How images are prepared before the model (runtime/preprocess.PREPROCESS_MODES): "echo" (each
    # image stretched to its own range, bilinear) or "processor" (Qwen2-VL's image processor at
    # the fixed grid: 8-bit values kept, bicubic; set by import-hf).
    preprocess: str = "echo"
    # Native resolution (Qwen2.5-VL, import-hf): each image at the processor's own grid (aspect ratio
    # kept, its pixel count within [min_pixels, max_pixels]), so the number of image tokens follows
    # the image (runtime/native_image.py). image_size then only sizes the fixed-grid graphs' buffers.
    native: bool = False
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size // self.merge_size) ** 2


@dataclass
class EchoConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    stage: str = "ar"  # ar: causal; rad / dcd: block diffusion over a causal or block-causal context (causal_context)
    block_size: int = 8
    max_response_tokens: int = 128
    # Diffusion stages: block token j is read from the logits of position j-1 (token 0 from the
    # clean token before the block), as in AR. False: from its own position (the first design;
    # checkpoints written before this field load with False).
    shifted_prediction: bool = True
    # Diffusion stages: the clean context (prefix, committed blocks) keeps the AR model's causal
    # attention instead of turning block-causal, so stage 2 can keep training it as the AR model
    # (see Stage2Config.ar_weight). Set by stage 2; older checkpoints load as block-causal.
    causal_context: bool = False
    # The model's own prompt template (runtime/prompt.PromptTemplate.to_dict(): the ids before and
    # after the image, where the pads go), as import-hf renders it from a folder's chat template.
    # None: ECHO's own prefix (image first, pads, BOS, instruction).
    prompt: Optional[dict[str, Any]] = None
    # How the block decoders lay out and read a report (runtime/schedule.DECODE_LAYOUTS): "echo" for
    # the models trained here, "official" for imported ECHO checkpoints (the official inference
    # code's rules: argmax over every id, the mask included; the prompt unpadded).
    decode_layout: str = "echo"

    def __post_init__(self) -> None:
        # the decoder's rotary positions follow the template's image start (one source: the template)
        if self.lm.mrope_section:
            self.lm.mrope_image_start = self.image_start

    @property
    def prompt_template(self):
        from runtime.prompt import template_of

        return template_of({"prompt": self.prompt})

    @property
    def image_start(self) -> int:
        """Index of the first image token in the prefix (0 in ECHO's own prefix)."""
        t = self.prompt_template
        return 0 if t is None else t.image_start(self.n_image_tokens)

    @property
    def context_kind(self) -> int:
        """Kind of clean-context tokens in every diffusion layout (see masks.context_kind)."""
        from .masks import context_kind  # here, not at the top: reading a config needs no torch

        return context_kind(self.causal_context)

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_image_tokens

    @property
    def is_diffusion(self) -> bool:
        return self.stage in ("rad", "dcd")

    def to_dict(self) -> dict[str, Any]:
        # n_image_tokens is derived, written for readers without this class (the runtime's
        # manifest reader, runtime/engine.py), and ignored by from_dict
        return {"model_type": "echo", **asdict(self), "n_image_tokens": self.n_image_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EchoConfig":
        d = {k: v for k, v in d.items() if k != "model_type"}
        d.setdefault("shifted_prediction", False)  # configs written before the field existed
        lm = LMConfig(**d.pop("lm", {}))
        # pretrained_path: a field configs were written with until it went (it was never set)
        vision = VisionConfig(**{k: v for k, v in d.pop("vision", {}).items() if k != "pretrained_path"})
        known = {f.name for f in fields(cls)}
        return cls(lm=lm, vision=vision, **{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "EchoConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
