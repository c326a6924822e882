"""Calibration and evaluation data: corpora, mixtures, task records, token windows, and overlap checks."""

from .corpora import Corpus, get_corpus, list_corpora
from .mixture import (
                      MixtureItem,
                      calibration_corpora,
                      calibration_spec_windows,
                      check_calibration_overlap,
                      mixture_windows,
                      parse_calibration,
)
from .overlap import check_no_overlap
from .task import TaskRecords, TaskWindows, load_task_records, task_windows
from .windows import calibration_windows, evaluation_windows, tokenize_corpus

__all__ = [
    "Corpus",
    "MixtureItem",
    "TaskRecords",
    "TaskWindows",
    "calibration_corpora",
    "calibration_spec_windows",
    "calibration_windows",
    "check_calibration_overlap",
    "check_no_overlap",
    "evaluation_windows",
    "get_corpus",
    "list_corpora",
    "load_task_records",
    "mixture_windows",
    "parse_calibration",
    "task_windows",
    "tokenize_corpus",
]
