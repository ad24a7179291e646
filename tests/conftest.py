"""Shared fixtures: a real BPE tokenizer and a tiny random ECHO model, built in-process."""
from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_tokenizer() -> ReportTokenizer:
    return make_tokenizer()


def make_tiny_model(tokenizer: ReportTokenizer, stage: str = "rad", block_size: int = 8, seed: int = 0, sharpen: float = 1.0):
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
    )
    model = EchoModel(cfg).eval()
    if sharpen != 1.0:  # peaked distributions exercise the confidence threshold
        with torch.no_grad():
            model.lm.model.norm.weight.mul_(sharpen)
    return model


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)
