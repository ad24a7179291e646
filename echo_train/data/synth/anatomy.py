"""Normal chest anatomy of a synthetic PA radiograph, drawn with vectorised NumPy.

Everything lives in normalised coordinates (x, y in [0, 1], y down). The image shows a
PA view: the patient's RIGHT is on the image's LEFT. Intensities are radiographic density
(0 air ... 1 metal). `Anatomy` holds the sampled geometry so that findings can be drawn
relative to the lungs (see `pathology.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from .findings import Findings


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def soft_inside(sdist: np.ndarray, size: int, width_px: float = 1.5) -> np.ndarray:
    """1 inside (sdist < 0), 0 outside, a linear ramp `width_px` pixels wide."""
    return np.clip(0.5 - sdist * size / width_px, 0.0, 1.0)


def ellipse_sdist(x, y, cx, cy, rx, ry) -> np.ndarray:
    """Approximate signed distance to an ellipse (negative inside)."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return (r - 1.0) * min(rx, ry)


def segment_dist(x, y, p0, p1) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-12
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / L2, 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def polyline_dist(x, y, points) -> np.ndarray:
    d = segment_dist(x, y, points[0], points[1])
    for a, b in zip(points[1:-1], points[2:]):
        d = np.minimum(d, segment_dist(x, y, a, b))
    return d


def bezier(p0, p1, p2, n: int = 8) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)
    pts = (1 - t)[:, None] ** 2 * np.array(p0) + 2 * ((1 - t) * t)[:, None] * np.array(p1) + t[:, None] ** 2 * np.array(p2)
    return [tuple(p) for p in pts]


def low_freq_noise(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    """Smooth noise in about [-1, 1] (bicubic upsampling of a small random grid)."""
    small = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    im = Image.fromarray(small, mode="L").resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 127.5 - 1.0


@dataclass
class Lung:
    sign: int  # -1: patient's right (image left), +1: patient's left (image right)
    xm: float  # ellipse centre x
    rx: float
    ya: float  # apex y
    yc: float  # costophrenic angle y (ellipse centre y)
    hd: float  # dome height above yc
    xd: float  # dome peak x

    @property
    def ry(self) -> float:
        return self.yc - self.ya

    def dome(self, x):
        return self.yc - self.hd * np.clip(1.0 - ((x - self.xd) / (self.rx * 1.15)) ** 2, 0.0, 1.0)

    def at(self, lat: float, vert: float) -> tuple[float, float]:
        """Point by lung-relative coordinates: lat 0 medial .. 1 lateral, vert 0 apex .. 1 base."""
        return self.xm + self.sign * self.rx * (2 * lat - 1), self.ya + vert * self.ry

    def sdist(self, x, y):
        e = ellipse_sdist(x, y, self.xm, self.yc, self.rx, self.ry)
        return np.maximum(e, y - self.dome(x))

    @property
    def lateral_x(self) -> float:
        return self.xm + self.sign * self.rx


@dataclass
class Anatomy:
    size: int
    cx: float
    body_w: float
    right: Lung
    left: Lung
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    carina_y: float
    rib_y0: float
    rib_sp: float
    extra: dict = field(default_factory=dict)

    def lung(self, side: str) -> Lung:
        return self.left if side == "left" else self.right

    @property
    def thoracic_width(self) -> float:
        return self.left.lateral_x - self.right.lateral_x

    @property
    def ctr(self) -> float:
        return 2 * self.heart_rx / self.thoracic_width


CTR_RANGE = {None: (0.38, 0.47), "mild": (0.55, 0.59), "moderate": (0.61, 0.65), "severe": (0.68, 0.74)}


def sample_anatomy(rng: np.random.Generator, size: int, findings: Findings) -> Anatomy:
    u = rng.uniform
    cx = 0.5 + u(-0.02, 0.02)
    off, rx = u(0.185, 0.215), u(0.145, 0.17)
    ya = u(0.1, 0.15)
    yc = u(0.72, 0.8)
    atel = findings.get("atelectasis", {}).get("side")
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):
        hd = u(0.08, 0.11) if side == "right" else u(0.06, 0.09)
        ycs = yc + (0.0 if side == "right" else u(0.0, 0.02))
        if atel in (side, "bilateral"):
            hd += 0.05  # volume loss: the hemidiaphragm rises
        xm = cx + sign * (off + u(-0.01, 0.01))
        rxs = rx + u(-0.01, 0.01)
        lungs[side] = Lung(sign, xm, rxs, ya + u(-0.01, 0.01), ycs, hd, xm - sign * 0.25 * rxs)
    an = Anatomy(size, cx, u(0.41, 0.47), lungs["right"], lungs["left"], 0, 0, 0, 0,
                 carina_y=u(0.3, 0.34), rib_y0=ya + u(-0.07, -0.04), rib_sp=u(0.058, 0.066))
    sev = findings.get("cardiomegaly", {}).get("severity")
    ctr = u(*CTR_RANGE[sev])
    W = ctr * an.thoracic_width
    an.heart_rx = W / 2
    an.heart_cx = cx - 0.33 * W + W / 2
    an.heart_ry = u(0.11, 0.13) + (0.03 if sev else 0.0)
    bottom = lungs["left"].yc - 0.03
    an.heart_cy = bottom - 0.75 * an.heart_ry
    return an


