"""Clinical and language metrics for generated chest X-ray reports (`echo-eval`).

    from echo_train.metrics import evaluate_reports, EvalConfig, finding_f1, sentence_validity

Cheap parts (rule labeler, finding F1, BLEU/ROUGE/CIDEr, sentence validity) need no model;
model-based metrics (SemScore, RaTEScore, CheXbert, embedding cosines) and METEOR (Java)
load lazily, once per process, and are reported as "not computed: REASON" when their
model or runtime is missing. Importing this package does not import torch.
"""
from .finding_f1 import finding_f1
from .labeler import CHEXPERT_OBSERVATIONS, FIVE_OBSERVATIONS, label_report, label_reports
from .report import (
    ALL_METRICS, DEFAULT_METRICS, FAST_METRICS, EvalConfig, EvalResult, MetricResult, evaluate_reports,
)
from .validity import sentence_validity

__all__ = [
    "CHEXPERT_OBSERVATIONS", "FIVE_OBSERVATIONS", "label_report", "label_reports", "finding_f1",
    "sentence_validity", "EvalConfig", "EvalResult", "MetricResult", "evaluate_reports",
    "ALL_METRICS", "DEFAULT_METRICS", "FAST_METRICS",
]
