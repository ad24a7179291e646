"""Sampling which findings a synthetic study has, with realistic co-occurrence.

A study's findings are a dict `name -> attributes`; {} is a normal study. Names and
attribute domains (values come from `grammar.py`):

    cardiomegaly       severity: mild | moderate | severe
    pleural_effusion   side: left | right | bilateral, size: small | moderate | large
    pneumothorax       side: left | right
    consolidation      lobe: right upper lobe | ... | left lower lobe
    lung_lesion        kind: nodule | mass, zone: right upper | right lower | left upper | left lower
    atelectasis        side: left | right | bilateral
    edema              severity: mild | moderate
    rib_fracture       side: left | right
    endotracheal_tube  (none)
    central_line       side: left | right (internal jugular entry side)
    pacemaker          (none)

Co-occurrence comes from two latent patient states: heart failure (cardiomegaly, edema,
bilateral effusions, pacemaker) and intensive care (tubes and lines, consolidation,
atelectasis, pneumothorax). About a third of studies are normal.

A study's *combination* (`combination_key`) is the set of positive finding names with
their side (left/right/bilateral where the finding has one; a lobe or zone gives its
side); the three devices count as one name, `support_devices`. Severity, size, lobe
within a side, lesion kind and device type are not part of it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .grammar import CARDIO_SEVERITY, EDEMA_SEVERITY, EFFUSION_SIZES, LESION_KINDS, LOBES, SIDES, ZONES

Findings = dict[str, dict[str, Any]]

P_NORMAL = 0.33
DEVICES = ("endotracheal_tube", "central_line", "pacemaker")
FINDING_NAMES = (
    "cardiomegaly", "pleural_effusion", "pneumothorax", "consolidation", "lung_lesion",
    "atelectasis", "edema", "rib_fracture", *DEVICES,
)


def _choice(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _side_of(text: str) -> str:
    return "left" if text.startswith("left") else "right"


def sample_findings(rng: np.random.Generator, p_normal: float = P_NORMAL) -> Findings:
    """One study's findings ({} for a normal study)."""
    if rng.random() < p_normal:
        return {}
    while True:
        f = _sample_abnormal(rng)
        if f:
            return f


def _sample_abnormal(rng: np.random.Generator) -> Findings:
    f: Findings = {}
    chf = rng.random() < 0.35  # heart failure
    icu = rng.random() < 0.3  # intensive care
    r = rng.random

    if r() < (0.6 if chf else 0.12):
        f["cardiomegaly"] = {"severity": _choice(rng, CARDIO_SEVERITY, [0.4, 0.35, 0.25])}
    if r() < (0.55 if chf else 0.04):
        f["edema"] = {"severity": _choice(rng, EDEMA_SEVERITY, [0.55, 0.45])}
    if r() < (0.5 if chf else 0.15) + (0.1 if icu else 0.0):
        side = _choice(rng, ("left", "right", "bilateral"), [0.2, 0.3, 0.5] if chf else [0.35, 0.45, 0.2])
        f["pleural_effusion"] = {"side": side, "size": _choice(rng, EFFUSION_SIZES, [0.45, 0.35, 0.2])}
    if r() < (0.3 if icu else 0.2):
        f["consolidation"] = {"lobe": _choice(rng, LOBES, [0.2, 0.15, 0.3, 0.15, 0.2])}
    if r() < 0.12:
        f["lung_lesion"] = {"kind": _choice(rng, LESION_KINDS, [0.6, 0.4]), "zone": _choice(rng, ZONES)}
    if r() < 0.07 + (0.05 if icu else 0.0):
        f["rib_fracture"] = {"side": _choice(rng, SIDES)}
    p_ptx = 0.05 + (0.08 if icu else 0.0) + (0.3 if "rib_fracture" in f else 0.0)
    if r() < p_ptx:
        _add_pneumothorax(rng, f)
    p_atel = 0.12 + (0.15 if icu else 0.0) + (0.15 if "pleural_effusion" in f else 0.0)
    if r() < p_atel:
        f["atelectasis"] = {"side": _choice(rng, ("left", "right", "bilateral"), [0.35, 0.3, 0.35])}
    if icu:
        if r() < 0.55:
            f["endotracheal_tube"] = {}
        if r() < 0.65:
            f["central_line"] = {"side": _choice(rng, SIDES, [0.3, 0.7])}
    elif r() < 0.06:
        f["central_line"] = {"side": _choice(rng, SIDES, [0.3, 0.7])}
    if r() < (0.2 if chf else 0.02):
        f["pacemaker"] = {}
    return f


def _add_pneumothorax(rng: np.random.Generator, f: Findings) -> None:
    """A pneumothorax, mostly on a fractured rib's side, never on the side of an effusion (no
    hydropneumothorax in this benchmark: none beside a bilateral one)."""
    side = f["rib_fracture"]["side"] if "rib_fracture" in f and rng.random() < 0.8 else _choice(rng, SIDES)
    eff = f.get("pleural_effusion", {}).get("side")
    if eff == "bilateral":
        return
    if eff == side:
        side = "left" if side == "right" else "right"
    f["pneumothorax"] = {"side": side}


def finding_side(name: str, attrs: dict[str, Any]) -> str | None:
    if name in ("pleural_effusion", "pneumothorax", "atelectasis", "rib_fracture"):
        return attrs["side"]
    if name == "consolidation":
        return _side_of(attrs["lobe"])
    if name == "lung_lesion":
        return _side_of(attrs["zone"])
    return None


def combination_key(findings: Findings) -> str:
    """Positive finding names with their sides, devices merged: e.g. 'cardiomegaly+pleural_effusion:left'."""
    parts = set()
    for name, attrs in findings.items():
        if name in DEVICES:
            parts.add("support_devices")
            continue
        side = finding_side(name, attrs)
        parts.add(f"{name}:{side}" if side else name)
    return "+".join(sorted(parts)) if parts else "normal"


def is_normal(findings: Findings) -> bool:
    return not findings


def sample_split_findings(
    rng: np.random.Generator, n: int, seen: set[str], unseen_fraction: float, max_tries: int = 2000
) -> list[tuple[Findings, bool]]:
    """n studies of a held-out split: round(unseen_fraction * n) of them (at random places)
    have a combination not in `seen` (the training combinations), the rest one in it."""
    n_unseen = int(round(unseen_fraction * n))
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[:n_unseen]] = True
    out = []
    for want_unseen in flags:
        f: Findings = {}
        for _ in range(max_tries):
            f = sample_findings(rng)
            if (combination_key(f) not in seen) == bool(want_unseen):
                break
        else:
            f = _force(rng, bool(want_unseen), seen)
        out.append((f, combination_key(f) not in seen))
    return out


def _force(rng: np.random.Generator, want_unseen: bool, seen: set[str]) -> Findings:
    """Fallback when rejection sampling fails (tiny training sets)."""
    if not want_unseen:
        return {}  # only reached when 'normal' itself is unseen; callers accept the miss
    while True:  # pile findings together until the combination is new
        f = _sample_abnormal(rng)
        g = _sample_abnormal(rng)
        for k, v in g.items():
            f.setdefault(k, v)
        if combination_key(f) not in seen:
            return f
