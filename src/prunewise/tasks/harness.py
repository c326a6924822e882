"""lm-evaluation-harness on a model in memory: its named tasks (online), or prunewise's tasks as local-file configs.

Offline tasks are exported as one JSONL of {"context", "choices", "gold"} records and a task YAML with
``dataset_path: json`` and local ``data_files``; ``doc_to_text``/``doc_to_choice``/``doc_to_target`` name those
columns and the target delimiter is empty, because prunewise's choices already carry their leading space. So
the harness scores exactly the token sequences prunewise scores, and the two must count the same correct items.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from torch import nn

from ..errors import PrunewiseError
from .items import MCTask

logger = logging.getLogger(__name__)


def harness_task_name(task: MCTask) -> str:
    return "prunewise_" + re.sub(r"[^A-Za-z0-9_]+", "_", task.name).strip("_")


def export_tasks(tasks: list[MCTask], folder: str | Path) -> list[str]:
    """Write each task as local-file lm-eval config (YAML + JSONL) into ``folder``; returns the lm-eval task names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks:
        name = harness_task_name(task)
        multi = any(len(item.gold) > 1 for item in task.items)
        data = folder / f"{name}.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for item in task.items:
                gold = list(item.gold) if multi else item.gold[0]
                fh.write(json.dumps({"context": item.context, "choices": list(item.choices), "gold": gold}) + "\n")
        yaml = "\n".join([
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data.resolve()))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: gold",
            'target_delimiter: ""',
            "num_fewshot: 0",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            f"  source: {json.dumps(task.source)}",
            "",
        ])
        (folder / f"{name}.yaml").write_text(yaml, encoding="utf-8")
        names.append(name)
    return names


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise PrunewiseError("lm-evaluation-harness is not installed; install it with "
                             "`pip install 'prunewise[harness]'` (lm_eval==0.4.13)") from exc
    return lm_eval, HFLM, TaskManager


def run_harness(model: nn.Module, tokenizer, folder: str | Path, tasks: list[MCTask] | None = None,
                named: list[str] | None = None, batch_size: int = 16) -> dict[str, dict]:
    """Run lm-eval on the in-memory model: prunewise ``tasks`` exported to ``folder``, and lm-eval ``named`` tasks.

    Returns task -> {"acc", "acc_norm", "n", "correct", "correct_norm", "loglikelihoods" (per item, per choice)},
    keyed by prunewise's names for exported tasks.
    """
    lm_eval, HFLM, TaskManager = _import_harness()
    tasks = tasks or []
    exported = export_tasks(tasks, folder) if tasks else []
    by_harness_name = {harness_task_name(t): t for t in tasks}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    manager = TaskManager(include_path=str(Path(folder).resolve()) if tasks else None)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=exported + list(named or []), task_manager=manager,
                                      num_fewshot=0, log_samples=True, bootstrap_iters=0)
    except Exception as exc:  # the harness raises many kinds; name the likely cause for named tasks
        if named:
            raise PrunewiseError(f"lm-eval could not run {', '.join(named)} ({exc.__class__.__name__}: {exc}); its named "
                                 "tasks download their data from the Hugging Face hub, so they need the internet. "
                                 "Offline, use prunewise's tasks (--tasks default)") from exc
        raise
    results = {}
    for name, row in out["results"].items():
        metrics = {m.split(",")[0]: v for m, v in row.items() if m.split(",")[0] in ("acc", "acc_norm")}
        task = by_harness_name.get(name)
        n = len(task.items) if task else out.get("n-samples", {}).get(name, {}).get("effective")
        entry = dict(metrics, n=n)
        if n:
            entry.update(correct=round(metrics.get("acc", 0) * n), correct_norm=round(metrics.get("acc_norm", 0) * n))
        samples = (out.get("samples") or {}).get(name)
        if samples:  # per-item choice log-likelihoods, in item order
            entry["loglikelihoods"] = [[float(r[0]) for r in s["filtered_resps"]]
                                       for s in sorted(samples, key=lambda s: s["doc_id"])]
        results[task.name if task else name] = entry
    return results
