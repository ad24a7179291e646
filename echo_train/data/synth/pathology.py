"""Drawing the findings onto the anatomy: large and high-contrast, so that a tiny model
seeing a 64-px downsample can tell them apart.

Lung findings change the density of aerated lung (`L`) inside one lung's mask; bone and
device findings are drawn on the whole image (`D`) afterwards.
"""
from __future__ import annotations

import numpy as np

from .anatomy import (
    Anatomy, Lung, bezier, ellipse_sdist, low_freq_noise, polyline_dist, rib_center, segment_dist, soft_inside,
)
from .findings import Findings

_LOBE_POS = {  # lobe -> (lat, vert) in lung-relative coordinates
    "upper": (0.5, 0.32),
    "middle": (0.42, 0.6),
    "lower": (0.62, 0.76),
}
_EFFUSION_HEIGHT = {"small": 0.17, "moderate": 0.33, "large": 0.55}  # fraction of lung height
_EDEMA_AMP = {"mild": 0.24, "moderate": 0.38}


def _blend(L, mask, value):
    return L * (1.0 - mask) + mask * value


def lung_findings(an: Anatomy, side: str, L: np.ndarray, x, y, f: Findings, rng: np.random.Generator) -> np.ndarray:
    """Apply every finding that lives inside the `side` lung to its density L, in the order of
    _LUNG_FINDINGS (the draws from rng follow it)."""
    lung: Lung = an.lung(side)
    for name, in_this_lung, draw in _LUNG_FINDINGS:
        spec = f.get(name)
        if name in f and in_this_lung(spec, side):
            L = draw(L, lung, x, y, spec, rng, an.size)
    return L


def _edema(L, lung: Lung, x, y, spec, rng: np.random.Generator, S: int) -> np.ndarray:
    """The lung denser towards its hilum (bat wing), mottled."""
    amp = _EDEMA_AMP[spec["severity"]]
    hx, hy = lung.at(0.22, 0.5)
    g = np.exp(-((x - hx) ** 2 + ((y - hy) * 0.75) ** 2) / (2 * 0.13**2))
    return L + amp * g * (1.0 + 0.35 * low_freq_noise(rng, S, 12)) + 0.25 * amp


def _consolidation(L, lung: Lung, x, y, spec, rng: np.random.Generator, S: int) -> np.ndarray:
    """A dense patch with a ragged edge in the named lobe."""
    u = rng.uniform
    lat, vert = _LOBE_POS[spec["lobe"].split()[1]]
    px, py = lung.at(lat + u(-0.06, 0.06), vert + u(-0.04, 0.04))
    rx, ry = u(0.09, 0.11), u(0.08, 0.1)
    r = np.sqrt(((x - px) / rx) ** 2 + ((y - py) / ry) ** 2) + 0.22 * low_freq_noise(rng, S, 14)
    mask = soft_inside((r - 1.0) * min(rx, ry), S, 3.0)
    return _blend(L, mask, 0.64 + 0.04 * low_freq_noise(rng, S, 20))


def _lung_lesion(L, lung: Lung, x, y, spec, rng: np.random.Generator, S: int) -> np.ndarray:
    """A round opacity in the upper or lower zone: a nodule, or a larger mass."""
    u = rng.uniform
    if spec["zone"].endswith("upper"):
        px, py = lung.at(u(0.4, 0.62), u(0.3, 0.4))
    else:
        px, py = lung.at(u(0.45, 0.68), u(0.6, 0.7))
    r = u(0.035, 0.045) if spec["kind"] == "nodule" else u(0.07, 0.085)
    disc = soft_inside(ellipse_sdist(x, y, px, py, r, r * u(0.9, 1.0)), S, 1.2)
    return np.minimum(L + 0.5 * disc, 0.9)


def _atelectasis(L, lung: Lung, x, y, spec, rng: np.random.Generator, S: int) -> np.ndarray:
    """Two plate-like bands above the dome, and a denser base."""
    top = lung.dome(np.float32(lung.xd))
    v = (float(top) - lung.ya) / lung.ry
    band = np.full_like(x, 1.0)
    for j in range(2):
        vj = v - 0.07 - 0.08 * j + rng.uniform(-0.015, 0.015)
        band = np.minimum(band, segment_dist(x, y, lung.at(0.15, vj + 0.03), lung.at(0.9, vj - 0.02)))
    L = np.maximum(L, 0.55 * soft_inside(band - 0.011, S, 1.5))
    return L + 0.16 * np.clip(1.0 - (lung.dome(x) - y) / 0.1, 0.0, 1.0)


