"""A contact sheet of synthetic studies with their reports, for looking at the data."""
from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..study import format_report


def _pick(records: list[dict], n: int) -> list[dict]:
    """One normal study, then studies covering as many different findings as possible."""
    picked, covered = [], set()
    normals = [r for r in records if r["attributes"]["normal"]]
    if normals:
        picked.append(normals[0])
    for r in records:
        if len(picked) >= n:
            break
        names = set(r["attributes"]["findings"]) - covered
        if names and r not in picked:
            picked.append(r)
            covered |= names
    for r in records:
        if len(picked) >= n:
            break
        if r not in picked:
            picked.append(r)
    return picked


def write_preview(out_dir: str | Path, records: list[dict], n: int = 12, cols: int = 4, tile: int = 256) -> Path:
    out = Path(out_dir)
    chosen = _pick(records, n)
    font = ImageFont.load_default()
    text_h, wrap = 230, 44
    rows = -(-len(chosen) // cols)
    sheet = Image.new("L", (cols * tile, rows * (tile + text_h)), 255)
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(chosen):
        x0, y0 = (k % cols) * tile, (k // cols) * (tile + text_h)
        im = Image.open(out / r["images"][0]).convert("L").resize((tile, tile), Image.BILINEAR)
        sheet.paste(im, (x0, y0))
        gt = r["ground_truth"]
        text = f"[{r['sample_id']}] {r['attributes']['combination']}\n" + format_report(gt["findings"], gt["impression"])
        lines = []
        for para in text.split("\n"):
            lines += textwrap.wrap(para, wrap)
        draw.multiline_text((x0 + 3, y0 + tile + 2), "\n".join(lines[:20]), fill=0, font=font, spacing=1)
    path = out / "preview.png"
    sheet.save(path)
    return path
