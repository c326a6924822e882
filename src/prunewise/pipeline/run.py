"""Evaluate and write: the path ``run`` and every sweep cell share (dense beside pruned, then the folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_dir
from ..core.masks import MASKS_FILE
from ..data import check_calibration_overlap, evaluation_windows, get_corpus
from ..data.mixture import CalibrationSpec
from ..engine.placement import Placement, placed, resolve_device
from ..errors import PrunewiseError
from ..evaluate.perplexity import perplexity
from ..export.save import check_output, output_lock, save_pruned
from ..models.adapters import get_adapter
from ..models.loading import load_model, model_fingerprint
from .prune import PruneResult, prune


def check_data(recipe) -> None:
    """Refuse evaluation corpora that overlap any calibration corpus, before any work."""
    general = recipe.general_spec
    for name in recipe.evaluation:
        corpus = get_corpus(name, "evaluation")
        check_calibration_overlap(recipe.calibration, corpus)
        if general is not None:  # D-Pruner's general set must not share text with an evaluation set either
            try:
                check_calibration_overlap(general, corpus)
            except PrunewiseError as exc:
                raise PrunewiseError(f"--general-calibration: {exc} (the general set, not --calibration)") from None


def dense_key(model_spec: str, dtype: torch.dtype = torch.float32) -> str | None:
    """Cache key of a source model's dense evaluations: its fingerprint, and its storage dtype unless float32."""
    try:
        key = model_fingerprint(model_spec)
    except PrunewiseError:
        return None
    return key if dtype == torch.float32 else f"{key}-{str(dtype).removeprefix('torch.')}"


def _dense_cache_path(model_spec: str, corpus, seqlen: int, max_tokens: int, dtype: torch.dtype) -> Path | None:
    fp = dense_key(model_spec, dtype)
    if fp is None:
        return None
    return cache_dir("evals") / f"ppl-{fp}-{corpus.fingerprint[:16]}-{seqlen}-{max_tokens}.json"


def evaluate(model: nn.Module, tokenizer, data: list[str], eval_tokens: int = 32768, seqlen: int = 512,
             calibration: CalibrationSpec | None = None, dense_spec: str | None = None,
             progress: bool = True, device: str = "auto", window_nll: dict | None = None) -> dict[str, float]:
    """Perplexity on each evaluation corpus; refuses corpora that overlap the calibration text (every mixture part).

    Computed on ``device`` one block at a time (float32 on the CPU whatever the storage dtype). With
    ``dense_spec`` (the model is the unmodified named/source model) results are cached on disk. ``window_nll``,
    when given, receives each corpus's per-window mean NLLs.
    """
    with placed(model, get_adapter(model), Placement.of(model, device)):
        return _evaluate(model, tokenizer, data, eval_tokens, seqlen, calibration, dense_spec, progress, window_nll)


def _evaluate(model, tokenizer, data, eval_tokens, seqlen, calibration, dense_spec, progress,
              window_nll: dict | None = None) -> dict[str, float]:
    results = {}
    for name in data:
        corpus = get_corpus(name, "evaluation")
        if calibration:
            check_calibration_overlap(calibration, corpus)
        dtype = next(model.parameters()).dtype
        cache = _dense_cache_path(dense_spec, corpus, seqlen, eval_tokens, dtype) if dense_spec else None
        if cache is not None and cache.exists():
            try:
                record = json.loads(cache.read_text())
                if window_nll is None or isinstance(record.get("window_nll"), list):
                    results[name] = float(record["perplexity"])
                    if window_nll is not None:
                        window_nll[name] = record["window_nll"]
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable or older cache file: measured again and rewritten
        windows = evaluation_windows(tokenizer, corpus, seqlen, eval_tokens)
        nll: list[float] = []
        results[name] = perplexity(model, windows, progress=progress, desc=f"ppl {name}", per_window=nll)
        if window_nll is not None:
            window_nll[name] = nll
        if cache is not None:
            tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"perplexity": results[name], "windows": list(windows.shape), "window_nll": nll}))
            os.replace(tmp, cache)
    return results


def _measure(model, tokenizer, recipe, tasks: list, progress: bool, dense: bool) -> dict:
    """Perplexity, task scores and completions, computed where the recipe's device says (one block at a time)."""
    from ..evaluate.completions import greedy_completions
    from ..tasks.suite import evaluate_tasks

    key = dense_key(recipe.model, next(model.parameters()).dtype) if dense else None
    window_nll: dict = {}
    with placed(model, get_adapter(model), Placement.of(model, recipe.device)):
        return {"perplexity": evaluate(model, tokenizer, recipe.evaluation, recipe.eval_tokens, recipe.eval_seqlen,
                                       dense_spec=recipe.model if dense else None, progress=progress,
                                       device=recipe.device, window_nll=window_nll)
                if recipe.evaluation else {},
                "window_nll": window_nll,
                "tasks": evaluate_tasks(model, tokenizer, tasks, dense_key=key, progress=progress) if tasks else {},
                "completions": greedy_completions(model, tokenizer) if recipe.completions else []}


