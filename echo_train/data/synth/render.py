"""One synthetic radiograph: anatomy + findings + acquisition (rotation, exposure, blur, noise)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .anatomy import (
    airway_mask, draw_body, grid, lung_mask, lung_texture, low_freq_noise, mediastinum_mask, rib_density,
    sample_anatomy,
)
from .findings import Findings
from .pathology import bone_findings, devices, lung_findings


def render_study(findings: Findings, size: int = 128, seed: int = 0) -> tuple[np.ndarray, dict]:
    """uint8 [size, size] image of a study with these findings, and drawn measurements."""
    # separate streams: the same seed gives the same anatomy and acquisition with or
    # without a finding, so a finding's effect on the image can be measured exactly
    rng, frng, arng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    an = sample_anatomy(rng, size, findings)
    x, y = grid(size)
    D = draw_body(an, x, y)
    noise = low_freq_noise(rng, size, 10)
    for side in ("right", "left"):
        lung = an.lung(side)
        m = lung_mask(lung, x, y, size)
        L = lung_findings(an, side, lung_texture(lung, x, y, noise), x, y, findings, frng)
        D = D * (1.0 - m) + m * L
    med, heart = mediastinum_mask(an, x, y)
    D = D * (1.0 - med) + med * 0.64
    D = D - 0.16 * airway_mask(an, x, y) * med
    D = D * (1.0 - heart) + heart * 0.7
    D = D + rib_density(an, x, y)
    D = bone_findings(an, D, x, y, findings, frng)
    D = devices(an, D, x, y, findings, frng)

    # acquisition: exposure, rotation, blur, noise
    rng = arng
    gain, bias, gamma = rng.uniform(0.85, 1.1), rng.uniform(-0.04, 0.04), rng.uniform(0.8, 1.25)
    img = np.clip(D * gain + bias, 0.0, 1.0) ** gamma
    im = Image.fromarray((img * 255.0).astype(np.uint8), mode="L")
    im = im.rotate(rng.uniform(-4.0, 4.0), resample=Image.BILINEAR, fillcolor=int(img[0, 0] * 255))
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * size / 128))
    out = np.asarray(im, dtype=np.float32) + rng.normal(0.0, rng.uniform(2.0, 7.0), (size, size))
    return np.clip(out, 0, 255).astype(np.uint8), {"ctr": round(float(an.ctr), 3)}
