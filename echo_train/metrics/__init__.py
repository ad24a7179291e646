"""Clinical and language metrics for generated chest X-ray reports (`echo-eval`).

Cheap, dependency-free parts (rule labeler, finding F1, text overlap, sentence validity)
import eagerly; model-based metrics (SemScore, RaTEScore, CheXbert) load lazily and
report "not computed: REASON" when their model or runtime is missing.
"""
from .labeler import CHEXPERT_OBSERVATIONS, FIVE_OBSERVATIONS, label_report, label_reports
from .finding_f1 import finding_f1
from .validity import sentence_validity
from .report import EvalConfig, EvalResult, MetricResult, evaluate_reports, ALL_METRICS, DEFAULT_METRICS

__all__ = [
    "CHEXPERT_OBSERVATIONS", "FIVE_OBSERVATIONS", "label_report", "label_reports",
    "finding_f1", "sentence_validity",
    "EvalConfig", "EvalResult", "MetricResult", "evaluate_reports", "ALL_METRICS", "DEFAULT_METRICS",
]
