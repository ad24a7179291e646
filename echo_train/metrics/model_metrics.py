"""Wrappers of third-party model-based report metrics: RaTEScore and CheXbert F1.

Neither downloads anything: RaTEScore runs only when the user points to local folders
of its NER model (RaTE-NER-Deberta) and its embedding model (BioLORD-2023-C); CheXbert
F1 runs only when `f1chexbert` is installed and its weights are already on disk (an
explicit `chexbert.pth`, or the Hugging Face cache, read with HF_HUB_OFFLINE=1). Anything
missing raises ModelUnavailable with the reason, which the report prints as
"not computed: REASON".
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .semscore import ModelUnavailable


@contextmanager
def _offline():
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- RaTEScore
@lru_cache(maxsize=2)
def _ratescore_model(ner_dir: str, biolord_dir: str, use_gpu: bool):
    try:
        from RaTEScore import RaTEScore
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailable(f"package ratescore not importable ({e}); pip install ratescore") from e
    with _offline():
        return RaTEScore(bert_model=ner_dir, eval_model=biolord_dir, use_gpu=use_gpu)


def ratescore(preds: Sequence[str], refs: Sequence[str], ner_dir: Optional[str], biolord_dir: Optional[str],
              use_gpu: bool = False) -> np.ndarray:
    """Per-study RaTEScore. Raises ModelUnavailable."""
    if not ner_dir or not biolord_dir:
        raise ModelUnavailable("RaTEScore needs local model folders: --ratescore-ner DIR and --ratescore-biolord DIR")
    for name, d in (("NER", ner_dir), ("BioLORD", biolord_dir)):
        if not (Path(d) / "config.json").is_file():
            raise ModelUnavailable(f"RaTEScore {name} folder {d} has no config.json")
    model = _ratescore_model(str(ner_dir), str(biolord_dir), bool(use_gpu))
    try:
        with _offline():
            scores = model.compute_score(list(preds), list(refs))
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailable(f"RaTEScore failed: {e!r}") from e
    return np.asarray(scores, dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------- CheXbert
def _chexbert_weights_present(weights: Optional[str]) -> Optional[str]:
    if weights:
        return weights if Path(weights).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except Exception:  # noqa: BLE001
        return None
    hit = try_to_load_from_cache("StanfordAIMI/RRG_scorers", "chexbert.pth")
    return hit if isinstance(hit, str) else None


@lru_cache(maxsize=1)
def _chexbert_model(device: str):
    from f1chexbert import F1CheXbert

    with _offline():
        return F1CheXbert(device=device)


def chexbert_f1(preds: Sequence[str], refs: Sequence[str], weights: Optional[str] = None,
                device: Optional[str] = None) -> dict:
    """CheXbert micro/macro F1 (14 and 5 observations) from `f1chexbert`. Raises ModelUnavailable."""
    try:
        import f1chexbert  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailable(f"package f1chexbert not importable ({e})") from e
    found = _chexbert_weights_present(weights)
    if found is None:
        raise ModelUnavailable("CheXbert weights (chexbert.pth of StanfordAIMI/RRG_scorers) not on disk; "
                               "nothing is downloaded")
    if weights:
        raise ModelUnavailable("f1chexbert reads its weights only from the Hugging Face cache; "
                               f"place {weights} there (StanfordAIMI/RRG_scorers/chexbert.pth)")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = _chexbert_model(device)
        with _offline():
            accuracy, _acc_all, report, report5 = model(hyps=list(preds), refs=list(refs))
    except ModelUnavailable:
        raise
    except Exception as e:  # noqa: BLE001
        raise ModelUnavailable(f"f1chexbert failed: {e!r}") from e
    return {
        "chexbert_micro_f1": float(report["micro avg"]["f1-score"]),
        "chexbert_macro_f1": float(report["macro avg"]["f1-score"]),
        "chexbert_micro_f1_5": float(report5["micro avg"]["f1-score"]),
        "chexbert_macro_f1_5": float(report5["macro avg"]["f1-score"]),
        "chexbert_accuracy": float(accuracy),
    }
