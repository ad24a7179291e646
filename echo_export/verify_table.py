"""The verification table, printed after a build and by `echo-export inspect` (no PyTorch needed)."""
from __future__ import annotations

from typing import Callable


def print_table(report: dict, log: Callable[[str], None] = print) -> None:
    """Agreement is free-running (whole reports through the runtime loop); per-pass is the same
    block inputs as fp32; dF1 is in points of finding F1 against the PyTorch reference, with its
    paired bootstrap 95% CI."""
    rows = [("variant", "agree %", "per-pass %", "exact %", "F1", "dF1 points [95% CI]")]
    for name, v in report.get("variants", {}).items():
        f1 = v.get("finding_f1")
        d = v.get("finding_f1_change")
        ci = v.get("finding_f1_change_ci95")
        pp = v.get("per_pass_token_agreement")
        df1 = (v.get("finding_f1_note", "") if d is None else f"{100 * d:+.2f}"
               + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci and v["precision"] != "fp32" else ""))
        rows.append((name, f"{100 * v['token_agreement']:.2f}", "-" if pp is None else f"{100 * pp:.2f}",
                     f"{100 * v['exact_match']:.2f}", "-" if f1 is None else f"{f1:.3f}", df1))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        log("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    for k, sp in report.get("speed", {}).items():
        log("  " + k + ": " + ", ".join(f"{p} {v:.3f}" if isinstance(v, (int, float)) else f"{p}: {v}"
                                        for p, v in sp.items()))
