"""Data layer: the Study record, dataset loaders, the synthetic benchmark, tokenizer, dataset.

Importing this package imports no torch; `echo_train.data.dataset` does.
"""
from .study import Study, format_report

__all__ = ["Study", "format_report"]
