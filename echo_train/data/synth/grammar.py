"""The report grammar of the synthetic benchmark: every sentence it can say, and what each one means.

This module is the single source of truth for report text. The generator (`reports.py`)
only ever emits sentences built from the `STATEMENTS` below, and the evaluation code
checks generated text against the same table, so "valid sentence" means exactly "a sentence
the generator can produce".

Stable API (used by echo_train/metrics):

- `split_sentences(report) -> list[str]`: sentences of a report; the "FINDINGS:" and
  "IMPRESSION:" headings that `study.format_report` writes are dropped.
- `is_valid_sentence(sentence) -> bool`: True iff the sentence, after normalisation
  (lower case, collapsed whitespace, no space before punctuation, final period optional),
  is one the generator can produce.
- `sentence_findings(sentence) -> list[(observation, value)]`: the CheXpert observations a
  valid sentence asserts, value 1 positive, 0 negative, -1 uncertain; [] for an invalid one.

Extras: `split_sections`, `normalize_sentence`, `sentence_info` (statement key and
attributes, e.g. side and size), `report_labels` (the exact labeler: the 14 CheXpert labels
a report states; the generator computes its ground-truth labels with this same function).

Note for repetition checks: by design the impression restates the positive findings of
the findings section (in a shorter wording), so look for repeats within a section, or
compare `sentence_info(...).key`/attrs rather than observations across sections.

Text is lower case throughout; sentences end with a period and never contain one inside.
Side words name the PATIENT's side (as in radiology reports); images are drawn as a PA
view, so the patient's left is on the image's right.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

from ..study import CHEXPERT_OBSERVATIONS

OBSERVATIONS: tuple[str, ...] = CHEXPERT_OBSERVATIONS
# Observations that are pathology (No Finding is 1 only when none of these is 1 or -1).
PATHOLOGIES: tuple[str, ...] = tuple(o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices"))

# Attribute domains (the values `findings.py` samples and `reports.py` realises).
SIDES = ("left", "right")
SIDES3 = ("left", "right", "bilateral")
EFFUSION_SIZES = ("small", "moderate", "large")
CARDIO_SEVERITY = ("mild", "moderate", "severe")
EDEMA_SEVERITY = ("mild", "moderate")
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
ZONES = ("right upper", "right lower", "left upper", "left lower")
LESION_KINDS = ("nodule", "mass")

_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_ATEL = {  # atelectasis side -> adjective, location phrase
    "left": ("left basilar", "left lung base"),
    "right": ("right basilar", "right lung base"),
    "bilateral": ("bibasilar", "lung bases"),
}


@dataclass(frozen=True)
class Statement:
    """One thing a report can say, with its paraphrases and its meaning."""

    key: str
    findings: tuple[tuple[str, int], ...]
    templates: tuple[str, ...]
    attrs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # attribute name -> domain
    forms: Optional[Callable[[dict], dict]] = None  # extra template slots derived from attrs

    def domain(self) -> list[dict]:
        names = [a for a, _ in self.attrs]
        return [dict(zip(names, vals)) for vals in itertools.product(*(d for _, d in self.attrs))]

    def realise(self, attrs: Optional[dict] = None) -> list[str]:
        """All paraphrases of this statement for the given attributes."""
        attrs = dict(attrs or {})
        slots = dict(attrs)
        if self.forms is not None:
            slots.update(self.forms(attrs))
        return [t.format(**slots) for t in self.templates]


def _s(key, findings, templates, attrs=(), forms=None) -> Statement:
    return Statement(key, tuple(findings), tuple(templates), tuple(attrs), forms)


_SEV = [("severity", CARDIO_SEVERITY)]

STATEMENTS: tuple[Statement, ...] = (
    # ---- heart and mediastinum ----
    _s("heart_normal", [("Cardiomegaly", 0)], [
        "the heart size is normal.",
        "heart size is within normal limits.",
        "the cardiac silhouette is normal in size.",
        "there is no cardiomegaly.",
    ]),
    _s("heart_enlarged", [("Cardiomegaly", 1)], [
        "the heart is {adv} enlarged.",
        "there is {severity} cardiomegaly.",
        "the cardiac silhouette is {adv} enlarged.",
        "{severity} enlargement of the cardiac silhouette is noted.",
    ], _SEV, lambda a: {"adv": _ADVERB[a["severity"]]}),
    _s("mediastinum_normal", [("Enlarged Cardiomediastinum", 0)], [
        "the mediastinal contours are normal.",
        "mediastinal and hilar contours are unremarkable.",
        "the mediastinal silhouette is within normal limits.",
    ]),
    _s("cardiomediastinal_normal", [("Cardiomegaly", 0), ("Enlarged Cardiomediastinum", 0)], [
        "the cardiomediastinal silhouette is normal.",
        "the cardiomediastinal silhouette is within normal limits.",
        "heart size and mediastinal contours are normal.",
    ]),
    # ---- lungs ----
    _s("lungs_clear", [("Lung Opacity", 0)], [
        "the lungs are clear.",
        "the lungs are well expanded and clear.",
        "both lungs are clear.",
    ]),
    _s("consolidation_neg", [("Consolidation", 0)], [
        "there is no focal consolidation.",
        "no focal consolidation is seen.",
        "no focal airspace consolidation is identified.",
    ]),
    _s("consolidation_pos", [("Consolidation", 1), ("Lung Opacity", 1)], [
        "there is a focal consolidation in the {lobe}.",
        "focal consolidation is present in the {lobe}.",
        "there is {lobe} consolidation.",
        "an area of consolidation is seen in the {lobe}.",
    ], [("lobe", LOBES)]),
    _s("edema_neg", [("Edema", 0)], [
        "there is no pulmonary edema.",
        "no pulmonary edema is seen.",
        "there is no evidence of pulmonary edema.",
    ]),
    _s("edema_pos", [("Edema", 1), ("Lung Opacity", 1)], [
        "there is {severity} pulmonary edema.",
        "{severity} pulmonary edema is present.",
        "findings are consistent with {severity} pulmonary edema.",
        "{severity} perihilar opacities are consistent with pulmonary edema.",
    ], [("severity", EDEMA_SEVERITY)]),
    _s("lesion_neg", [("Lung Lesion", 0)], [
        "there are no pulmonary nodules or masses.",
        "no pulmonary nodule or mass is seen.",
        "no focal nodule or mass is identified.",
    ]),
    _s("lesion_pos", [("Lung Lesion", 1)], [
        "there is a {kind} in the {zone} lung.",
        "a {kind} is seen in the {zone} lung.",
        "a rounded {kind} is present in the {zone} lung zone.",
        "a well circumscribed {kind} projects over the {zone} lung.",
    ], [("kind", LESION_KINDS), ("zone", ZONES)]),
    _s("atelectasis_pos", [("Atelectasis", 1), ("Lung Opacity", 1)], [
        "there is {adj} atelectasis.",
        "{adj} opacities are consistent with atelectasis.",
        "there is plate like atelectasis at the {base}.",
        "{adj} atelectasis is present.",
    ], [("side", SIDES3)], lambda a: {"adj": _ATEL[a["side"]][0], "base": _ATEL[a["side"]][1]}),
    # ---- pleura ----
    _s("effusion_neg", [("Pleural Effusion", 0)], [
        "there is no pleural effusion.",
        "no pleural effusion is seen.",
        "there is no evidence of pleural effusion.",
    ]),
    _s("effusion_pos", [("Pleural Effusion", 1)], [
        "there is a {size} {side} pleural effusion.",
        "a {size} {side} pleural effusion is present.",
        "a {size} {side} pleural effusion is noted.",
        "there is a {size} pleural effusion on the {side}.",
    ], [("size", EFFUSION_SIZES), ("side", SIDES)]),
    _s("effusion_bilateral_pos", [("Pleural Effusion", 1)], [
        "there are {size} bilateral pleural effusions.",
        "{size} bilateral pleural effusions are present.",
        "{size} pleural effusions are seen bilaterally.",
    ], [("size", EFFUSION_SIZES)]),
    _s("pneumothorax_neg", [("Pneumothorax", 0)], [
        "there is no pneumothorax.",
        "no pneumothorax is seen.",
        "no pneumothorax is identified.",
    ]),
    _s("pneumothorax_pos", [("Pneumothorax", 1)], [
        "there is a {side} pneumothorax.",
        "a {side} pneumothorax is present.",
        "there is a {side} sided pneumothorax.",
        "a {side} pneumothorax is seen with a visible pleural line.",
    ], [("side", SIDES)]),
    _s("effusion_pneumothorax_neg", [("Pleural Effusion", 0), ("Pneumothorax", 0)], [
        "there is no pleural effusion or pneumothorax.",
        "no pleural effusion or pneumothorax is seen.",
        "there is no evidence of pleural effusion or pneumothorax.",
    ]),
    _s("consolidation_effusion_pneumothorax_neg",
       [("Consolidation", 0), ("Pleural Effusion", 0), ("Pneumothorax", 0)], [
        "there is no focal consolidation, pleural effusion, or pneumothorax.",
        "no focal consolidation, pleural effusion, or pneumothorax is seen.",
        "there is no evidence of focal consolidation, pleural effusion, or pneumothorax.",
    ]),
    # ---- bones ----
    _s("fracture_neg", [("Fracture", 0)], [
        "there is no acute osseous abnormality.",
        "no displaced rib fractures are seen.",
        "no acute fracture is identified.",
    ]),
    _s("fracture_pos", [("Fracture", 1)], [
        "there is a {side} rib fracture.",
        "a {side} rib fracture is seen.",
        "a fracture of a {side} rib is noted.",
        "a {side} sided rib fracture is present.",
    ], [("side", SIDES)]),
    # ---- support devices ----
    _s("ett", [("Support Devices", 1)], [
        "an endotracheal tube is in standard position.",
        "the endotracheal tube terminates above the carina.",
        "an endotracheal tube is present with its tip above the carina.",
    ]),
    _s("central_line", [("Support Devices", 1)], [
        "a {side} internal jugular central venous catheter terminates in the superior vena cava.",
        "a {side} internal jugular line ends in the superior vena cava.",
        "a {side} sided central venous catheter has its tip in the superior vena cava.",
    ], [("side", SIDES)]),
    _s("pacemaker", [("Support Devices", 1)], [
        "a left chest wall pacemaker is present with leads in the right heart.",
        "a pacemaker device is seen in the left chest wall with leads in the right heart.",
        "a left sided pacemaker is in place with leads terminating in the right heart.",
    ]),
    # ---- impression ----
    _s("imp_normal", [("No Finding", 1)], [
        "no acute cardiopulmonary process.",
        "no acute cardiopulmonary abnormality.",
        "no acute intrathoracic process.",
    ]),
    _s("imp_cardiomegaly", [("Cardiomegaly", 1)], [
        "{severity} cardiomegaly.",
        "{severity} enlargement of the cardiac silhouette.",
        "{adv} enlarged heart.",
    ], _SEV, lambda a: {"adv": _ADVERB[a["severity"]]}),
    _s("imp_edema", [("Edema", 1), ("Lung Opacity", 1)], [
        "{severity} pulmonary edema.",
        "findings consistent with {severity} pulmonary edema.",
        "{severity} pulmonary edema is present.",
    ], [("severity", EDEMA_SEVERITY)]),
    _s("imp_consolidation", [("Consolidation", 1), ("Lung Opacity", 1), ("Pneumonia", -1)], [
        "{lobe} consolidation concerning for pneumonia.",
        "{lobe} consolidation, which may represent pneumonia.",
        "consolidation in the {lobe}, possibly pneumonia.",
    ], [("lobe", LOBES)]),
    _s("imp_lesion", [("Lung Lesion", 1)], [
        "{zone} lung {kind}, recommend chest ct for further evaluation.",
        "{kind} in the {zone} lung, further evaluation with chest ct is recommended.",
        "{zone} lung {kind}, chest ct is recommended for further characterization.",
    ], [("kind", LESION_KINDS), ("zone", ZONES)]),
    _s("imp_atelectasis", [("Atelectasis", 1), ("Lung Opacity", 1)], [
        "{adj} atelectasis.",
        "{adj} atelectasis is present.",
        "atelectasis at the {base}.",
    ], [("side", SIDES3)], lambda a: {"adj": _ATEL[a["side"]][0], "base": _ATEL[a["side"]][1]}),
    _s("imp_effusion", [("Pleural Effusion", 1)], [
        "{size} {side} pleural effusion.",
        "{size} {side} pleural effusion is present.",
        "{side} pleural effusion, {size} in size.",
    ], [("size", EFFUSION_SIZES), ("side", SIDES)]),
    _s("imp_effusion_bilateral", [("Pleural Effusion", 1)], [
        "{size} bilateral pleural effusions.",
        "{size} bilateral pleural effusions are present.",
        "bilateral pleural effusions, {size} in size.",
    ], [("size", EFFUSION_SIZES)]),
    _s("imp_pneumothorax", [("Pneumothorax", 1)], [
        "{side} pneumothorax.",
        "{side} pneumothorax is present.",
        "{side} sided pneumothorax.",
    ], [("side", SIDES)]),
    _s("imp_fracture", [("Fracture", 1)], [
        "{side} rib fracture.",
        "{side} rib fracture is present.",
        "fracture of a {side} rib.",
    ], [("side", SIDES)]),
    _s("imp_devices", [("Support Devices", 1)], [
        "support devices in standard position.",
        "lines and tubes are in standard position.",
        "support devices are appropriately positioned.",
    ]),
)

STATEMENTS_BY_KEY: dict[str, Statement] = {s.key: s for s in STATEMENTS}


@dataclass(frozen=True)
class SentenceInfo:
    key: str  # statement key, e.g. "effusion_pos"
    attrs: tuple[tuple[str, str], ...]  # e.g. (("side", "left"), ("size", "small"))
    findings: tuple[tuple[str, int], ...]


_WS = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:])")
_HEADING = re.compile(r"\b(findings|impression)\s*:", re.IGNORECASE)


def normalize_sentence(sentence: str) -> str:
    """Lower case, single spaces, no space before punctuation, no final period."""
    s = _WS.sub(" ", sentence.lower()).strip()
    s = _SPACE_BEFORE_PUNCT.sub(r"\1", s)
    return s.rstrip(". ").strip()


@lru_cache(maxsize=1)
def sentence_table() -> dict[str, SentenceInfo]:
    """Every sentence the generator can produce (normalised) -> its meaning."""
    table: dict[str, SentenceInfo] = {}
    for st in STATEMENTS:
        for attrs in st.domain():
            for text in st.realise(attrs):
                body = text.rstrip(".")
                if "." in body or not text.endswith(".") or text != text.lower():
                    raise AssertionError(f"template breaks the sentence rules: {text!r}")
                info = SentenceInfo(st.key, tuple(sorted(attrs.items())), st.findings)
                key = normalize_sentence(text)
                old = table.get(key)
                if old is not None and old.findings != info.findings:
                    raise AssertionError(f"ambiguous sentence {text!r}: {old.key} vs {st.key}")
                table.setdefault(key, info)
    return table


def split_sections(report: str) -> dict[str, str]:
    """{"findings": ..., "impression": ...} of a report written by `format_report`.

    Text before any heading counts as findings."""
    out = {"findings": "", "impression": ""}
    pos, current = 0, "findings"
    for m in _HEADING.finditer(report):
        out[current] = (out[current] + " " + report[pos : m.start()]).strip()
        current, pos = m.group(1).lower(), m.end()
    out[current] = (out[current] + " " + report[pos:]).strip()
    return out


def split_sentences(report: str) -> list[str]:
    """Sentences of a report, section headings dropped, each ending with a period."""
    text = _HEADING.sub(" ", report)
    parts = [p.strip() for p in text.split(".")]
    return [p + "." for p in parts if p]


def sentence_info(sentence: str) -> Optional[SentenceInfo]:
    """Statement key, attributes and findings of a valid sentence; None if invalid."""
    return sentence_table().get(normalize_sentence(sentence))


def is_valid_sentence(sentence: str) -> bool:
    """True iff the sentence is exactly one the generator can produce (after normalisation)."""
    return normalize_sentence(sentence) in sentence_table()


def sentence_findings(sentence: str) -> list[tuple[str, int]]:
    """CheXpert observations a valid sentence asserts, with value 1/0/-1; [] if invalid."""
    info = sentence_info(sentence)
    return list(info.findings) if info is not None else []


def report_labels(report: str) -> dict[str, Optional[int]]:
    """The 14 CheXpert labels a report states (an exact labeler for this grammar).

    Per observation over the valid sentences: 1 if any sentence asserts it, else -1 if any
    asserts it uncertain, else 0 if any negates it, else None (not mentioned).
    No Finding: 0 if any pathology is 1 or -1, else 1 if the report has a valid sentence,
    else None. Invalid sentences are ignored."""
    seen: dict[str, set[int]] = {}
    n_valid = 0
    for s in split_sentences(report):
        info = sentence_info(s)
        if info is None:
            continue
        n_valid += 1
        for obs, v in info.findings:
            seen.setdefault(obs, set()).add(v)
    labels: dict[str, Optional[int]] = {}
    for obs in OBSERVATIONS:
        vals = seen.get(obs, set())
        labels[obs] = 1 if 1 in vals else -1 if -1 in vals else 0 if 0 in vals else None
    if any(labels[o] in (1, -1) for o in PATHOLOGIES):
        labels["No Finding"] = 0
    else:
        labels["No Finding"] = 1 if n_valid else None
    return labels


def vocabulary() -> set[str]:
    """Distinct words the grammar uses (punctuation stripped)."""
    words: set[str] = set()
    for s in sentence_table():
        words.update(w.strip(",.;:") for w in s.split())
    return {w for w in words if w}
