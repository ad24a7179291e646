"""evaluate_reports: every metric on one set of generated vs reference reports, with
per-study scores, corpus scores and paired bootstrap 95% confidence intervals.

A metric whose model or runtime is missing is kept in the result as
"not computed: REASON"; it is never replaced by another metric under the same name.
All metrics share one set of bootstrap resamples (seeded), so differences between two
systems evaluated with the same seed and ids are paired.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from . import text_overlap as tx
from .bootstrap import bootstrap_ci
from .finding_f1 import f1_from_matrices, labels_matrix
from .labeler import label_report
from .semscore import ModelUnavailable

ALL_METRICS: tuple[str, ...] = (
    "finding_f1", "bleu", "rouge", "meteor", "cider",
    "semscore", "embedding_cosine", "cls_cosine", "ratescore", "chexbert_f1", "validity",
)
# Real-report metrics. "validity" only makes sense on the synthetic benchmark.
DEFAULT_METRICS: tuple[str, ...] = (
    "finding_f1", "bleu", "rouge", "meteor", "cider", "semscore", "cls_cosine", "ratescore", "chexbert_f1",
)
# Quick metrics for training-time validation loops (no models, no Java).
FAST_METRICS: tuple[str, ...] = ("finding_f1", "bleu", "rouge")


@dataclass
class EvalConfig:
    n_boot: int = 1000                      # bootstrap resamples; 0 disables the CIs
    seed: int = 0
    ci: float = 0.95
    uncertain_as_positive: bool = False     # finding F1: does -1 count as positive?
    rouge_stemmer: bool = False
    semscore_model: Optional[str] = None    # all-mpnet-base-v2 folder (else ECHO_SEMSCORE_MODEL, else PyPI parts)
    embedding_model: Optional[str] = None   # any encoder folder for embedding_cosine (mean pooling)
    embedding_label: Optional[str] = None   # its name in the results, e.g. "MiniLM"
    cls_model: Optional[str] = None         # encoder folder for the SembScore-style CLS cosine
    ratescore_ner: Optional[str] = None     # RaTE-NER-Deberta folder
    ratescore_biolord: Optional[str] = None  # BioLORD-2023-C folder
    chexbert_weights: Optional[str] = None  # chexbert.pth (f1chexbert reads the HF cache)
    device: Optional[str] = None
    progress: bool = False                  # tqdm bars for model-based metrics


@dataclass
class MetricResult:
    name: str
    computed: bool
    reason: Optional[str] = None
    scores: dict[str, float] = field(default_factory=dict)           # corpus-level values
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # bootstrap CIs
    per_study: dict[str, list[float]] = field(default_factory=dict)  # aligned with EvalResult.ids
    info: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.computed else f"not computed: {self.reason}"

    def to_dict(self, per_study: bool = True) -> dict:
        d = asdict(self)
        d["status"] = self.status
        d["ci"] = {k: [float(a), float(b)] for k, (a, b) in self.ci.items()}
        if not per_study:
            d.pop("per_study")
        return d


@dataclass
class EvalResult:
    ids: list[str]
    metrics: dict[str, MetricResult]
    config: dict

    @property
    def n(self) -> int:
        return len(self.ids)

    def __getitem__(self, name: str) -> MetricResult:
        return self.metrics[name]

    def summary(self) -> dict[str, object]:
        """{metric/key: value} for computed metrics, {metric: "not computed: ..."} otherwise."""
        out: dict[str, object] = {}
        for name, m in self.metrics.items():
            if not m.computed:
                out[name] = m.status
            else:
                out.update(m.scores)  # score keys are unique across metrics
        return out

    def to_dict(self, per_study: bool = True) -> dict:
        return {
            "n": self.n,
            "ids": list(self.ids),
            "config": self.config,
            "summary": self.summary(),
            "metrics": {k: m.to_dict(per_study) for k, m in self.metrics.items()},
        }

    def to_json(self, per_study: bool = True, indent: int = 2) -> str:
        return json.dumps(self.to_dict(per_study), indent=indent, default=_json_default)

    def to_markdown(self, digits: int = 4) -> str:
        ci_pct = int(round(self.config.get("ci", 0.95) * 100))
        lines = [f"| metric | value | {ci_pct}% CI |", "|---|---|---|"]
        for name, m in self.metrics.items():
            if not m.computed:
                lines.append(f"| {name} | not computed: {m.reason} | |")
                continue
            for k, v in m.scores.items():
                ci = m.ci.get(k)
                ci_s = f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""
                lines.append(f"| {k} | {v:.{digits}f} | {ci_s} |")
        head = f"{self.n} studies; bootstrap n={self.config.get('n_boot')}, seed={self.config.get('seed')}"
        return head + "\n\n" + "\n".join(lines) + "\n"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


# --------------------------------------------------------------------------- helpers
def match_ids(preds: Mapping[str, str], refs: Mapping[str, str]) -> list[str]:
    """Ids in prediction order; every prediction needs a reference and vice versa."""
    no_ref = [i for i in preds if i not in refs]
    no_pred = [i for i in refs if i not in preds]
    if no_ref or no_pred:
        msg = []
        if no_ref:
            msg.append(f"{len(no_ref)} prediction id(s) have no reference, e.g. {no_ref[:5]}")
        if no_pred:
            msg.append(f"{len(no_pred)} reference id(s) have no prediction, e.g. {no_pred[:5]}")
        raise KeyError("; ".join(msg))
    for d, what in ((preds, "prediction"), (refs, "reference")):
        bad = [i for i, t in d.items() if not isinstance(t, str)]
        if bad:
            raise TypeError(f"{what} for id {bad[0]!r} is {type(d[bad[0]]).__name__}, not str")
    return list(preds)


# Each runner returns (scores, per_study, stat(idx)->scores for the CI, info).
Runner = Callable[[list[str], list[str], EvalConfig], tuple[dict, dict, Optional[Callable], dict]]


def _run_finding_f1(P, R, cfg):
    lp = [label_report(p) for p in P]
    lr = [label_report(r) for r in R]
    mp = labels_matrix(lp, cfg.uncertain_as_positive)
    mr = labels_matrix(lr, cfg.uncertain_as_positive)
    full = f1_from_matrices(mp, mr)
    keys = ("micro_f1", "macro_f1", "micro_f1_5", "macro_f1_5")
    scores = {f"finding_{k}": full[k] for k in keys}
    tp = (mp & mr).sum(1)
    denom = mp.sum(1) + mr.sum(1)
    example = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)

    def stat(idx):
        f = f1_from_matrices(mp[idx], mr[idx])
        return {f"finding_{k}": f[k] for k in keys}

    info = {
        "labeler": "echo_train.metrics.labeler (CheXpert-style rules)",
        "positive": "label 1 or -1" if cfg.uncertain_as_positive else "label 1",
        "per_observation": full["per_observation"],
        "per_study": "example_f1: F1 over the 14 observations of one study (1.0 when neither has a positive)",
    }
    return scores, {"example_f1": example}, stat, info


def _run_bleu(P, R, cfg):
    b = tx.bleu(P, R)
    stats = b["stats"]

    def stat(idx):
        v = tx.bleu_from_stats(stats[idx].sum(0))
        return {f"bleu{k + 1}": v[k] for k in range(4)}

    return b["corpus"], b["per_study"], stat, {"formula": "coco-caption corpus BLEU", "tokens": "lower-case words"}


def _run_rouge(P, R, cfg):
    r = tx.rouge(P, R, cfg.rouge_stemmer)
    per = r["per_study"]
    return r["corpus"], per, lambda idx: {k: float(v[idx].mean()) for k, v in per.items()}, \
        {"package": "rouge_score", "stemmer": cfg.rouge_stemmer, "value": "F-measure, mean over studies"}


def _run_meteor(P, R, cfg):
    m = tx.meteor(P, R)
    per = m["per_study"]["meteor"]
    scores = {"meteor": m["corpus"]["meteor"], "meteor_mean": float(per.mean()) if len(per) else 0.0}
    return scores, m["per_study"], lambda idx: {"meteor_mean": float(per[idx].mean())}, \
        {"implementation": "METEOR 1.5 jar (pycocoevalcap)", "ci": "of meteor_mean (mean of per-study scores)"}


def _run_cider(P, R, cfg):
    c = tx.cider(P, R)
    per = c["per_study"]["cider"]
    return c["corpus"], c["per_study"], lambda idx: {"cider": float(per[idx].mean())}, \
        {"implementation": "pycocoevalcap Cider (x10), document frequencies from the references"}


def _run_semscore(P, R, cfg):
    from .semscore import resolve_mpnet, semscore

    folder = resolve_mpnet(cfg.semscore_model)
    per = semscore(P, R, folder, cfg.device, cfg.progress)
    return {"semscore": float(per.mean())}, {"semscore": per}, lambda idx: {"semscore": float(per[idx].mean())}, \
        {"model": "sentence-transformers/all-mpnet-base-v2 (sha256 verified)", "folder": str(folder),
         "pooling": "mean"}


def _run_embedding_cosine(P, R, cfg):
    from pathlib import Path

    from .semscore import embedding_cosine

    if not cfg.embedding_model:
        raise ModelUnavailable("no encoder folder given (--embedding-model DIR)")
    per = embedding_cosine(P, R, cfg.embedding_model, "mean", cfg.device, cfg.progress)
    label = cfg.embedding_label or Path(cfg.embedding_model).name
    key = f"embedding_cosine[{label}]"
    return {key: float(per.mean())}, {key: per}, lambda idx: {key: float(per[idx].mean())}, \
        {"model": label, "folder": str(cfg.embedding_model), "pooling": "mean",
         "note": "mean-pooled cosine of this model; not SemScore unless the model is all-mpnet-base-v2"}


def _run_cls_cosine(P, R, cfg):
    from .semscore import embedding_cosine

    if not cfg.cls_model:
        raise ModelUnavailable("no encoder folder given for the SembScore-style CLS cosine (--cls-model DIR)")
    per = embedding_cosine(P, R, cfg.cls_model, "cls", cfg.device, cfg.progress)
    return {"cls_cosine": float(per.mean())}, {"cls_cosine": per}, lambda idx: {"cls_cosine": float(per[idx].mean())}, \
        {"folder": str(cfg.cls_model), "pooling": "cls (first token)", "style": "SembScore-style"}


def _run_ratescore(P, R, cfg):
    from .model_metrics import ratescore

    per = ratescore(P, R, cfg.ratescore_ner, cfg.ratescore_biolord, use_gpu=(cfg.device or "").startswith("cuda"))
    return {"ratescore": float(per.mean())}, {"ratescore": per}, lambda idx: {"ratescore": float(per[idx].mean())}, \
        {"ner": cfg.ratescore_ner, "biolord": cfg.ratescore_biolord}


def _run_chexbert(P, R, cfg):
    from .model_metrics import chexbert_f1

    scores = chexbert_f1(P, R, cfg.chexbert_weights, cfg.device)
    return scores, {}, None, {"package": "f1chexbert", "ci": "not bootstrapped (one model pass per resample)"}


def _run_validity(P, R, cfg):
    from .validity import validity_arrays, validity_from_arrays

    a = validity_arrays(P)
    scores = validity_from_arrays(a)
    per = {
        "valid_sentence_share": np.divide(a["n_valid"], a["n_sentences"], out=np.zeros(len(P)),
                                          where=a["n_sentences"] > 0),
        "repeated": a["repeated"],
        "contradictory": a["contradictory"],
    }
    return scores, per, lambda idx: validity_from_arrays(a, idx), \
        {"grammar": "echo_train.data.synth.grammar", "n_sentences": int(a["n_sentences"].sum())}


_RUNNERS: dict[str, Runner] = {
    "finding_f1": _run_finding_f1,
    "bleu": _run_bleu,
    "rouge": _run_rouge,
    "meteor": _run_meteor,
    "cider": _run_cider,
    "semscore": _run_semscore,
    "embedding_cosine": _run_embedding_cosine,
    "cls_cosine": _run_cls_cosine,
    "ratescore": _run_ratescore,
    "chexbert_f1": _run_chexbert,
    "validity": _run_validity,
}


def _unavailable_errors() -> tuple[type, ...]:
    from .text_overlap import MeteorUnavailable
    from .validity import GrammarUnavailable

    return (ModelUnavailable, MeteorUnavailable, GrammarUnavailable)


def evaluate_reports(preds: Mapping[str, str], refs: Mapping[str, str],
                     metrics: Optional[Sequence[str]] = None, config: Optional[EvalConfig] = None) -> EvalResult:
    """Score generated reports against references, matched by id.

    `metrics`: names from ALL_METRICS (default DEFAULT_METRICS). Returns an EvalResult with
    corpus scores, per-study scores and bootstrap CIs; unavailable metrics are listed as
    "not computed: REASON"."""
    config = config or EvalConfig()
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    unknown = [m for m in metrics if m not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
    ids = match_ids(preds, refs)
    P = [preds[i] for i in ids]
    R = [refs[i] for i in ids]
    n = len(ids)
    idx = np.random.default_rng(config.seed).integers(0, n, size=(config.n_boot, n)) if n and config.n_boot > 0 else None
    unavailable = _unavailable_errors()
    out: dict[str, MetricResult] = {}
    for name in metrics:
        key = name
        if name == "embedding_cosine":
            from pathlib import Path

            label = config.embedding_label or (Path(config.embedding_model).name if config.embedding_model else None)
            key = f"embedding_cosine[{label}]" if label else name
        try:
            scores, per, stat, info = _RUNNERS[name](P, R, config)
        except unavailable as e:
            out[key] = MetricResult(key, False, reason=str(e))
            continue
        cis = bootstrap_ci(stat, n, config.n_boot, config.seed, config.ci, idx) if stat is not None and idx is not None else {}
        per_lists = {k: [float(x) for x in np.asarray(v).reshape(-1)] for k, v in per.items()}
        clean = {k: (float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else float("nan"))
                 for k, v in scores.items()}
        out[key] = MetricResult(key, True, scores=clean, ci=cis, per_study=per_lists, info=info)
    cfg = asdict(config)
    cfg["metrics"] = metrics
    return EvalResult(ids=ids, metrics=out, config=cfg)