def diaphragm_y(an: Anatomy, x):
    return np.where(x < an.cx, an.right.dome(x), an.left.dome(x))


def draw_body(an: Anatomy, x, y) -> np.ndarray:
    """Soft tissue and abdomen: density without lungs or bones."""
    S = an.size
    neck = 0.085
    t = np.clip((y - 0.02) / 0.17, 0.0, 1.0)
    w = neck + (an.body_w - neck) * t * t * (3 - 2 * t)
    dx = np.abs(x - an.cx)
    body = soft_inside(dx - w, S, 2.0)
    tissue = 0.30 + 0.14 * np.clip(1 - (dx / np.maximum(w, 1e-3)) ** 2, 0, 1)
    abdomen = soft_inside(diaphragm_y(an, x) - y, S, 2.0) * 0.16
    return 0.03 + body * (tissue - 0.03 + abdomen)


def lung_mask(lung: Lung, x, y, size: int) -> np.ndarray:
    return soft_inside(lung.sdist(x, y), size, 1.5)


def lung_texture(lung: Lung, x, y, noise: np.ndarray) -> np.ndarray:
    """Density of aerated lung: dark, with vascular markings brighter towards the hilum."""
    hx, hy = lung.at(0.12, 0.5)
    r = np.hypot(x - hx, (y - hy) * 0.8)
    return 0.12 + 0.11 * np.exp(-r / 0.1) + 0.035 * noise


def mediastinum_mask(an: Anatomy, x, y) -> tuple[np.ndarray, np.ndarray]:
    """(mediastinum incl. aortic knob, heart) soft masks."""
    S = an.size
    w = 0.058 + 0.01 * np.clip((y - 0.2) / 0.3, 0, 1)
    band = soft_inside(np.maximum(np.abs(x - an.cx) - w, np.maximum(0.04 - y, y - an.heart_cy)), S)
    knob = soft_inside(ellipse_sdist(x, y, an.cx + 0.06, 0.29, 0.035, 0.03), S)
    heart = soft_inside(ellipse_sdist(x, y, an.heart_cx, an.heart_cy, an.heart_rx, an.heart_ry), S)
    return np.maximum(band, knob), heart


def airway_mask(an: Anatomy, x, y) -> np.ndarray:
    S = an.size
    d = segment_dist(x, y, (an.cx, 0.0), (an.cx, an.carina_y))
    for sgn in (-1, 1):
        d = np.minimum(d, segment_dist(x, y, (an.cx, an.carina_y), (an.cx + sgn * 0.06, an.carina_y + 0.08)))
    return soft_inside(d - 0.016, S)


def rib_density(an: Anatomy, x, y, n_ribs: int = 10) -> np.ndarray:
    """Posterior ribs as arcs from the spine, plus clavicles and the spine."""
    S = an.size
    d = np.abs(x - an.cx)
    g = 0.9 * (d - 0.08) ** 2 - 0.0058
    phase = (y - an.rib_y0 - g) / an.rib_sp
    frac = phase - np.floor(phase)
    prof = np.clip(1.0 - np.abs(frac - 0.17) / 0.17, 0.0, 1.0) ** 0.6
    lateral = np.maximum(an.left.lateral_x - an.cx, an.cx - an.right.lateral_x) + 0.03
    keep = (phase >= 0) & (phase < n_ribs) & (d > 0.025) & (d < lateral)
    ribs = 0.11 * prof * keep
    clav = np.full_like(x, 1.0)
    for sgn in (-1, 1):
        pts = [(an.cx + sgn * 0.035, 0.2), (an.cx + sgn * 0.16, 0.185), (an.cx + sgn * 0.29, 0.135)]
        clav = np.minimum(clav, polyline_dist(x, y, pts))
    clavicles = 0.2 * soft_inside(clav - 0.014, S)
    spine_band = soft_inside(d - 0.03, S) * (y > 0.02)
    vert = 0.05 + 0.05 * (np.sin(2 * np.pi * y / 0.05) > -0.5)
    return ribs + clavicles + spine_band * vert


def rib_center(an: Anatomy, side: str, k: int, d: float) -> tuple[float, float]:
    """Image point on rib k at distance d from the midline on the given side."""
    sign = -1 if side == "right" else 1
    g = 0.9 * (d - 0.08) ** 2 - 0.0058
    return an.cx + sign * d, an.rib_y0 + (k + 0.17) * an.rib_sp + g
