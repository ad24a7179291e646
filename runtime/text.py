"""Report tokenizer: a thin wrapper over a `tokenizers` tokenizer.json with our special ids."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer

from .errors import EchoRuntimeError
from .prompt import PROMPT_TEXT, PromptTemplate, build_prefix_ids
from .schedule import cut_at_eos
from .special_tokens import BOS, EOS, IMAGE, MASK, PAD


class ReportTokenizer:
    """Encodes reports, builds prefixes, and decodes generated ids up to EOS.

    `template`: the checkpoint's own prompt (runtime/prompt.py), from its config / the engine
    manifest; None builds ECHO's own prefix."""

    def __init__(self, tokenizer: Tokenizer, template: Optional[PromptTemplate] = None) -> None:
        self.tok = tokenizer
        self.template = template
        ids = {}
        for name in (PAD, EOS, MASK, IMAGE, BOS):
            i = tokenizer.token_to_id(name)
            if i is None:
                raise EchoRuntimeError(f"tokenizer has no special token {name!r}")
            ids[name] = i
        self.pad_id, self.eos_id, self.mask_id = ids[PAD], ids[EOS], ids[MASK]
        self.image_id, self.bos_id = ids[IMAGE], ids[BOS]

    @classmethod
    def from_file(cls, path: str | Path, template: Optional[PromptTemplate] = None) -> "ReportTokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise EchoRuntimeError(f"{p}: tokenizer.json not found")
        return cls(Tokenizer.from_file(str(p)), template)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_response(self, text: str) -> list[int]:
        """Report ids followed by EOS: what every stage learns to produce."""
        return self.encode(text) + [self.eos_id]

    def prefix_ids(self, n_image_tokens: int) -> list[int]:
        if self.template is not None:
            return self.template.prefix_ids(n_image_tokens, self.image_id, self.pad_id)
        return build_prefix_ids(
            self.encode(" " + PROMPT_TEXT), n_image_tokens, self.image_id, self.pad_id, self.bos_id
        )

    def cut_at_eos(self, ids: Iterable[int]) -> list[int]:
        """The ids before the first EOS (runtime.schedule.cut_at_eos with this tokenizer's EOS)."""
        return cut_at_eos(ids, self.eos_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids: stops at EOS, drops other special tokens."""
        return self.tok.decode(self.cut_at_eos(ids), skip_special_tokens=True).strip()