def _pneumothorax(L, lung: Lung, x, y, spec, rng: np.random.Generator, S: int) -> np.ndarray:
    """The lung collapsed towards its hilum, a visible pleural line, black air around it."""
    hx, hy = lung.at(0.08, 0.5)
    k = rng.uniform(0.52, 0.65)
    sd = lung.sdist(hx + (x - hx) / k, hy + (y - hy) / k) * k  # the collapsed lung
    inside = soft_inside(sd, S, 1.5)
    L = _blend(L + 0.1, 1.0 - inside, 0.0)  # denser collapsed lung, black air without markings
    return np.maximum(L, 0.45 * soft_inside(np.abs(sd) - 0.004, S, 1.2))


def _pleural_effusion(L, lung: Lung, x, y, spec, rng: np.random.Generator, S: int) -> np.ndarray:
    """Fluid filling the base up to a meniscus, its height by the effusion's size."""
    h = _EFFUSION_HEIGHT[spec["size"]] * rng.uniform(0.9, 1.1)
    lat = np.clip(lung.sign * (x - (lung.xm - lung.sign * lung.rx)) / (2 * lung.rx), 0.0, 1.0)
    level = lung.yc - h * lung.ry - 0.06 * lat**2  # meniscus: higher at the chest wall
    fluid = soft_inside(level - y, S, 2.5)
    return _blend(L, fluid, 0.6 + 0.08 * np.clip((y - level) / 0.1, 0.0, 1.0))


# (finding, whether it lies in the given lung, how it is drawn there), in drawing order
_LUNG_FINDINGS = (
    ("edema", lambda spec, side: True, _edema),
    ("consolidation", lambda spec, side: bool(spec) and spec["lobe"].startswith(side), _consolidation),
    ("lung_lesion", lambda spec, side: bool(spec) and spec["zone"].startswith(side), _lung_lesion),
    ("atelectasis", lambda spec, side: bool(spec) and spec["side"] in (side, "bilateral"), _atelectasis),
    ("pneumothorax", lambda spec, side: bool(spec) and spec["side"] == side, _pneumothorax),
    ("pleural_effusion", lambda spec, side: bool(spec) and spec["side"] in (side, "bilateral"), _pleural_effusion),
)


def bone_findings(an: Anatomy, D: np.ndarray, x, y, f: Findings, rng: np.random.Generator) -> np.ndarray:
    fr = f.get("rib_fracture")
    if fr:
        S = an.size
        lung = an.lung(fr["side"])
        k = int(rng.integers(3, 7))
        d = abs(lung.lateral_x - an.cx) * rng.uniform(0.72, 0.82)
        px, py = rib_center(an, fr["side"], k, d)
        gap = soft_inside(ellipse_sdist(x, y, px, py, 0.008, 0.02), S, 1.0)
        D = D - 0.12 * gap
        callus = soft_inside(ellipse_sdist(x, y, px + rng.uniform(-0.01, 0.01), py, 0.055, 0.034), S, 1.5)
        D = D + 0.4 * callus * (1.0 - gap)
    return D


def devices(an: Anatomy, D: np.ndarray, x, y, f: Findings, rng: np.random.Generator) -> np.ndarray:
    S = an.size
    u = rng.uniform
    metal = 0.97
    if "endotracheal_tube" in f:
        tip = an.carina_y - u(0.04, 0.07)
        d = segment_dist(x, y, (an.cx, -0.05), (an.cx, tip))
        D = np.maximum(D, metal * soft_inside(d - 0.011, S, 1.2))
    if "central_line" in f:
        s = -1 if f["central_line"]["side"] == "right" else 1
        pts = bezier((an.cx + s * 0.14, -0.02), (an.cx + s * 0.09, 0.22), (an.cx - 0.035, u(0.37, 0.42)), 10)
        D = np.maximum(D, metal * soft_inside(polyline_dist(x, y, pts) - 0.008, S, 1.2))
    if "pacemaker" in f:
        gx, gy = an.cx + u(0.24, 0.28), u(0.17, 0.22)
        box = np.maximum(np.abs(x - gx) - 0.055, np.abs(y - gy) - 0.04)
        D = np.maximum(D, 1.0 * soft_inside(box, S, 1.2))
        lead = np.full_like(x, 1.0)
        for end in ((an.cx - 0.03, an.heart_cy - 0.06), (an.cx + 0.03, an.heart_cy + 0.07)):
            lead = np.minimum(lead, polyline_dist(x, y, bezier((gx - 0.03, gy + 0.02), (an.cx + 0.05, 0.27), end, 10)))
        D = np.maximum(D, metal * soft_inside(lead - 0.006, S, 1.2))
    return D
