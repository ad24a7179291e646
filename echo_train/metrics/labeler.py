"""A CheXpert-style rule labeler: mention phrases, negation and uncertainty scopes, sections.

For each of the 14 CheXpert observations a report gets 1 (positive), 0 (negative),
-1 (uncertain) or None (not mentioned). The pipeline follows the CheXpert labeler
(Irvin et al. 2019) in spirit, with regular expressions instead of a dependency parse:

1. Sections: text under INDICATION / HISTORY / COMPARISON / TECHNIQUE ... headers is
   dropped; FINDINGS, IMPRESSION, CONCLUSION and untitled text are kept.
2. Sentences; inside a sentence, clause terminators ("but", "however", ";", a verb such as
   "is") end the scope of a trigger.
3. Mentions: phrases per observation (synonyms such as "enlarged cardiac silhouette",
   "ET tube"), plus "normal state" phrases ("heart size is normal") that mean negative,
   and "borderline" phrases that mean uncertain.
4. Classification of a mention: the nearest negation or uncertainty trigger before it in
   its scope, or a trigger right after it ("... is not seen", "... cannot be excluded").
   Pseudo-triggers ("no change", "not only") are masked first.
5. Aggregation over mentions: positive > uncertain > negative. "No Finding" is 1 when no
   pathology (all but Support Devices) is positive or uncertain, else 0.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

from ..data.study import CHEXPERT_OBSERVATIONS

# The subset most papers report (CheXbert "5 observations").
FIVE_OBSERVATIONS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
)
PATHOLOGIES = tuple(o for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices"))

Label = Optional[int]

# --------------------------------------------------------------------------- sections
_SECTION_RE = re.compile(
    r"(?im)(?:^|(?<=[\s.]))("
    r"findings|impression|conclusions?|summary|opinion|"
    r"indications?|clinical indications?|history|clinical history|reason for (?:exam(?:ination)?|study)|"
    r"comparisons?|technique|examination|exam|procedure|clinical information|"
    r"recommendations?|notification|wet read"
    r")\s*:"
)
KEPT_SECTIONS = frozenset({"findings", "impression", "conclusion", "conclusions", "summary", "opinion"})


def split_sections(report: str) -> list[tuple[Optional[str], str]]:
    """[(section name or None for untitled text, text)] in order of appearance."""
    out: list[tuple[Optional[str], str]] = []
    pos, name = 0, None
    for m in _SECTION_RE.finditer(report):
        if m.start() > pos or name is not None:
            out.append((name, report[pos:m.start()]))
        name, pos = " ".join(m.group(1).lower().split()), m.end()
    out.append((name, report[pos:]))
    return [(n, t) for n, t in out if t.strip()]


def kept_text(report: str, keep: Iterable[str] = KEPT_SECTIONS) -> str:
    keep = set(keep)
    return " . ".join(t for n, t in split_sections(report) if n is None or n in keep)


# --------------------------------------------------------------------------- sentences
_SENT_SPLIT = re.compile(r"(?<!\d)\.(?!\d)|[!\n]|\.(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text) if s.strip()]


def _normalise(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[\u2010-\u2015]", "-", text)
    text = re.sub(r"\s+", " ", text)
    return text


# --------------------------------------------------------------------------- mentions
_DEG = r"(?:(?:very |mildly |moderately |severely |markedly |slightly |minimally |significantly |massively |substantially |increasingly |now |again |newly |still |also )*)"
_BE = r"(?:is|are|was|were|appears?|appearing|remains?|remained|seems?|looks?|has become|have become|has been|have been|is again|is still|is now|is slightly|is mildly|is moderately)"
_HEART = r"(?:heart|heart size|cardiac silhouette|cardiac size|cardiac shadow|cardiac contours?|size of the heart|heart shadow|cardiac diameter)"
_MEDIAST = r"(?:cardiomediastinal (?:silhouette|contours?|shadow|size)|mediastinal and hilar (?:contours?|silhouettes?)|mediastinal (?:silhouette|contours?|shadow|width|structures)|mediastinum|superior mediastinum)"
_NORMAL = r"(?:normal(?: in size| size| in contour)?|within normal limits|unremarkable|not enlarged|not widened|normal in appearance|of normal size)"

# (observation, kind, pattern). kind: "mention" (classified by triggers), "normal"
# (a statement that the observation is absent: 0) or "borderline" (-1).
_MENTIONS: list[tuple[str, str, str]] = [
    # ---- Enlarged Cardiomediastinum
    ("Enlarged Cardiomediastinum", "normal",
     rf"\b(?:normal|unremarkable|stable normal) (?:size of the )?{_MEDIAST}"),
    ("Enlarged Cardiomediastinum", "normal",
     rf"\b{_MEDIAST}(?: and hilar contours| and hila)? {_BE} {_DEG}(?:stable and )?{_NORMAL}"),
    ("Enlarged Cardiomediastinum", "normal", rf"\b{_HEART} and {_MEDIAST} {_BE} {_DEG}{_NORMAL}"),
    ("Enlarged Cardiomediastinum", "borderline",
     rf"\b{_MEDIAST} {_BE} {_DEG}(?:borderline|top normal|upper limits? of normal)"),
    ("Enlarged Cardiomediastinum", "mention",
     rf"\b(?:enlarged|widened|wide|prominent|enlargement of the|widening of the|prominence of the) {_MEDIAST}"),
    ("Enlarged Cardiomediastinum", "mention",
     rf"\b{_MEDIAST} {_BE} {_DEG}(?:not )?(?:enlarged|widened|prominent)"),
    ("Enlarged Cardiomediastinum", "mention", r"\b(?:mediastinal|cardiomediastinal) (?:widening|enlargement|prominence)"),
    ("Enlarged Cardiomediastinum", "mention", r"\benlarged cardiomediastinum\b"),
    # ---- Cardiomegaly
    ("Cardiomegaly", "normal", rf"\bnormal {_HEART}"),
    # A normal cardiomediastinal silhouette includes a normal heart.
    ("Cardiomegaly", "normal", r"\b(?:normal|unremarkable) cardiomediastinal (?:silhouette|contours?)"),
    ("Cardiomegaly", "normal",
     rf"\bcardiomediastinal (?:silhouette|contours?) {_BE} {_DEG}(?:stable and )?(?:normal(?! mediastin)|within normal limits|unremarkable)"),
    ("Cardiomegaly", "normal", rf"\b{_HEART}(?: and mediastin\w+(?: contours?| silhouette)?)? {_BE} {_DEG}(?:stable and )?{_NORMAL}"),
    ("Cardiomegaly", "normal", rf"\b{_HEART} (?:normal|within normal limits)\b"),
    ("Cardiomegaly", "borderline",
     rf"\b(?:borderline|top[- ]normal|upper limits? of normal) (?:{_HEART}|cardiomegaly|enlarged {_HEART}|enlargement of the {_HEART})"),
    ("Cardiomegaly", "borderline",
     rf"\b{_HEART} {_BE} {_DEG}(?:borderline(?: enlarged)?|top[- ]normal|at the upper limits? of normal|upper limits? of normal)"),
    ("Cardiomegaly", "mention", r"\bcardiomegaly\b"),
    ("Cardiomegaly", "mention", r"\bcardiac (?:enlargement|hypertrophy)\b"),
    ("Cardiomegaly", "mention",
     rf"\b(?:enlarged|enlargement of the|increased|prominent|prominence of the|large|globular) {_HEART}"),
    ("Cardiomegaly", "mention",
     rf"\b{_HEART} {_BE} {_DEG}(?:not )?(?:enlarged|increased|prominent|large|globular)"),
    # ---- Lung Opacity
    ("Lung Opacity", "mention",
     r"\b(?:opacit(?:y|ies)|opacification|opacified|infiltrat(?:e|es|ion|ive)|densit(?:y|ies)|"
     r"haziness|hazy|airspace (?:disease|process)|air space (?:disease|process)|ground[- ]glass|"
     r"reticular (?:markings|opacities|pattern)|interstitial (?:markings|opacities|prominence|abnormality|process|disease|thickening)|"
     r"parenchymal (?:abnormality|process))\b"),
    ("Lung Opacity", "normal",
     r"\b(?:the |both )?lungs (?:are|remain|appear) (?:well[- ]expanded and |otherwise |grossly |now )?clear\b"),
    ("Lung Opacity", "normal", r"\bclear lungs\b"),
    # ---- Lung Lesion
    ("Lung Lesion", "mention",
     r"\b(?:nodules?|nodular (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)|(?<!soft tissue )mass(?:es)?|"
     r"(?<!osseous )(?<!lytic )(?<!bony )(?<!sclerotic )(?<!blastic )(?<!skin )lesions?|"
     r"tumou?rs?|neoplasms?|carcinoma|malignancy|metastas(?:is|es)|cavitary lesions?|cavitation)\b"),
    # ---- Edema
    ("Edema", "mention",
     r"\b(?:(?<!soft tissue )(?<!subcutaneous )edema|oedema|(?:pulmonary |vascular |venous )congestion|chf|"
     r"congestive heart failure|heart failure|fluid overload|kerley b lines|cephalization|vascular engorgement)\b"),
    # ---- Consolidation
    ("Consolidation", "mention", r"\bconsolidat(?:ion|ions|ive|ed|ing)\b"),
    # ---- Pneumonia
    ("Pneumonia", "mention", r"\b(?:pneumonias?|bronchopneumonia|pneumonic|infection|infectious (?:process|etiology)|infectious)\b"),
    # ---- Atelectasis
    ("Atelectasis", "mention", r"\b(?:atelecta(?:sis|ses|tic)|(?:lobar|lobe|lung|segmental) collapse|collapse of the)\b"),
    # ---- Pneumothorax
    ("Pneumothorax", "mention", r"\b(?:(?:hydro)?pneumothora(?:x|ces)|ptx)\b"),
    # ---- Pleural Effusion
    ("Pleural Effusion", "mention",
     r"\b(?:(?<!pericardial )(?<!joint )effusions?|pleural fluid|hydrothorax|hydropneumothorax|"
     r"blunting of the (?:\w+ )?(?:costophrenic|cp) angles?|(?:costophrenic|cp) angle blunting)\b"),
    # ---- Pleural Other
    ("Pleural Other", "mention",
     r"\b(?:pleural (?:thickening|plaques?|calcifications?|scarring|scar)|fibrothorax|"
     r"apical (?:pleural )?(?:cap|capping|thickening)|pleuroparenchymal (?:scarring|thickening)|pleural-parenchymal scarring)\b"),
    # ---- Fracture
    ("Fracture", "mention", r"\b(?:fractures?|fractured|fx)\b"),
    # "No acute osseous abnormality" denies a fracture; a positive one is not a fracture.
    ("Fracture", "negonly", r"\b(?:acute )?(?:osseous|bony|skeletal) (?:abnormalit(?:y|ies)|injur(?:y|ies))\b"),
    # ---- Support Devices
    ("Support Devices", "mention",
     r"\b(?:(?:endotracheal|et|tracheostomy|trach|nasogastric|ng|orogastric|og|feeding|chest|enteric|"
     r"dobhoff|gastric|g|j|nasoenteric|esophageal|mediastinal|thoracostomy) tubes?|ett|trach|"
     r"(?:picc|central|central venous|venous|ij|jugular|subclavian|swan[- ]ganz|arterial|dialysis|midline|hemodialysis) (?:lines?|catheters?)|"
     r"picc|catheters?|port-?a-?cath|(?:chest wall|chest|infusion|power) port|pacemaker|pacer|defibrillator|aicd|icd|"
     r"pacing (?:leads?|wires?)|(?:pacemaker|pacer|icd) leads?|sternotomy wires?|stents?|"
     r"(?:prosthetic|mechanical|replacement) valves?|valve replacement|surgical clips?|clips?|coils?|drains?|"
     r"(?:lines|tubes) and (?:tubes|lines)|pigtail|(?:support|monitoring|cardiac) devices?|devices?|hardware|leads|loop recorder|impella|iabp|balloon pump)\b"),
]

_COMPILED: list[tuple[str, str, re.Pattern]] = [(o, k, re.compile(p)) for o, k, p in _MENTIONS]
_KIND_RANK = {"normal": 0, "borderline": 1, "mention": 2, "negonly": 3}
# Lung Opacity is the parent of these parenchymal findings (CheXpert's hierarchy): a
# positive child makes Lung Opacity positive. A nodule or mass (Lung Lesion) does not.
OPACITY_CHILDREN = ("Edema", "Consolidation", "Pneumonia", "Atelectasis")

# --------------------------------------------------------------------------- triggers
_PSEUDO = re.compile(
    r"\b(?:no (?:significant |interval |appreciable |substantial )?(?:change|increase|decrease|worsening|improvement)|"
    r"not (?:significantly )?changed|without (?:significant |interval )?change|not only|no longer|"
    r"gram negative|not necessarily|no further)\b"
)
_UNC_PRE = re.compile(
    r"\b(?:may|might|could|possible|possibly|probable|probably|likely|presumed|presumably|perhaps|potential|"
    r"suspect(?:ed)?|suspicious (?:for|of)|suspicion (?:for|of)|concern(?:ing)? (?:for|of)|worrisome for|"
    r"question(?:able)?(?: of)?|questionably|cannot (?:be )?(?:entirely |completely |definitely )?(?:excluded?|ruled? out)|"
    r"can ?not (?:be )?(?:entirely |completely )?(?:excluded?|ruled? out)|can't (?:be )?(?:excluded?|ruled? out)|"
    r"(?:rule|r/o)(?: out)?|suggest(?:s|ed|ing|ive of)?|indeterminate|equivocal|differential(?: diagnosis)?(?: includes?)?|"
    r"versus|vs\.?|consider(?:ed|ation)?|favou?r(?:s|ed)?|represent(?:s|ing)?|borderline|"
    r"difficult to (?:exclude|assess)|not (?:clearly|definitely) (?:seen|excluded)|\?)"
)
_NEG_PRE = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|resolution of|resolved|removal of|"
    r"interval removal of|never|neither|nor|none|no evidence of|no signs? of|rather than|exclude[sd]?)\b"
)
_UNC_POST = re.compile(
    r"^\s*(?:\w+\s+){0,2}?(?:(?:is|are|was|were|be|remains?|seems?|appears?)\s+(?:\w+\s+)?"
    r"(?:possible|likely|probable|suspected|questioned|questionable|favou?red|considered|a consideration|"
    r"in the differential|not excluded|not ruled out|difficult to exclude)|"
    r"(?:not|cannot|can ?not|can't) (?:be )?(?:entirely |completely )?(?:excluded|ruled out)|"
    r"could (?:be )?(?:present|considered)|is not entirely excluded|\?)"
)
_NEG_POST = re.compile(
    r"^\s*(?:\w+\s+){0,2}?(?:(?:is|are|was|were|has|have|has been|have been)\s+)?(?:now\s+)?"
    r"(?:absent|not (?:seen|identified|visualized|visualised|present|appreciated|evident|demonstrated|detected|noted|observed)|"
    r"resolved|no longer (?:seen|present|visualized|evident|identified|appreciated)|removed|unlikely|excluded|ruled out)\b"
)
# Anything that ends the scope of a trigger inside a sentence.
_TERMINATOR = re.compile(
    r"(?:;|:|\b(?:but|however|although|though|aside from|apart from|except|exception|which|whereas|while|"
    r"nevertheless|yet|otherwise|there is|there are|is|are|was|were|has|have|had|appears?|remains?|"
    r"demonstrates?|shows?|seen|noted|identified|given|due to|secondary to|with)\b)"
)
_PRE_MAX_WORDS = 14


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        for i in range(a, b):
            chars[i] = "_"
    return "".join(chars)


def _find_mentions(sent: str) -> list[tuple[str, str, int, int]]:
    """(observation, kind, start, end) with overlaps inside one observation resolved."""
    found: list[tuple[str, str, int, int]] = []
    for obs, kind, pat in _COMPILED:
        for m in pat.finditer(sent):
            found.append((obs, kind, m.start(), m.end()))
    # Per observation keep non-overlapping spans, preferring normal/borderline statements
    # (they contain the plain mention) and then longer spans.
    found.sort(key=lambda t: (t[0], _KIND_RANK[t[1]], -(t[3] - t[2]), t[2]))
    kept: list[tuple[str, str, int, int]] = []
    for cand in found:
        if any(k[0] == cand[0] and k[2] < cand[3] and cand[2] < k[3] for k in kept):
            continue
        kept.append(cand)
    # Lung Opacity is not mentioned by the word "density" inside "nodular density" etc.:
    # a lesion phrase wins over an opacity phrase at the same place.
    lesion = [k for k in kept if k[0] == "Lung Lesion"]
    kept = [k for k in kept if not (k[0] == "Lung Opacity" and any(l[2] <= k[2] and k[3] <= l[3] for l in lesion))]
    return sorted(kept, key=lambda t: t[2])


def _classify(sent: str, masked: str, unc: list, neg: list, start: int, end: int, kind: str) -> Optional[int]:
    if kind == "negonly":
        lab = _classify(sent, masked, unc, neg, start, end, "mention")
        return 0 if lab == 0 else None
    if kind == "normal":
        return 0
    if kind == "borderline":
        return -1
    inner = masked[start:end]
    # A trigger after the mention: "... is not seen", "... cannot be excluded", "...?".
    tail = masked[end:]
    t = _TERMINATOR_AFTER.search(tail)
    tail_clause = tail[: t.start()] if t else tail
    if _UNC_POST.match(tail_clause) or _UNC_POST.match(tail):
        return -1
    if _NEG_POST.match(tail):
        return 0
    # Negation inside a long mention ("heart size is not enlarged").
    if re.search(r"\b(?:not|no)\b", inner):
        return 0
    # The nearest trigger before the mention, within its scope.
    best: Optional[tuple[int, int]] = None  # (trigger end, label)
    for spans, lab in ((unc, -1), (neg, 0)):
        for a, b in spans:
            if b > start:
                continue
            between = masked[b:start]
            if _TERMINATOR.search(between) or len(between.split()) > _PRE_MAX_WORDS:
                continue
            if best is None or b > best[0]:
                best = (b, lab)
    return 1 if best is None else best[1]


_TERMINATOR_AFTER = re.compile(r";|\b(?:but|however|although|though|which|whereas|while|and there)\b")


def _label_sentence(sent: str) -> list[tuple[str, int]]:
    pseudo = [m.span() for m in _PSEUDO.finditer(sent)]
    masked = _mask(sent, pseudo)
    unc = [m.span() for m in _UNC_PRE.finditer(masked)]
    masked_unc = _mask(masked, unc)
    neg = [m.span() for m in _NEG_PRE.finditer(masked_unc)]
    # Negation triggers are searched with the uncertainty phrases masked ("not excluded"
    # is uncertain, not negative); post-triggers read the text with those phrases intact.
    out = []
    for obs, kind, a, b in _find_mentions(sent):
        lab = _classify(sent, masked, unc, neg, a, b, kind)
        if lab is not None:
            out.append((obs, lab))
    return out


def _aggregate(values: list[int]) -> Label:
    if not values:
        return None
    if 1 in values:
        return 1
    if -1 in values:
        return -1
    return 0


@lru_cache(maxsize=65536)
def _label_cached(report: str, keep: frozenset, opacity_hierarchy: bool) -> tuple:
    text = _normalise(kept_text(report, keep))
    sentences = split_sentences(text)
    per_obs: dict[str, list[int]] = {o: [] for o in CHEXPERT_OBSERVATIONS}
    for sent in sentences:
        for obs, lab in _label_sentence(sent):
            per_obs[obs].append(lab)
    labels: dict[str, Label] = {o: _aggregate(v) for o, v in per_obs.items()}
    if opacity_hierarchy and any(labels[o] == 1 for o in OPACITY_CHILDREN):
        labels["Lung Opacity"] = 1
    if any(labels[o] in (1, -1) for o in PATHOLOGIES):
        labels["No Finding"] = 0
    else:
        labels["No Finding"] = 1 if sentences else None  # an empty report states nothing
    return tuple(labels[o] for o in CHEXPERT_OBSERVATIONS)


def label_report(report: str, sections: Iterable[str] = KEPT_SECTIONS,
                 opacity_hierarchy: bool = True) -> dict[str, Label]:
    """The 14 CheXpert labels of one report: 1, 0, -1 or None (not mentioned).

    `sections`: section names whose text is read (untitled text always is).
    `opacity_hierarchy`: a positive Edema / Consolidation / Pneumonia / Atelectasis makes
    Lung Opacity positive."""
    vals = _label_cached(report or "", frozenset(sections), bool(opacity_hierarchy))
    return dict(zip(CHEXPERT_OBSERVATIONS, vals))


def label_reports(reports: Iterable[str], sections: Iterable[str] = KEPT_SECTIONS,
                  opacity_hierarchy: bool = True) -> list[dict[str, Label]]:
    return [label_report(r, sections, opacity_hierarchy) for r in reports]


def explain(report: str) -> list[tuple[str, str, int]]:
    """(sentence, observation, label) for every mention: for debugging the rules."""
    out = []
    for sent in split_sentences(_normalise(kept_text(report))):
        for obs, lab in _label_sentence(sent):
            out.append((sent, obs, lab))
    return out
