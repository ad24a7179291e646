"""Labeler agreement with ground-truth labels on a synthetic split (the labeler's acceptance check).

    python -m echo_train.metrics.agreement /tmp/synth_eval/test.json

Reads `[{"sample_id", "ground_truth": {"findings", "impression"}, "labels": {14 obs}}]`,
labels each report with the rule labeler and prints the share of (study, observation)
pairs that agree, with the disagreements per observation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .labeler import CHEXPERT_OBSERVATIONS, label_report


def labeler_agreement(records: list[dict]) -> dict:
    from echo_train.data.study import format_report

    agree = total = 0
    errors: dict[str, list] = {}
    for r in records:
        gt = r["ground_truth"]
        report = format_report(gt.get("findings", ""), gt.get("impression", ""))
        got = label_report(report)
        for o in CHEXPERT_OBSERVATIONS:
            total += 1
            if got[o] == r["labels"].get(o):
                agree += 1
            else:
                errors.setdefault(o, []).append({"id": r.get("sample_id"), "got": got[o], "want": r["labels"].get(o)})
    return {"agreement": agree / total if total else 0.0, "pairs": total, "agree": agree,
            "studies": len(records), "disagreements": {o: len(v) for o, v in errors.items()},
            "examples": {o: v[:3] for o, v in errors.items()}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = labeler_agreement(json.loads(Path(argv[0]).read_text()))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
