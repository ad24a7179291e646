"""quality_vs_latency.png: one point per method x engine (x block size)."""
from __future__ import annotations

from pathlib import Path

COLORS = {"ar": "#444444", "teacher": "#1f77b4", "naive": "#d62728", "dcd": "#2ca02c"}
MARKERS = {"pytorch": "o", "ort": "s", "trt": "^", "hf": "D"}


def _quality(c: dict) -> tuple[float | None, str]:
    q = c.get("quality") or {}
    for key, label in (("finding_f1", "finding F1 (micro)"), ("semscore", "SemScore"), ("rougeL", "ROUGE-L")):
        v = q.get(key)
        if isinstance(v, (int, float)):
            return float(v), label
    return None, ""


def plot_quality_vs_latency(result: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    label_y = "quality"
    n = 0
    for c in result["cells"]:
        if c.get("status") != "ok":
            continue
        y, label = _quality(c)
        if y is None:
            continue
        label_y = label
        x = c["latency_ms"]["p50"]
        kind = c["engine"].split("-")[0]
        col = COLORS.get(c["method"], "k")
        hollow = c["engine"].endswith(("fp16", "int8"))
        ax.scatter([x], [y], marker=MARKERS.get(kind, "x"), s=60, alpha=0.85, linewidths=1.2,
                   facecolors="none" if hollow else col, edgecolors=col)
        tag = f"{c['engine']}{'' if c['block_size'] is None else ' B' + str(c['block_size'])}"
        ax.annotate(tag, (x, y), fontsize=6, xytext=(4, 3 + 7 * (n % 3)), textcoords="offset points", alpha=0.75,
                    color=col)
        n += 1
    if n:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no cell produced reports", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency per report, p50 (ms, batch 1, log scale)")
    ax.set_ylabel(label_y)
    m = result.get("machine", {})
    ax.set_title(f"ECHO: quality vs latency — {result['studies']['n']} {result['config']['split']} studies, "
                 f"{m.get('cpu', '')[:40]}", fontsize=9)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=col, marker="o", linestyle="", label=meth) for meth, col in COLORS.items()]
    handles += [Line2D([], [], color="gray", marker=mk, linestyle="", label=k) for k, mk in MARKERS.items()]
    handles += [Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="", label="fp16 / int8")]
    ax.legend(handles=handles, fontsize=7, loc="best", ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
