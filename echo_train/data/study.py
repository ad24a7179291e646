"""The Study record every dataset loader produces and every stage consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


# The 14 CheXpert observations, in CheXpert's column order: the label space of every Study,
# of the synthetic grammar and of the rule labeler.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)


def format_report(findings: str, impression: str) -> str:
    """The report text a model learns to write: both sections, normalised spacing."""
    parts = []
    if findings.strip():
        parts.append("FINDINGS: " + " ".join(findings.split()))
    if impression.strip():
        parts.append("IMPRESSION: " + " ".join(impression.split()))
    return " ".join(parts)


@dataclass
class Study:
    id: str
    image_paths: list[str]
    findings: str
    impression: str
    split: str = "train"
    # 14 CheXpert observations -> 1 positive, 0 negative, -1 uncertain, None not mentioned
    labels: Optional[dict[str, Optional[int]]] = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> str:
        return format_report(self.findings, self.impression)
