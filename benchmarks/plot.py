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
        col = COLORS.get(c["method"].split("@")[0], "k")  # the sweep's teacher@k: the teacher's colour
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


def _sweep_panel(ax, cells: list[dict], key: str, ylabel: str) -> None:
    """One line per (engine, B) through the teacher's step counts; the naive and DCD one-step points marked."""
    lines: dict[tuple, list[tuple[float, float, int]]] = {}
    for c in cells:
        y = _value(c, key)
        if y is None:
            continue
        x = c["tokens_per_s"]
        if c["method"].split("@")[0] == "teacher":
            lines.setdefault((c["engine"], c["block_size"]), []).append((x, y, c["steps"]))
        else:  # the one-step rows: the student's point is what the curve is judged against
            dcd = c["method"] == "dcd"
            ax.scatter([x], [y], marker="*" if dcd else "X", s=200 if dcd else 80, color=COLORS[c["method"]], zorder=3,
                       label=f"{'DCD student' if dcd else 'naive one-step'} B={c['block_size']} {c['engine']}")
    for (engine, B), pts in lines.items():
        pts.sort(key=lambda p: p[2])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS["teacher"], alpha=0.5 + 0.5 * (B == 8),
                label=f"teacher B={B} {engine}")
        for x, y, k in pts:
            ax.annotate(f"{k} step{'s' if k != 1 else ''}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if lines or ax.collections:
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("tokens/s per report (batch 1, log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")


def teacher_steps_figure(result: dict) -> Any:
    """The steps sweep: finding F1 (axes[0]) and sentence validity (axes[1]) against tokens/s per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tables import sweep_cells

    cells = sweep_cells(result)
    fig, (ax_q, ax_v) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, sharex=True)
    _sweep_panel(ax_q, cells, "finding_f1", "finding F1 (micro)")
    _sweep_panel(ax_v, cells, VALIDITY[0], VALIDITY[1])
    if not any(c["method"] == "dcd" for c in cells):  # the point the curve is judged against: say why it is missing
        engines = (result.get("teacher_decoding") or {}).get("sweep_engines") or []
        why = next((c["status"] for c in result["cells"] if c["method"] == "dcd" and c["engine"] in engines), "not run")
        ax_q.text(0.02, 0.02, f"DCD student: {why}"[:110], transform=ax_q.transAxes, fontsize=7, color=COLORS["dcd"])
    fig.suptitle(f"ECHO: the teacher's steps sweep against the one-step student — {result['studies']['n']} "
                 f"{result['config']['split']} studies", fontsize=9)
    fig.tight_layout()
    return fig


def plot_teacher_steps(result: dict, out: str | Path) -> Path:
    fig = teacher_steps_figure(result)
    import matplotlib.pyplot as plt

    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
