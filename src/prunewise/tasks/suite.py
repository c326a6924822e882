"""The default task suite, and evaluating a model on named tasks (with the dense model's results cached)."""

from __future__ import annotations

import json
import logging
import os
import time

from torch import nn

from ..cache import cache_dir
from ..errors import PrunewiseError
from .items import MCTask, get_task
from .scoring import SCORER_VERSION, mc_metrics, score_items

logger = logging.getLogger(__name__)

# The default suite, chosen by bench/screen_tasks.py (see the README): task -> (first item, item count) of its
# fixed shuffled order. The window is the screening's stage-2 sample, disjoint from the stage-1 items that picked
# the candidates. Of the evals wheel's 145 multiple-choice tasks none qualified (every candidate was at or below
# its no-question or most-frequent-answer baseline); the two sentence-order tasks built from its passages did.
DEFAULT_SUITE: dict[str, tuple[int, int]] = {
    "coherence/wiki-test": (3, 57),
    "coherence/owt": (4, 62),
}
# Short names for the suite's tasks
TASK_ALIASES: dict[str, str] = {name.replace("/", "-"): name for name in DEFAULT_SUITE}


def suite_names(tasks: list[str] | None) -> list[str]:
    """Expand ``default`` (or nothing) into the default suite; other names are kept."""
    names = []
    for name in tasks or ["default"]:
        names.extend(DEFAULT_SUITE if name == "default" else [name])
    return names


def load_tasks(tasks: list[str] | None, limit: int | None = None) -> list[MCTask]:
    """Tasks by name; the default suite's tasks are cut to their item windows, then to ``limit``."""
    from .items import prefetch_bigbench

    out = []
    prefetch_bigbench([TASK_ALIASES.get(n, n) for n in suite_names(tasks)])  # legacy bigbench: one pass for all
    for name in suite_names(tasks):
        name = TASK_ALIASES.get(name, name)
        task = get_task(name)
        if name in DEFAULT_SUITE:
            task = task.window(*DEFAULT_SUITE[name])
        out.append(task.head(limit))
    return out


def _cache_path(model_key: str, task: MCTask):
    return cache_dir("evals") / f"mc-{model_key}-{task.fingerprint[:16]}-v{SCORER_VERSION}.json"


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[MCTask], dense_key: str | None = None,
                   batch_tokens: int = 6144, progress: bool = True) -> dict[str, dict]:
    """Accuracy and length-normalised accuracy (with Wilson 95% intervals) on every task.

    ``dense_key`` (a fingerprint of the unmodified model) caches per-choice log-likelihoods on disk so a sweep
    scores the dense model once.
    """
    results = {}
    for task in tasks:
        if not task.items:
            raise PrunewiseError(f"task '{task.name}' has no items")
        path = _cache_path(dense_key, task) if dense_key else None
        lls = None
        if path is not None and path.exists():
            try:
                lls = json.loads(path.read_text())["loglikelihoods"]
            except (ValueError, KeyError):
                lls = None
        start = time.perf_counter()
        if lls is None or len(lls) != len(task.items):
            lls = score_items(model, tokenizer, task.items, batch_tokens, progress, desc=task.name)
            if path is not None:
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps({"task": task.name, "loglikelihoods": lls}))
                os.replace(tmp, path)
        metrics = mc_metrics(task.items, lls)
        metrics["seconds"] = time.perf_counter() - start
        metrics["source"] = task.source
        results[task.name] = metrics
    return results


def retention(dense: dict, pruned: dict, metric: str = "acc") -> float | None:
    """Share of the dense model's above-chance accuracy the pruned model keeps (None when dense is at chance)."""
    above = dense[metric] - dense["chance"]
    if above <= 0:
        return None
    return (pruned[metric] - pruned["chance"]) / above


def format_task_table(dense: dict, pruned: dict | None = None) -> list[str]:
    """Markdown rows: task, chance, dense acc/acc_norm (with 95% intervals), pruned, retention."""
    head = "| task | n | chance | dense acc [95% CI] | dense acc_norm |"
    rule = "|---|---|---|---|---|"
    if pruned:
        head += " pruned acc [95% CI] | pruned acc_norm | retention (acc) |"
        rule += "---|---|---|"
    lines = [head, rule]
    for name, d in dense.items():
        lo, hi = d["acc_ci95"]
        row = f"| {name} | {d['n']} | {d['chance']:.3f} | {d['acc']:.3f} [{lo:.3f}, {hi:.3f}] | {d['acc_norm']:.3f} |"
        if pruned:
            p = pruned[name]
            r = retention(d, p)
            plo, phi = p["acc_ci95"]
            row += (f" {p['acc']:.3f} [{plo:.3f}, {phi:.3f}] | {p['acc_norm']:.3f} | "
                    f"{'' if r is None else f'{r:.0%}'} |")
        lines.append(row)
    return lines
