"""Calibration and evaluation data: corpora, their token streams, windows, and overlap checks."""

from .corpora import Corpus, get_corpus, list_corpora
from .overlap import check_no_overlap
from .windows import calibration_windows, evaluation_windows, tokenize_corpus

__all__ = [
    "Corpus",
    "calibration_windows",
    "check_no_overlap",
    "evaluation_windows",
    "get_corpus",
    "list_corpora",
    "tokenize_corpus",
]