def check_model_fits(recipe, model, streamed: bool = False) -> None:
    """What the recipe asks of this model's shapes (N:M widths, an EoRA rank, a budget, an expert count a router can
    lose), refused before any work (``streamed``: the model is on the meta device, read from disk)."""
    from .prune import budget_share, check_fits, check_moe_targets, targeted_numels
    from .structured import check_experts

    parts = recipe.parts()
    adapter = get_adapter(model)
    check_moe_targets(model, adapter, recipe, parts, streamed)
    if parts.structure.key == "experts":
        check_experts(model, adapter, float(recipe.sparsity))
    numels = targeted_numels(model, recipe)
    check_fits(parts, model, numels)
    if recipe.budget is not None:
        budget_share(recipe, model, numels)


def add_intervals(rows: dict, dense_nll: dict, pruned_nll: dict) -> None:
    """Each row's 95% intervals from the spread between evaluation windows: dense, pruned, and the paired ratio."""
    from ..evaluate.perplexity import interval95, ratio_interval95

    for name, row in rows.items():
        d, p = dense_nll.get(name), pruned_nll.get(name)
        if d and p:
            row["windows"] = len(p)
            row["dense_ci95"], row["pruned_ci95"] = interval95(d), interval95(p)
            row["ratio_ci95"] = ratio_interval95(p, d)


def evaluate_dense(model, tokenizer, recipe, tasks: list, progress: bool) -> dict:
    """The dense model's perplexity, task scores and completions (perplexity and tasks cached by fingerprint and dtype)."""
    return _measure(model, tokenizer, recipe, tasks, progress, dense=True)


def evaluate_pruned(result: PruneResult, recipe, tasks: list, progress: bool) -> dict:
    """The same measurements of the pruned model."""
    return _measure(result.model, result.tokenizer, recipe, tasks, progress, dense=False)


def output_files(result: PruneResult, report: dict) -> dict:
    """Everything saved beside the weights: recipe, plan, masks, report (JSON, markdown, HTML) and extras."""
    from ..allocation.plan import plot_plan
    from ..report.build import report_files, run_sections
    from ..report.markdown import report_markdown

    title, lead, sections = run_sections(report, result.plan)
    pages = report_files(title, lead, sections)
    pages["report.md"] += "\n## Details\n\n" + report_markdown(report, result.plan, details_only=True)
    files = {"recipe.yaml": result.recipe.to_yaml(), "plan.json": result.plan.model_dump_json(indent=1)}
    if (png := plot_plan(result.plan)) is not None:
        files["plan.png"] = png
    if result.masks is not None:
        files[MASKS_FILE] = result.masks.to_bytes()
    if result.lowrank is not None:  # the EoRA correction: a PEFT LoRA adapter in a folder beside the weights
        files.update(result.lowrank.peft_files(report["adapter"]["folder"], next(result.model.parameters()).dtype))
    return {**files, "report.json": json.dumps(report, indent=1), **pages, **result.files}


def stored_bytes(model) -> int:
    """Bytes of the model's distinct tensors: about the size of its safetensors file."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def run(recipe, progress: bool = True) -> dict:
    """The whole job: evaluate dense, prune, evaluate pruned, save (if ``recipe.output``). Returns the report."""
    resolve_device(recipe.device)  # a GPU that is not there: one line, before any work
    if recipe.output:
        check_output(recipe.output, recipe.overwrite, source=recipe.model)
        with output_lock(recipe.output):  # a second run to the same output fails at once
            return _run(recipe, progress)
    return _run(recipe, progress)


def _run(recipe, progress: bool) -> dict:
    from ..tasks.suite import load_tasks
    from .streamed import run_streamed, should_stream

    check_data(recipe)
    if should_stream(recipe):
        return run_streamed(recipe, progress)
    tasks = load_tasks(recipe.tasks, recipe.task_limit) if recipe.tasks else []
    model, tokenizer = load_model(recipe.model, recipe.dtype)
    check_model_fits(recipe, model)  # an EoRA rank or a budget the model cannot hold: one line, before any work
    if recipe.output:  # room for the weights (and a margin for the report), before any work
        check_output(recipe.output, recipe.overwrite, source=recipe.model,
                     expected_bytes=int(stored_bytes(model) * 1.05) + (16 << 20))
    dense = evaluate_dense(model, tokenizer, recipe, tasks, progress)
    result = prune(recipe, model, tokenizer, progress)
    one_shot = None
    if recipe.recovery:  # perplexity of the one-shot prune, then recovery on the recovery data
        from .recover import adapter_files, recover

        one_shot = evaluate_pruned(result, recipe, [], progress)["perplexity"]
        section = recover(result, recipe, progress)
        result.files.update(adapter_files(section, next(result.model.parameters()).dtype))  # LoRA kept unmerged
        result.report["recovery"] = section
    pruned = evaluate_pruned(result, recipe, tasks, progress)
    report = result.report
    report["perplexity"] = {n: {"dense": dense["perplexity"][n], "pruned": pruned["perplexity"][n]}
                            for n in recipe.evaluation}
    add_intervals(report["perplexity"], dense.get("window_nll", {}), pruned.get("window_nll", {}))
    if one_shot is not None:
        for n in recipe.evaluation:
            report["perplexity"][n]["one_shot"] = one_shot[n]
    if tasks:
        report["tasks"] = {"dense": dense["tasks"], "pruned": pruned["tasks"]}
    if recipe.completions:
        report["completions"] = {"dense": dense["completions"], "pruned": pruned["completions"]}
    if recipe.output:
        save_pruned(result.model, tokenizer, recipe.output, output_files(result, report),
                    overwrite=recipe.overwrite, source=recipe.model)
    return report
