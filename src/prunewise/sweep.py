"""A grid of scores x sparsities x allocations from one recipe, resumable, with one report of curves.

Layout of the output folder::

    dense.json            the dense model's perplexity, task accuracy and completions (computed once)
    cells/<cell>.json     one finished cell: its recipe, perplexity, tasks, completions, plan, timings, memory
    models/<cell>/        the pruned model (only with save_models)
    sweep.json            the summary of the finished cells
    report.html           self-contained page; report.md + figures/

A cell is written atomically when it is finished, so an interrupted sweep loses at most the cell in progress;
rerunning it skips every cell whose file exists and whose recipe is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .errors import PrunewiseError
from .recipe import Recipe, make_recipe

logger = logging.getLogger(__name__)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _write_files(folder: Path, files: dict) -> None:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)


def cell_name(score: str, allocation: str, sparsity: float) -> str:
    return f"{score}-{allocation}-{sparsity:g}"


def _fingerprint(recipe: Recipe) -> str:
    fields = recipe.model_dump()
    fields.pop("output", None)
    fields.pop("overwrite", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid_recipes(base: Recipe, scores: list[str], sparsities: list[float], allocations: list[str]) -> dict[str, Recipe]:
    """The cells' recipes, validated before any work (a bad combination fails the whole sweep up front)."""
    if not scores or not sparsities or not allocations:
        raise PrunewiseError("a sweep needs at least one score, one sparsity and one allocation")
    fields = base.model_dump()
    fields.update(output=None, overwrite=False, plan=None)
    cells = {}
    for score in scores:
        for allocation in allocations:
            for sparsity in sparsities:
                cells[cell_name(score, allocation, sparsity)] = make_recipe(
                    **dict(fields, score=score, allocation=allocation, sparsity=sparsity))
    return cells


def _dense(base: Recipe, out: Path, progress: bool) -> dict:
    """The dense model's evaluation, once per sweep folder (and its task scores cached across folders)."""
    from .models.loading import load_model
    from .pipeline.run import evaluate_dense
    from .tasks.suite import load_tasks

    path = out / "dense.json"
    key = {"model": base.model, "dtype": base.dtype, "evaluation": base.evaluation, "eval_tokens": base.eval_tokens,
           "eval_seqlen": base.eval_seqlen, "tasks": base.tasks, "task_limit": base.task_limit,
           "completions": base.completions}
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data
    model, tokenizer = load_model(base.model, base.dtype)
    tasks = load_tasks(base.tasks, base.task_limit) if base.tasks else []
    data = {"key": key, **evaluate_dense(model, tokenizer, base, tasks, progress)}
    _write_json(path, data)
    return data


def _run_cell(recipe: Recipe, progress: bool, model_dir: Path | None) -> dict:
    from .export.save import save_pruned
    from .pipeline.prune import prune
    from .pipeline.run import evaluate_pruned
    from .tasks.suite import load_tasks

    start = time.perf_counter()
    result = prune(recipe, progress=progress)
    cell = {"score": recipe.score["name"], "allocation": recipe.allocation["name"], "sparsity": recipe.sparsity,
            "structure": result.report["structure"], "recipe": json.loads(recipe.model_dump_json()),
            "fingerprint": _fingerprint(recipe),
            "achieved_sparsity": result.report["achieved_sparsity"], "timings": result.report["timings"],
            "peak_rss_mb": result.report["peak_rss_mb"], "plan": json.loads(result.plan.model_dump_json())}
    tasks = load_tasks(recipe.tasks, recipe.task_limit) if recipe.tasks else []
    if recipe.recovery:  # the one-shot perplexity, then the recovery the recipe asks for
        from .pipeline.recover import adapter_files, recover

        cell["one_shot"] = evaluate_pruned(result, recipe, [], progress)["perplexity"]
        section = recover(result, recipe, progress)
        result.files.update(adapter_files(section, next(result.model.parameters()).dtype))
        cell["recovery"] = section
    cell.update(evaluate_pruned(result, recipe, tasks, progress))
    if model_dir is not None:
        save_pruned(result.model, result.tokenizer, model_dir, {"recipe.yaml": recipe.to_yaml(), **result.files},
                    overwrite=True)
    cell["seconds"] = time.perf_counter() - start
    return cell


def write_sweep_report(out: Path, sweep: dict) -> None:
    from .report.build import report_files, sweep_sections

    title, lead, sections = sweep_sections(sweep)
    _write_files(out, report_files(title, lead, sections))


def run_sweep(base: Recipe, scores: list[str], sparsities: list[float], allocations: list[str], output: str | Path,
              save_models: bool = False, progress: bool = True, on_cell=None) -> dict:
    """Run (or finish) the grid into ``output``; returns the sweep summary. ``on_cell(name, status)`` reports."""
    from .pipeline.run import check_data

    out = Path(output).expanduser()
    cells = grid_recipes(base, scores, sparsities, allocations)
    check_data(base)  # refuse overlapping data before any work
    if out.exists() and not out.is_dir():
        raise PrunewiseError(f"sweep output {out} is not a folder; choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    dense = _dense(base, out, progress)
    done = {}
    for name, recipe in cells.items():
        path = out / "cells" / f"{name}.json"
        if path.exists():
            cell = json.loads(path.read_text())
            if cell.get("fingerprint") == _fingerprint(recipe):
                done[name] = cell
                if on_cell:
                    on_cell(name, "done before")
                continue
            logger.warning("cell %s was computed with another recipe; recomputing it", name)
        if on_cell:
            on_cell(name, "running")
        cell = _run_cell(recipe, progress, out / "models" / name if save_models else None)
        _write_json(path, cell)
        done[name] = cell
        summary = _summary(base, scores, sparsities, allocations, dense, done)
        write_sweep_report(out, summary)  # a partial report after every cell
        if on_cell:
            on_cell(name, f"finished in {cell['seconds']:.0f} s")
    summary = _summary(base, scores, sparsities, allocations, dense, done)
    _write_json(out / "sweep.json", {k: v for k, v in summary.items() if k != "cells"} |
                {"cells": [{k: v for k, v in c.items() if k != "plan"} for c in summary["cells"]]})
    write_sweep_report(out, summary)
    return summary


def _summary(base, scores, sparsities, allocations, dense, done) -> dict:
    calibration = base.calibration if isinstance(base.calibration, str) else \
        ",".join(f"{m.source}:{m.weight:g}" for m in base.calibration)
    return {"model": base.model, "structure": base.structure_obj.name, "calibration": calibration,
            "grid": {"score": list(scores), "sparsity": list(sparsities), "allocation": list(allocations)},
            "grid_size": len(scores) * len(sparsities) * len(allocations),
            "dense": dense, "cells": list(done.values())}
