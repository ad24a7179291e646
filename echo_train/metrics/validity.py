"""Sentence validity on the synthetic benchmark: the direct measure of mean-field decoding.

One-step decoding from a token-factorised denoiser writes things like
"no is no evidence of left pleural no . pleural right pleural effusion is is ." This
module measures, against the synthetic report grammar (`echo_train.data.synth.grammar`,
imported lazily):

- valid_sentence_rate: share of all generated sentences that the grammar can produce
  (micro over the corpus); `mean_valid_sentence_rate` is the mean of per-report shares.
- valid_report_rate: share of reports whose every sentence is valid (and which have one).
- repeat_rate: share of reports in which, within one section, the same statement appears
  twice (in any wording), or one observation is stated by two sentences. The impression
  restating the findings is by design, so sections are checked separately; Lung Opacity
  (implied by edema, consolidation and atelectasis alike) and Support Devices (one
  sentence per device) may legitimately come from several sentences.
- contradiction_rate: share of reports in which one observation gets two different values
  (1 / 0 / -1) anywhere in the report, two positive statements of one observation disagree
  on an attribute (side, size, severity, lobe, ...), or "no acute process" (No Finding 1)
  appears next to a positive or uncertain pathology.
- repeat_or_contradiction_rate: share of reports with either.
Meaningful only for the synthetic benchmark; real reports are not in this grammar.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


class GrammarUnavailable(RuntimeError):
    pass


def _grammar():
    try:
        from echo_train.data.synth import grammar
    except Exception as e:  # noqa: BLE001
        raise GrammarUnavailable(f"synthetic report grammar not importable: {e}") from e
    return grammar


# Observations that several distinct sentences of one correct report may state.
MULTI_SENTENCE_OBSERVATIONS = frozenset({"Lung Opacity", "Support Devices"})


class _Info:
    def __init__(self, key, attrs, findings):
        self.key, self.attrs, self.findings = key, attrs, findings


def _info(g, sentence: str):
    """Statement key, attrs and findings of a valid sentence (None if invalid)."""
    if hasattr(g, "sentence_info"):
        return g.sentence_info(sentence)
    if not g.is_valid_sentence(sentence):
        return None
    return _Info(" ".join(sentence.lower().split()), (), tuple(g.sentence_findings(sentence)))


def _sections(g, report: str) -> list[str]:
    if hasattr(g, "split_sections"):
        secs = g.split_sections(report)
        if isinstance(secs, Mapping):
            return [t for t in secs.values() if t and t.strip()]
    return [report]


def report_validity(report: str) -> dict:
    """Validity facts of one generated report."""
    g = _grammar()
    sents = g.split_sentences(report)
    n_valid = sum(1 for s in sents if g.is_valid_sentence(s))
    repeated = False
    for sec in _sections(g, report):
        seen_obs: set[str] = set()
        seen_keys: set[str] = set()
        for s in g.split_sentences(sec):
            info = _info(g, s)
            if info is None:
                continue
            obs = {o for o, _ in info.findings} - MULTI_SENTENCE_OBSERVATIONS
            if (obs & seen_obs) or info.key in seen_keys:
                repeated = True
            seen_obs |= obs
            seen_keys.add(info.key)
    values: dict[str, set[int]] = {}
    pos_attrs: dict[str, list[dict]] = {}
    for s in sents:
        info = _info(g, s)
        if info is None:
            continue
        for o, v in info.findings:
            values.setdefault(o, set()).add(v)
            if v == 1 and o not in MULTI_SENTENCE_OBSERVATIONS:
                pos_attrs.setdefault(o, []).append(dict(info.attrs))
    pathologies = getattr(g, "PATHOLOGIES", ())
    attr_clash = any(
        a[k] != b[k] for lst in pos_attrs.values() for i, a in enumerate(lst) for b in lst[i + 1:]
        for k in a.keys() & b.keys())
    contradictory = any(len(v) > 1 for v in values.values()) or attr_clash or (
        1 in values.get("No Finding", set()) and any(values.get(o, set()) & {1, -1} for o in pathologies))
    return {
        "n_sentences": len(sents),
        "n_valid": n_valid,
        "repeated": repeated,
        "contradictory": contradictory,
    }


def validity_arrays(preds: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-report arrays: n_sentences, n_valid, valid_report, repeated, contradictory."""
    facts = [report_validity(p) for p in preds]
    n_s = np.array([f["n_sentences"] for f in facts], dtype=np.float64)
    n_v = np.array([f["n_valid"] for f in facts], dtype=np.float64)
    return {
        "n_sentences": n_s,
        "n_valid": n_v,
        "valid_report": ((n_s > 0) & (n_v == n_s)).astype(np.float64),
        "repeated": np.array([f["repeated"] for f in facts], dtype=np.float64),
        "contradictory": np.array([f["contradictory"] for f in facts], dtype=np.float64),
    }


def validity_from_arrays(a: dict[str, np.ndarray], idx: np.ndarray | None = None) -> dict[str, float]:
    if idx is not None:
        a = {k: v[idx] for k, v in a.items()}
    n = len(a["n_sentences"])
    if n == 0:
        return {k: 0.0 for k in ("valid_sentence_rate", "mean_valid_sentence_rate", "valid_report_rate",
                                 "repeat_rate", "contradiction_rate", "repeat_or_contradiction_rate")}
    tot = a["n_sentences"].sum()
    per = np.divide(a["n_valid"], a["n_sentences"], out=np.zeros(n), where=a["n_sentences"] > 0)
    return {
        "valid_sentence_rate": float(a["n_valid"].sum() / tot) if tot else 0.0,
        "mean_valid_sentence_rate": float(per.mean()),
        "valid_report_rate": float(a["valid_report"].mean()),
        "repeat_rate": float(a["repeated"].mean()),
        "contradiction_rate": float(a["contradictory"].mean()),
        "repeat_or_contradiction_rate": float(np.maximum(a["repeated"], a["contradictory"]).mean()),
    }


def sentence_validity(preds) -> dict:
    """Validity of generated synthetic reports (a dict id -> report, or a list).

    Returns the rates above plus n_reports, n_sentences and mean_sentences.
    Raises GrammarUnavailable when the synthetic grammar cannot be imported."""
    texts = list(preds.values()) if isinstance(preds, Mapping) else list(preds)
    a = validity_arrays(texts)
    out = validity_from_arrays(a)
    out["n_reports"] = len(texts)
    out["n_sentences"] = int(a["n_sentences"].sum())
    out["mean_sentences"] = float(a["n_sentences"].mean()) if texts else 0.0
    return out
