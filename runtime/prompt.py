"""The prompt template: where the image sits among the prompt's ids, aligned to blocks.

Every prefix is [ids before the image] [IMAGE] * n_image [ids after the image] plus PAD tokens
that make its length P a multiple of PREFIX_ALIGN, with

(a) P a multiple of every block size we support (4, 8, 16), and
(b) the last PREFIX_ALIGN tokens text only, so that the fused one-step decoder can carry the last
    prefix block as the "previous clean block" of its first pass by token ids alone.

ECHO's own prompt (the demo and every model trained here; `PromptTemplate` None):

    [IMAGE] * n_image  [PAD] * pad  [BOS] instruction tokens

A checkpoint imported from Hugging Face carries its own template (`PromptTemplate`, recorded in
its config.json as "prompt" and in the engine manifest's model_config): the ids its chat template
renders for one image and the instruction, e.g. for Qwen2.5-VL

    <|im_start|>system ... <|im_end|> <|im_start|>user <|vision_start|> | [IMAGE] * n_image |
    <|vision_end|> instruction <|im_end|> <|im_start|>assistant \\n

with its pads at the start (pad="start"): the text after the image ends the prefix exactly as
the model saw it in training; or with none (pad="none", the official ECHO layout that import-hf
records: the prompt unpadded at position 0, its length P anything; runtime/schedule.BlockLayout
decodes the ids after its last whole block inside the first response block). The image's first index (`image_start`) is what Qwen2.5-VL's
multimodal rotary positions need (echo_train backbone.mrope_cos_sin).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

PROMPT_TEXT = "Write the findings and impression of this chest X-ray."
# The instructions of the official ECHO inference code, by name (import-hf --prompt): its scripts'
# default is the Chinese one, its README uses the English one. A checkpoint writes the reports it
# was trained to write for the instruction it was trained with, so the name travels in the manifest.
PROMPT_PRESETS = {
    "official-zh": "这是一组胸部X光图像，请生成一份医学报告，包括所见和结论。以以下格式返回报告：所见：{} 结论：{}。",
    "official-en": "Review this chest X-ray and write a report.Use this format: Findings: {}, Impression: {}.",
    "echo": PROMPT_TEXT,
}
DEFAULT_IMPORT_PROMPT = "official-zh"
PREFIX_ALIGN = 16  # least common multiple of the supported block sizes
SUPPORTED_BLOCK_SIZES = (4, 8, 16)
PAD_AFTER_IMAGE = "after_image"  # ECHO's own layout: pads between the image and the text
PAD_START = "start"  # pads before everything (left padding)
PAD_NONE = "none"  # no pads: the official ECHO layout (the block grid from the first prompt token)
PAD_PLACES = (PAD_AFTER_IMAGE, PAD_START, PAD_NONE)


class PromptTemplateError(ValueError):
    """A template that cannot give an aligned prefix (or a malformed recorded one)."""


@dataclass(frozen=True)
class PromptTemplate:
    """Fixed token ids around the image placeholders, and where the aligning pads go.

    `info` is for readers only (how the ids were made: the rendered text, system prompt,
    instruction); the ids are what every decoder, graph and the runtime use."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    pad: str = PAD_START
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "before", tuple(int(i) for i in self.before))
        object.__setattr__(self, "after", tuple(int(i) for i in self.after))
        if self.pad not in PAD_PLACES:
            raise PromptTemplateError(f"prompt template pad place {self.pad!r}: expected one of {PAD_PLACES}")
        if self.pad == PAD_START and len(self.after) < PREFIX_ALIGN:
            raise PromptTemplateError(
                f"the prompt has {len(self.after)} tokens after the image; the fused decoder needs at least "
                f"{PREFIX_ALIGN} (its last block carried as token ids): use a longer instruction")

    def n_pad(self, n_image: int) -> int:
        if self.pad == PAD_NONE:
            return 0
        n = len(self.before) + n_image + len(self.after)
        total = -(-n // PREFIX_ALIGN) * PREFIX_ALIGN
        if self.pad == PAD_AFTER_IMAGE:  # keep at least one whole aligned block of text after the image
            while total - n + len(self.after) < PREFIX_ALIGN:
                total += PREFIX_ALIGN
        return total - n

    def image_start(self, n_image: int) -> int:
        """Index of the first image token in the prefix."""
        return len(self.before) + (self.n_pad(n_image) if self.pad == PAD_START else 0)

    def prefix_ids(self, n_image: int, image_id: int, pad_id: int) -> list[int]:
        pads = [pad_id] * self.n_pad(n_image)
        image = [image_id] * n_image
        if self.pad == PAD_START:
            return pads + list(self.before) + image + list(self.after)
        return list(self.before) + image + pads + list(self.after)

    def to_dict(self) -> dict[str, Any]:
        return {"before": list(self.before), "after": list(self.after), "pad": self.pad, "info": dict(self.info)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptTemplate":
        try:
            return cls(before=tuple(d["before"]), after=tuple(d["after"]), pad=d.get("pad", PAD_START),
                       info=dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, PromptTemplateError):
                raise
            raise PromptTemplateError(f"prompt template {dict(d)!r} is malformed ({e!r})") from None


def template_of(model_config: Optional[Mapping[str, Any]]) -> Optional[PromptTemplate]:
    """The template a model config (checkpoint config.json, manifest model_config) records, or
    None: ECHO's own prompt."""
    d = (model_config or {}).get("prompt")
    return None if d is None else PromptTemplate.from_dict(d)


def image_start_of(model_config: Optional[Mapping[str, Any]], n_image: int) -> int:
    t = template_of(model_config)
    return 0 if t is None else t.image_start(n_image)


def echo_template(instruction_ids: Sequence[int], bos_id: int) -> PromptTemplate:
    """ECHO's own prompt as a template: image first, pads, then BOS and the instruction."""
    return PromptTemplate(before=(), after=(bos_id, *instruction_ids), pad=PAD_AFTER_IMAGE)


def build_prefix_ids(
    instruction_ids: Sequence[int],
    n_image_tokens: int,
    image_id: int,
    pad_id: int,
    bos_id: int,
) -> list[int]:
    """Token ids of ECHO's own prefix; image placeholders come first."""
    return echo_template(instruction_ids, bos_id).prefix_ids(n_image_tokens, image_id, pad_id)
