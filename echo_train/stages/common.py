"""What every stage needs around the trainer: data sets, tokenizer, presets."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from runtime.prompt import PREFIX_ALIGN, PROMPT_TEXT
from runtime.text import ReportTokenizer

from ..data.study import Study
from ..model.config import EchoConfig, LMConfig, VisionConfig
from .errors import StageError

PRESETS = {
    # about 1.5M parameters: each stage trains in a few minutes on 2 CPU cores
    "tiny": EchoConfig(
        lm=LMConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32),
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=256),
        max_response_tokens=128,
    ),
    # the stage-3 ladder's width rung (benchmarks/dcd_ladder.py): the tiny model with its language model
    # twice as wide (hidden 256, 8 heads); the vision tower is the tiny one, so only the decoder that
    # writes the block grows
    "tiny-wide": EchoConfig(
        lm=LMConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32),
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=256),
        max_response_tokens=128,
    ),
    # for tests: seconds per stage
    "test": EchoConfig(
        lm=LMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64),
        max_response_tokens=64,
    ),
}


def preset(name: str) -> EchoConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return EchoConfig.from_dict(PRESETS[name].to_dict())


def load_split(data: str | Path, split: str, limit: Optional[int] = None) -> list[Study]:
    """Studies of one split, with problems reported (never silently dropped)."""
    from ..data.loaders import load_studies

    try:
        res = load_studies(Path(data), split=split)
    except FileNotFoundError as e:  # a wrong --data path: a stage error, not a crash
        raise StageError(str(e)) from e
    if res.problems:
        print(f"[data] {split}: skipped {len(res.problems)} bad records, e.g. {res.problems[:3]}")
    studies = res.studies
    if not studies:
        raise StageError(f"no {split} studies found in {data}")
    return studies[:limit] if limit else studies


def build_tokenizer(studies: list[Study], vocab_size: int) -> ReportTokenizer:
    from ..data.tokenizer import train_tokenizer

    return train_tokenizer([s.report for s in studies] + [PROMPT_TEXT], vocab_size=vocab_size)


def make_dataset(studies: list[Study], tokenizer: ReportTokenizer, cfg: EchoConfig):
    from ..data.dataset import ReportDataset

    return ReportDataset(studies, tokenizer, cfg.vision.image_size, cfg.n_image_tokens, cfg.max_response_tokens,
                         preprocess=cfg.vision.preprocess)


def make_collate(tokenizer: ReportTokenizer):
    from ..data.dataset import collate_reports

    def collate(items: list) -> dict:
        # responses padded with EOS to a multiple of every supported block size
        return collate_reports(items, pad_to_multiple=PREFIX_ALIGN, eos_id=tokenizer.eos_id)

    return collate
