"""Finding F1: CheXpert labels of generated vs reference reports, F1 over positives.

A study is positive for an observation when its label is 1 (by default uncertain -1 and
None count as not positive; `uncertain_as_positive=True` counts -1 as positive, the
other common convention). Micro F1 pools TP/FP/FN over observations; macro F1 averages
per-observation F1. An observation with no positives in either set has F1 0 (the
scikit-learn default), which the per-observation `support` makes visible.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from .bootstrap import bootstrap_ci
from .labeler import CHEXPERT_OBSERVATIONS, FIVE_OBSERVATIONS, label_report

Labels = Mapping[str, Optional[int]]


def labels_matrix(labels: Sequence[Labels], uncertain_as_positive: bool = False) -> np.ndarray:
    """[n, 14] 0/1 matrix of positives."""
    pos = {1, -1} if uncertain_as_positive else {1}
    return np.array([[1 if lab.get(o) in pos else 0 for o in CHEXPERT_OBSERVATIONS] for lab in labels],
                    dtype=np.int64).reshape(len(labels), len(CHEXPERT_OBSERVATIONS))


def _f1(tp: float, fp: float, fn: float) -> float:
    d = 2 * tp + fp + fn
    return float(2 * tp / d) if d > 0 else 0.0


def f1_from_matrices(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Micro/macro F1 over all 14 and over the 5-observation subset, from 0/1 matrices."""
    tp = (pred & ref).sum(0).astype(float)
    fp = (pred & (1 - ref)).sum(0).astype(float)
    fn = ((1 - pred) & ref).sum(0).astype(float)
    per = [_f1(tp[i], fp[i], fn[i]) for i in range(len(CHEXPERT_OBSERVATIONS))]
    idx5 = [CHEXPERT_OBSERVATIONS.index(o) for o in FIVE_OBSERVATIONS]
    return {
        "micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()),
        "macro_f1": float(np.mean(per)),
        "micro_f1_5": _f1(tp[idx5].sum(), fp[idx5].sum(), fn[idx5].sum()),
        "macro_f1_5": float(np.mean([per[i] for i in idx5])),
        "per_observation": {
            o: {"f1": per[i], "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "support": int(tp[i] + fn[i])}
            for i, o in enumerate(CHEXPERT_OBSERVATIONS)
        },
    }


def finding_f1_from_labels(pred_labels: Sequence[Labels], ref_labels: Sequence[Labels],
                           uncertain_as_positive: bool = False) -> dict:
    if len(pred_labels) != len(ref_labels):
        raise ValueError(f"{len(pred_labels)} predicted label sets vs {len(ref_labels)} reference label sets")
    p = labels_matrix(pred_labels, uncertain_as_positive)
    r = labels_matrix(ref_labels, uncertain_as_positive)
    out = f1_from_matrices(p, r)
    out["n"] = len(pred_labels)
    return out


def _as_lists(preds, refs) -> tuple[list[str], list[str]]:
    if isinstance(preds, Mapping):
        if not isinstance(refs, Mapping):
            raise TypeError("preds is a dict: refs must be a dict with the same ids")
        missing = [k for k in preds if k not in refs]
        if missing:
            raise KeyError(f"{len(missing)} prediction ids have no reference, e.g. {missing[:5]}")
        ids = list(preds)
        return [preds[i] for i in ids], [refs[i] for i in ids]
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    return preds, refs


def finding_f1(preds, refs, uncertain_as_positive: bool = False) -> dict:
    """Cheap finding F1 of generated vs reference reports (dicts by id, or aligned lists).

    Returns {"micro_f1", "macro_f1", "micro_f1_5", "macro_f1_5", "per_observation", "n"}.
    """
    p, r = _as_lists(preds, refs)
    return finding_f1_from_labels([label_report(x) for x in p], [label_report(x) for x in r],
                                  uncertain_as_positive)


def paired_micro_f1_difference(preds_a, preds_b, refs, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                               uncertain_as_positive: bool = False) -> dict:
    """micro F1(a) - micro F1(b) on the same studies, with a paired percentile bootstrap CI.

    preds_a, preds_b and refs are dicts by study id (a's ids must all be in b and refs). Both
    systems are scored on every resample of the same studies, so the interval reflects the
    difference between them, not the much larger spread of either score across test sets.
    Returns {"delta", "ci95": (lo, hi) or None when n_boot == 0, "n"}.
    """
    ids = list(preds_a)
    missing = [i for i in ids if i not in preds_b or i not in refs]
    if missing:
        raise KeyError(f"{len(missing)} study ids lack a prediction of b or a reference, e.g. {missing[:5]}")
    ref = labels_matrix([label_report(refs[i]) for i in ids], uncertain_as_positive)
    pa = labels_matrix([label_report(preds_a[i]) for i in ids], uncertain_as_positive)
    pb = labels_matrix([label_report(preds_b[i]) for i in ids], uncertain_as_positive)

    def delta(idx) -> float:
        return f1_from_matrices(pa[idx], ref[idx])["micro_f1"] - f1_from_matrices(pb[idx], ref[idx])["micro_f1"]

    n = len(ids)
    cis = bootstrap_ci(lambda idx: {"delta": delta(idx)}, n, n_boot, seed, ci)
    return {"delta": delta(np.arange(n)), "ci95": cis.get("delta"), "n": n}
