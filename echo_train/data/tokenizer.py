"""Training a report tokenizer, and loading one from a checkpoint.

`train_tokenizer` builds a byte-level BPE (Hugging Face `tokenizers`) whose special tokens
are exactly `runtime.special_tokens.SPECIAL_TOKENS`, with ids 0..4 in that order. It is
trained on the reports and on the prompt text (`runtime.prompt.PROMPT_TEXT`, encoded with
the leading space that `ReportTokenizer.prefix_ids` uses), so the prompt costs few
tokens. No normaliser: case and spacing are kept, and `decode(encode(x))` returns x
(up to the leading/trailing whitespace that `ReportTokenizer.decode` strips).

`load_tokenizer` reads a tokenizer.json (a file or a checkpoint folder). A tokenizer we
trained has our special tokens at ids 0..4. A real checkpoint's tokenizer (e.g. Qwen)
usually lacks them: with `add_missing=True` (default) the missing ones are added as
special tokens AFTER the existing vocabulary, so their ids are not 0..4 — the rest of the
project reads them by name from `ReportTokenizer` (pad_id, eos_id, mask_id, image_id,
bos_id), and the caller must grow the model's embedding rows to `vocab_size`. The names
added are listed in the returned tokenizer's `added_special_tokens` attribute.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from runtime.errors import EchoRuntimeError
from runtime.prompt import PROMPT_TEXT
from runtime.special_tokens import SPECIAL_TOKENS
from runtime.text import ReportTokenizer

PROMPT_REPEATS = 8  # the prompt appears in every sample; weight it like a frequent text


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> ReportTokenizer:
    """Byte-level BPE on `texts` plus the prompt; special tokens at ids 0..4."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t for t in texts if t] + [" " + PROMPT_TEXT] * PROMPT_REPEATS
    tok.train_from_iterator(corpus, trainer, length=len(corpus))
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise EchoRuntimeError(f"special token {name!r} got id {tok.token_to_id(name)}, expected {i}")
    rt = ReportTokenizer(tok)
    rt.added_special_tokens = []
    return rt


def load_tokenizer(path: str | Path, add_missing: bool = True) -> ReportTokenizer:
    """A checkpoint's tokenizer.json (file or folder); missing special tokens are added (see module doc)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise EchoRuntimeError(f"{p}: tokenizer.json not found")
    tok = Tokenizer.from_file(str(p))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        if not add_missing:
            raise EchoRuntimeError(f"{p}: tokenizer lacks special tokens {missing}")
        tok.add_special_tokens(missing)
    rt = ReportTokenizer(tok)
    rt.added_special_tokens = missing
    return rt


def tokenizer_rows(tokenizer: ReportTokenizer) -> int:
    """Embedding rows a model needs for this tokenizer: its largest id + 1 (added tokens included).

    Not `vocab_size`: a real tokenizer's ids need not be contiguous."""
    return max(tokenizer.tok.get_vocab(with_added_tokens=True).values()) + 1


def lost_prompt_text(tokenizer: ReportTokenizer) -> str:
    """The part of the prompt this tokenizer cannot encode and decode back (empty when it can).

    A byte-level BPE (Qwen's) round-trips any text; a word-level or character tokenizer without
    byte fallback turns unknown words into an unknown token, and then the prompt the model is
    trained on is not the prompt the text says."""
    want = " " + PROMPT_TEXT
    got = tokenizer.tok.decode(tokenizer.encode(want), skip_special_tokens=False)
    if got == want or got.strip() == PROMPT_TEXT:
        return ""
    words_got = set(got.split())
    return " ".join(w for w in PROMPT_TEXT.split() if w not in words_got) or PROMPT_TEXT

