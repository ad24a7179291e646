"""Shared fixtures: a real BPE tokenizer and a tiny random ECHO model, built in-process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.special_tokens import SPECIAL_TOKENS
from runtime.text import ReportTokenizer

SAMPLE_REPORTS = [
    "FINDINGS: The heart size is normal. There is no pleural effusion. No pneumothorax is seen. "
    "IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: The cardiac silhouette is enlarged. There is a small left pleural effusion. "
    "IMPRESSION: Cardiomegaly with a small left effusion.",
    "FINDINGS: Right lower lobe consolidation. An endotracheal tube is in place. IMPRESSION: Pneumonia.",
]


def make_tokenizer(texts=SAMPLE_REPORTS, vocab_size: int = 300) -> ReportTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(texts) * 4, trainer)
    return ReportTokenizer(tok)


def write_png(path: Path, seed: int, size: int = 40) -> None:
    """A small real grayscale PNG with structure (not a constant image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 120 + 60 * np.sin(xx / (3 + seed)) * np.cos(yy / 5) + rng.normal(0, 20, (size, size))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path)


def write_tiny_dataset(root: Path, n_train: int = 4, n_test: int = 3, reports=SAMPLE_REPORTS) -> Path:
    """train.json / test.json in the ECHO evaluation format, with real PNGs and the given reports."""
    (root / "img").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        recs = []
        for i in range(n):
            name = f"img/{split}{i}.png"
            write_png(root / name, seed=i + (100 if split == "test" else 0))
            f, imp = reports[i % len(reports)].split(" IMPRESSION: ")
            recs.append({"id": f"{split}{i}", "images": [name], "split": split,
                         "ground_truth": {"findings": f.replace("FINDINGS: ", ""), "impression": imp}})
        (root / f"{split}.json").write_text(json.dumps(recs))
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer() -> ReportTokenizer:
    return make_tokenizer()


def make_tiny_model(tokenizer: ReportTokenizer, stage: str = "rad", block_size: int = 8, seed: int = 0, sharpen: float = 1.0,
                    shifted: bool = True, causal_context: bool = False):
    from echo_train.model.config import EchoConfig, LMConfig, VisionConfig
    from echo_train.model.echo_model import EchoModel

    torch.manual_seed(seed)
    cfg = EchoConfig(
        lm=LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64),
        stage=stage,
        block_size=block_size,
        max_response_tokens=48,
        shifted_prediction=shifted,
        causal_context=causal_context,
    )
    model = EchoModel(cfg).eval()
    if sharpen != 1.0:  # peaked distributions exercise the confidence threshold
        with torch.no_grad():
            model.lm.model.norm.weight.mul_(sharpen)
    return model


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def varied_model(tiny_tokenizer):
    """Factory of trained tiny models whose reports vary with image, position and previous
    tokens (tests/varied_models.py), one per (shifted, causal_context), trained once per session.
    Shared between tests: copy before changing (varied_models.as_stage)."""
    from varied_models import get_varied

    def get(shifted: bool = True, causal_context: bool = False):
        return get_varied(tiny_tokenizer, shifted=shifted, causal_context=causal_context)

    return get


@pytest.fixture(scope="session")
def varied_pixels() -> torch.Tensor:
    """The images the varied models were trained on: image i -> report i."""
    from varied_models import varied_images

    return torch.from_numpy(varied_images())
