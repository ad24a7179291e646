"""Language metrics: BLEU-1..4, ROUGE-1/2/L, METEOR, CIDEr.

Tokenisation (one for all): lower case, words and numbers kept, punctuation dropped
(the coco-caption PTB convention), so "Effusion." and "effusion" are the same token.

- BLEU: the coco-caption formula (closest reference length, tiny/small smoothing),
  written here so corpus BLEU can be recomputed from per-study counts in a bootstrap.
  Equals `pycocoevalcap.bleu.Bleu` on the same tokens (tested).
- ROUGE: `rouge_score` F-measure (rouge1, rouge2, rougeL), mean over studies.
- METEOR: the METEOR 1.5 jar of `pycocoevalcap` (needs `java`), corpus score as the jar
  reports it; per-study scores from the same jar.
- CIDEr: `pycocoevalcap.cider` (document frequencies from the evaluated references),
  mean over studies. With a single reference per study this is the coco CIDEr (x10).
Nothing here needs NLTK data.
"""
from __future__ import annotations

import atexit
import math
import re
import shutil
import threading
from collections import Counter
from typing import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall((text or "").lower())


def tokenized(text: str) -> str:
    return " ".join(tokenize(text))


# --------------------------------------------------------------------------- BLEU
_TINY, _SMALL = 1e-15, 1e-9


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(hyp: str, ref: str, max_n: int = 4) -> np.ndarray:
    """[testlen, reflen, guess_1..n, correct_1..n] for one hypothesis and one reference."""
    h, r = tokenize(hyp), tokenize(ref)
    out = [len(h), len(r)]
    guess, correct = [], []
    for n in range(1, max_n + 1):
        hc, rc = _ngrams(h, n), _ngrams(r, n)
        guess.append(max(len(h) - n + 1, 0))
        correct.append(sum(min(c, rc[g]) for g, c in hc.items()))
    return np.array(out + guess + correct, dtype=np.float64)


def bleu_from_stats(stats: np.ndarray, max_n: int = 4) -> list[float]:
    """BLEU-1..max_n from summed stats (coco-caption formula)."""
    testlen, reflen = stats[0], stats[1]
    guess, correct = stats[2:2 + max_n], stats[2 + max_n:2 + 2 * max_n]
    out, logp = [], 0.0
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    bp = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    for k in range(max_n):
        logp += math.log((correct[k] + _TINY) / (guess[k] + _SMALL))
        out.append(math.exp(logp / (k + 1)) * bp)
    return out


def bleu(preds: Sequence[str], refs: Sequence[str], max_n: int = 4) -> dict:
    """Corpus BLEU-1..4, per-study sentence BLEU and the stats matrix for bootstrapping."""
    stats = np.stack([bleu_stats(p, r, max_n) for p, r in zip(preds, refs)]) if preds else np.zeros((0, 2 + 2 * max_n))
    corpus = bleu_from_stats(stats.sum(0), max_n)
    per = np.array([bleu_from_stats(s, max_n) for s in stats]).reshape(len(stats), max_n)
    return {
        "corpus": {f"bleu{k + 1}": corpus[k] for k in range(max_n)},
        "per_study": {f"bleu{k + 1}": per[:, k] for k in range(max_n)},
        "stats": stats,
    }


# --------------------------------------------------------------------------- ROUGE
_ROUGE_CACHE: dict = {}


def rouge(preds: Sequence[str], refs: Sequence[str], use_stemmer: bool = False) -> dict:
    """Per-study ROUGE-1/2/L F-measures (rouge_score) and their means."""
    from rouge_score import rouge_scorer

    key = bool(use_stemmer)
    if key not in _ROUGE_CACHE:
        _ROUGE_CACHE[key] = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=key)
    sc = _ROUGE_CACHE[key]
    per = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(preds, refs):
        s = sc.score(tokenized(r), tokenized(p))  # score(target, prediction)
        for k in per:
            per[k].append(s[k].fmeasure)
    per_np = {k: np.array(v, dtype=np.float64) for k, v in per.items()}
    return {"corpus": {k: float(v.mean()) if len(v) else 0.0 for k, v in per_np.items()}, "per_study": per_np}


# --------------------------------------------------------------------------- METEOR
class MeteorUnavailable(RuntimeError):
    pass


_METEOR = None
_METEOR_LOCK = threading.Lock()


def _meteor_scorer():
    global _METEOR
    if _METEOR is None:
        if shutil.which("java") is None:
            raise MeteorUnavailable("java not found on PATH (METEOR 1.5 is a Java program)")
        try:
            from pycocoevalcap.meteor.meteor import Meteor
        except Exception as e:  # noqa: BLE001
            raise MeteorUnavailable(f"pycocoevalcap not importable: {e}") from e

        class _Meteor(Meteor):
            def __del__(self):  # closed by _close_meteor at exit instead (no teardown noise)
                pass

        try:
            _METEOR = _Meteor()
        except OSError as e:
            raise MeteorUnavailable(f"cannot start the METEOR jar: {e}") from e
        atexit.register(_close_meteor)
    return _METEOR


def _close_meteor() -> None:
    global _METEOR
    m, _METEOR = _METEOR, None
    if m is not None:
        try:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait(timeout=5)
        except Exception:  # noqa: BLE001
            pass


def meteor(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """Corpus METEOR (jar aggregate) and per-study METEOR. Raises MeteorUnavailable."""
    if not preds:
        return {"corpus": {"meteor": 0.0}, "per_study": {"meteor": np.zeros(0)}}
    with _METEOR_LOCK:
        m = _meteor_scorer()
        gts = {i: [tokenized(r) or "empty"] for i, r in enumerate(refs)}
        # The jar cannot score an empty hypothesis line; an empty output scores 0 anyway.
        res = {i: [tokenized(p)] for i, p in enumerate(preds)}
        empty = {i for i, v in res.items() if not v[0]}
        for i in empty:
            res[i] = ["xxemptyxx"]
        try:
            corpus, per = m.compute_score(gts, res)
        except Exception as e:  # noqa: BLE001 - a dead jar process
            raise MeteorUnavailable(f"METEOR jar failed: {e!r}") from e
    per = np.array([0.0 if i in empty else float(s) for i, s in enumerate(per)])
    return {"corpus": {"meteor": float(corpus)}, "per_study": {"meteor": per}}


# --------------------------------------------------------------------------- CIDEr
def cider(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """CIDEr of pycocoevalcap (n=4, sigma=6, x10), document frequencies from `refs`."""
    from pycocoevalcap.cider.cider import Cider

    if not preds:
        return {"corpus": {"cider": 0.0}, "per_study": {"cider": np.zeros(0)}}
    gts = {i: [tokenized(r)] for i, r in enumerate(refs)}
    res = {i: [tokenized(p)] for i, p in enumerate(preds)}
    corpus, per = Cider().compute_score(gts, res)
    per = np.asarray(per, dtype=np.float64).reshape(-1)
    return {"corpus": {"cider": float(corpus)}, "per_study": {"cider": per}}
