"""Zero-shot multiple-choice evaluation, offline: tasks, lm-eval-compatible scoring, the default suite."""

from .items import MCItem, MCTask, get_task, list_tasks, load_mc_jsonl
from .scoring import loglikelihoods, mc_metrics, score_items, wilson
from .suite import DEFAULT_SUITE, evaluate_tasks, load_tasks

__all__ = ["MCItem", "MCTask", "get_task", "list_tasks", "load_mc_jsonl", "loglikelihoods", "mc_metrics",
           "score_items", "wilson", "DEFAULT_SUITE", "evaluate_tasks", "load_tasks"]
