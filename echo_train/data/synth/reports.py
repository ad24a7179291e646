"""Writing a study's report from its findings, with the grammar's paraphrases.

Findings section, in the order a radiologist would vary it:
  1. support devices (each one sentence),
  2. positive lung and pleural findings, shuffled,
  3. heart and mediastinum (placed before the positives, after them, or among the negatives),
  4. negative statements for every absent finding, shuffled, sometimes merged
     ("no pleural effusion or pneumothorax"),
  5. bones (a rib fracture, or "no acute osseous abnormality").
Impression: positives by clinical priority (neighbours sometimes swapped), then devices;
"no acute cardiopulmonary process" when there is no pathology.
Atelectasis and support devices have no negative statement (their label stays None).
Labels are computed from the written text by `grammar.report_labels`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..study import format_report
from .findings import DEVICES, Findings
from .grammar import STATEMENTS_BY_KEY, report_labels

_IMPRESSION_PRIORITY = (
    "pneumothorax", "consolidation", "edema", "pleural_effusion", "cardiomegaly",
    "lung_lesion", "atelectasis", "rib_fracture",
)


def _say(rng: np.random.Generator, key: str, attrs: Optional[dict] = None) -> str:
    options = STATEMENTS_BY_KEY[key].realise(attrs or {})
    return options[int(rng.integers(len(options)))]


def _shuffled(rng: np.random.Generator, items: list) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _positive_sentence(rng, name: str, a: dict, imp: bool = False) -> str:
    p = "imp_" if imp else ""
    if name == "pleural_effusion":
        if a["side"] == "bilateral":
            return _say(rng, p + ("effusion_bilateral" if imp else "effusion_bilateral_pos"), {"size": a["size"]})
        return _say(rng, p + ("effusion" if imp else "effusion_pos"), a)
    key = {
        "cardiomegaly": ("heart_enlarged", "imp_cardiomegaly"),
        "edema": ("edema_pos", "imp_edema"),
        "consolidation": ("consolidation_pos", "imp_consolidation"),
        "lung_lesion": ("lesion_pos", "imp_lesion"),
        "atelectasis": ("atelectasis_pos", "imp_atelectasis"),
        "pneumothorax": ("pneumothorax_pos", "imp_pneumothorax"),
        "rib_fracture": ("fracture_pos", "imp_fracture"),
    }[name][1 if imp else 0]
    return _say(rng, key, a)


def write_findings(rng: np.random.Generator, f: Findings) -> str:
    """The FINDINGS text: devices, then the lungs and the heart in one of three orders, then the bones.
    Every sentence is drawn from rng in a fixed order (devices, positives, heart, negatives, layout)."""
    devices = _device_sentences(rng, f)
    lung_names = ("consolidation", "lung_lesion", "atelectasis", "edema", "pleural_effusion", "pneumothorax")
    positives = _shuffled(rng, [_positive_sentence(rng, n, f[n]) for n in lung_names if n in f])
    cardio = _heart_sentences(rng, f)
    negatives = _negative_sentences(rng, f)
    where = int(rng.integers(3))
    if where == 0:
        body = cardio + positives + negatives
    elif where == 1:
        body = positives + cardio + negatives
    else:
        k = int(rng.integers(len(negatives) + 1))
        body = positives + negatives[:k] + cardio + negatives[k:]
    bones = _positive_sentence(rng, "rib_fracture", f["rib_fracture"]) if "rib_fracture" in f else _say(rng, "fracture_neg")
    return " ".join(devices + body + [bones])


def _device_sentences(rng: np.random.Generator, f: Findings) -> list[str]:
    devices = []
    if "endotracheal_tube" in f:
        devices.append(_say(rng, "ett"))
    if "central_line" in f:
        devices.append(_say(rng, "central_line", f["central_line"]))
    if "pacemaker" in f:
        devices.append(_say(rng, "pacemaker"))
    return _shuffled(rng, devices)


def _heart_sentences(rng: np.random.Generator, f: Findings) -> list[str]:
    if "cardiomegaly" in f:
        return _shuffled(rng, [_positive_sentence(rng, "cardiomegaly", f["cardiomegaly"]),
                               _say(rng, "mediastinum_normal")])
    if rng.random() < 0.4:
        return [_say(rng, "cardiomediastinal_normal")]
    return [_say(rng, "heart_normal"), _say(rng, "mediastinum_normal")]


def _negative_sentences(rng: np.random.Generator, f: Findings) -> list[str]:
    """What is absent, sometimes several absences in one sentence, shuffled."""
    negatives = []
    if not any(n in f for n in ("consolidation", "lung_lesion", "atelectasis", "edema")):
        negatives.append(_say(rng, "lungs_clear"))
    absent = {n for n in ("consolidation", "pleural_effusion", "pneumothorax") if n not in f}
    if len(absent) == 3 and rng.random() < 0.25:
        negatives.append(_say(rng, "consolidation_effusion_pneumothorax_neg"))
        absent.clear()
    elif {"pleural_effusion", "pneumothorax"} <= absent and rng.random() < 0.4:
        negatives.append(_say(rng, "effusion_pneumothorax_neg"))
        absent -= {"pleural_effusion", "pneumothorax"}
    neg_key = {"consolidation": "consolidation_neg", "pleural_effusion": "effusion_neg", "pneumothorax": "pneumothorax_neg"}
    for n in ("consolidation", "pleural_effusion", "pneumothorax"):
        if n in absent:
            negatives.append(_say(rng, neg_key[n]))
    if "edema" not in f:
        negatives.append(_say(rng, "edema_neg"))
    if "lung_lesion" not in f:
        negatives.append(_say(rng, "lesion_neg"))
    return _shuffled(rng, negatives)


def write_impression(rng: np.random.Generator, f: Findings) -> str:
    pathology = [n for n in _IMPRESSION_PRIORITY if n in f]
    order = np.argsort(np.arange(len(pathology)) + rng.normal(0.0, 0.6, len(pathology)), kind="stable")
    sentences = [_positive_sentence(rng, pathology[i], f[pathology[i]], imp=True) for i in order]
    if not sentences:
        sentences.append(_say(rng, "imp_normal"))
    if any(d in f for d in DEVICES):
        sentences.append(_say(rng, "imp_devices"))
    return " ".join(sentences)


def write_report(rng: np.random.Generator, f: Findings) -> dict:
    """{"findings", "impression", "report", "labels"} of one study."""
    findings = write_findings(rng, f)
    impression = write_impression(rng, f)
    report = format_report(findings, impression)
    return {"findings": findings, "impression": impression, "report": report, "labels": report_labels(report)}
