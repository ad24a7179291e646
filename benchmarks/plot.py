"""quality_vs_latency.png: one point per method x engine (x block size), two panels on one latency axis:
finding F1 (or the first quality figure computed) and sentence validity, where one-step decoding
fails first (a report can keep its findings while its sentences stop being valid)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from runtime import precisions

COLORS = {"ar": "#444444", "teacher": "#1f77b4", "naive": "#d62728", "dcd": "#2ca02c"}
MARKERS = {"pytorch": "o", "ort": "s", "trt": "^", "hf": "D"}
QUALITY = (("finding_f1", "finding F1 (micro)"), ("semscore", "SemScore"), ("rougeL", "ROUGE-L"))
VALIDITY = ("valid_sentence_rate", "valid sentences (share)")


def _value(c: dict, key: str) -> Optional[float]:
    v = (c.get("quality") or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def _quality(c: dict) -> tuple[Optional[float], str]:
    for key, label in QUALITY:
        v = _value(c, key)
        if v is not None:
            return v, label
    return None, ""


def _panel(ax, points: list[tuple[dict, float]], ylabel: str, empty: str) -> None:
    """Scatter (cell, y) at the cell's p50 latency: colour = method, marker = engine kind, hollow = not fp32."""
    for n, (c, y) in enumerate(points):
        x = c["latency_ms"]["p50"]
        kind = c["engine"].split("-")[0]
        col = COLORS.get(c["method"], "k")
        hollow = c["engine"].rsplit("-", 1)[-1] in precisions.NAMES[1:]  # every precision but fp32
        ax.scatter([x], [y], marker=MARKERS.get(kind, "x"), s=60, alpha=0.85, linewidths=1.2,
                   facecolors="none" if hollow else col, edgecolors=col)
        tag = f"{c['engine']}{'' if c['block_size'] is None else ' B' + str(c['block_size'])}"
        ax.annotate(tag, (x, y), fontsize=6, xytext=(4, 3 + 7 * (n % 3)), textcoords="offset points", alpha=0.75,
                    color=col)
    if points:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency per report, p50 (ms, batch 1, log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")


def quality_vs_latency_figure(result: dict) -> Any:
    """The matplotlib Figure: axes[0] quality, axes[1] sentence validity, against latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ran = [c for c in result["cells"] if c.get("status") == "ok"]
    quality = [(c, y, label) for c in ran for y, label in [_quality(c)] if y is not None]
    validity = [(c, y) for c in ran if (y := _value(c, VALIDITY[0])) is not None]
    fig, (ax_q, ax_v) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, sharex=True)
    _panel(ax_q, [(c, y) for c, y, _ in quality], quality[-1][2] if quality else "quality", "no cell produced reports")
    _panel(ax_v, validity, VALIDITY[1], "sentence validity not computed (synthetic benchmark only)")
    m = result.get("machine", {})
    fig.suptitle(f"ECHO: quality vs latency — {result['studies']['n']} {result['config']['split']} studies, "
                 f"{m.get('cpu', '')[:40]}", fontsize=9)
    handles = [Line2D([], [], color=col, marker="o", linestyle="", label=meth) for meth, col in COLORS.items()]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=k) for k, mk in MARKERS.items()]
    handles += [Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="", label="fp16 / int8")]
    ax_q.legend(handles=handles, fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    return fig


def plot_quality_vs_latency(result: dict, out: str | Path) -> Path:
    fig = quality_vs_latency_figure(result)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
