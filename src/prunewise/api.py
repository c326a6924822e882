"""The Python API: ``prune(recipe)``, ``evaluate(...)`` and ``run(recipe)``, the same calls the CLI makes."""

from __future__ import annotations

import json
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .allocation.methods import (ImportanceSampleVisitor, OutlierVisitor, allocate_global, allocate_owl,
                                 allocate_uniform)
from .allocation.knapsack import allocate_from_profile
from .allocation.plan import AllocationPlan, plot_plan
from .allocation.search import SearchConfig, search_allocation
from .allocation.profile import compute_profile, plot_profile, weights_fingerprint
from .cache import cache_dir
from .data import calibration_corpora, calibration_spec_windows, check_no_overlap, evaluation_windows, get_corpus
from .data.mixture import CalibrationSpec
from .engine.pruner import PruneVisitor
from .engine.sequential import SequentialEngine
from .errors import PrunewiseError
from .evaluate.perplexity import perplexity
from .evaluate.sparsity import measure_sparsity
from .export.save import check_output, output_lock, save_pruned
from .models.adapters import get_adapter, prunable_weights
from .models.loading import load_model, model_fingerprint
from .recipe import Recipe
from .scores import check_weight, get_score
from .export.register import MODELING_FILE
from .structured.geometry import Structured
from .structured.run import prune_structured
from .structures.masks import Unstructured

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """A pruned model in memory, the plan it followed and the report of what happened."""

    model: nn.Module
    tokenizer: object
    recipe: Recipe
    plan: AllocationPlan
    report: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> content that run() saves beside plan.json (profile.json, ...)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def targeted_numels(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    """Full name -> weight count of every prunable linear the recipe's targets/ignore select."""
    weights = prunable_weights(model)
    keep = {n: w.numel() for n, w in weights.items()
            if re.search(recipe.targets, n) and not (recipe.ignore and re.search(recipe.ignore, n))}
    if not keep:
        raise PrunewiseError(f"no prunable module matches targets={recipe.targets!r} ignore={recipe.ignore!r}; "
                             f"module names look like {next(iter(weights))}")
    return keep


def _walk_without_data(model, adapter, visitor) -> None:
    """Visit every linear with no statistics (scores that need no calibration data)."""
    for i, block in enumerate(adapter.blocks(model)):
        for name, linear in adapter.linears(block).items():
            visitor.visit(i, name, linear, None)
        visitor.end_block(i, block)


def _owl_plan(model, adapter, recipe: Recipe, structure, numels, windows, progress: bool) -> AllocationPlan:
    prefix = adapter.block_prefix(model)
    visitor = OutlierVisitor(prefix, set(numels), recipe.owl_m)
    SequentialEngine(model, adapter, windows, recipe.chunk_size, progress, desc="OWL outliers").run(visitor)
    blocks = [[f"{prefix}.{i}.{n}" for n in adapter.linears(b) if f"{prefix}.{i}.{n}" in numels]
              for i, b in enumerate(adapter.blocks(model))]
    keep = [j for j, mods in enumerate(blocks) if mods]
    return allocate_owl([visitor.ratios[j] for j in keep], [blocks[j] for j in keep], numels, float(recipe.sparsity),
                        structure, recipe.owl_m, recipe.owl_lambda)


def _profile_plan(model, recipe: Recipe, score, structure, numels, profile_windows, progress: bool,
                  files: dict | None) -> AllocationPlan:
    profile = compute_profile(model, profile_windows, score, structure, numels, unit=recipe.profile_unit,
                              levels=recipe.profile_levels, chunk_size=recipe.chunk_size, progress=progress,
                              model_fingerprint=weights_fingerprint(model))
    if files is not None:
        files["profile.json"] = profile.model_dump_json(indent=1)
        png = plot_profile(profile)
        if png is not None:
            files["profile.png"] = png
    return allocate_from_profile(profile, float(recipe.sparsity))


def _own_windows(given: torch.Tensor | None, windows: torch.Tensor | None, n: int, length: int, what: str) -> torch.Tensor:
    """The windows an allocation method measures on: as given, else the first ``n x length`` of the calibration windows."""
    if given is not None:
        return given
    if windows is None:
        raise PrunewiseError(f"{what} allocation needs calibration windows; pass {what}_windows to build_plan")
    return windows[:n, :length]


def build_plan(model, recipe: Recipe, score, structure, numels, windows, progress: bool,
               profile_windows: torch.Tensor | None = None, files: dict | None = None,
               search_windows: torch.Tensor | None = None) -> AllocationPlan:
    """The allocation plan the recipe asks for (a dense pass over the calibration data where needed).

    ``allocation='profile'`` measures (or loads from the cache) a sensitivity profile on
    ``profile_windows`` and puts ``profile.json`` (and ``profile.png``) into ``files``.
    ``allocation='search'`` starts from the best of uniform, OWL (outliers counted on
    ``search_windows``) and the profile plan, and searches on ``search_windows``.
    """
    adapter = get_adapter(model)
    prefix = adapter.block_prefix(model)
    target = float(recipe.sparsity)
    if recipe.plan:
        plan = AllocationPlan.load(recipe.plan)
        plan.check_matches(numels)
        return plan
    if recipe.allocation == "uniform":  # a parameter/byte budget is met to the weight, not to one per module
        return allocate_uniform(numels, target, structure, exact=bool(recipe.budget))
    if recipe.allocation == "owl":
        return _owl_plan(model, adapter, recipe, structure, numels, windows, progress)
    if recipe.allocation in ("profile", "search"):
        profile_windows = _own_windows(profile_windows, windows, recipe.profile_nsamples, recipe.profile_seqlen, "profile")
        profiled = _profile_plan(model, recipe, score, structure, numels, profile_windows, progress, files)
        if recipe.allocation == "profile":
            return profiled
        search_windows = _own_windows(search_windows, windows, recipe.search_nsamples, recipe.search_seqlen, "search")
        starts = {"uniform": allocate_uniform(numels, target, structure, exact=True),
                  "owl": _owl_plan(model, adapter, recipe, structure, numels, search_windows, progress),
                  "profile": profiled}
        config = SearchConfig(generations=recipe.search_generations, offspring=recipe.search_offspring,
                              time_limit_s=recipe.search_time_limit, cache_mb=recipe.search_cache_mb, seed=recipe.seed)
        return search_allocation(model, search_windows, score, structure, numels, starts, config, progress)
    visitor = ImportanceSampleVisitor(score, prefix, set(numels), seed=recipe.seed)
    if score.needs is None:
        _walk_without_data(model, adapter, visitor)
    else:
        SequentialEngine(model, adapter, windows, recipe.chunk_size, progress, desc="global scores").run(visitor)
    return allocate_global(visitor.samples, numels, target, structure, recipe.min_density)


def prune(recipe: Recipe, model: nn.Module | None = None, tokenizer=None, progress: bool = True) -> PruneResult:
    """Prune ``recipe.model`` (or the given model, in place) as the recipe says; nothing is written to disk."""
    if model is None:
        model, tokenizer = load_model(recipe.model)
    adapter = get_adapter(model)
    structure = recipe.structure_obj
    numels = targeted_numels(model, recipe)
    if recipe.budget:  # a parameter/byte budget becomes the share of the targeted weights to remove
        from .recipe import parse_budget
        total = sum(numels.values())
        others = sum(p.numel() for p in model.parameters()) - total
        count = parse_budget(recipe.budget, recipe.budget_dtype, others).removal(total)
        recipe = recipe.model_copy(update={"sparsity": count / total})
        log.info("budget %s: remove %d of %d targeted weights (sparsity %.6f)", recipe.budget, count, total, recipe.sparsity)
    weights = prunable_weights(model)
    for name in numels:
        check_weight(name, weights[name])
        structure.check(name, weights[name])
    if isinstance(structure, Structured):
        return _prune_structured(recipe, model, tokenizer, adapter, numels, progress)
    score = get_score(recipe.score, damp=recipe.damp, blocksize=recipe.blocksize)

    timings: dict[str, float] = {}
    windows = None
    # profile and search draw their own windows below; OWL counts outliers on these
    needs_data = score.needs is not None or recipe.rowwise or (recipe.allocation == "owl" and not recipe.plan)
    if needs_data:
        t0 = time.perf_counter()
        windows = calibration_spec_windows(tokenizer, recipe.calibration, recipe.nsamples, recipe.seqlen, recipe.seed)
        timings["calibration_data_s"] = time.perf_counter() - t0

    profile_windows = None
    if recipe.allocation in ("profile", "search") and not recipe.plan:  # drawn apart: mixtures are concatenated by source
        t0 = time.perf_counter()
        profile_windows = calibration_spec_windows(tokenizer, recipe.calibration, recipe.profile_nsamples,
                                                   recipe.profile_seqlen, recipe.seed)
        timings["profile_data_s"] = time.perf_counter() - t0

    search_windows = None
    if recipe.allocation == "search" and not recipe.plan:
        t0 = time.perf_counter()
        search_windows = calibration_spec_windows(tokenizer, recipe.calibration, recipe.search_nsamples,
                                                  recipe.search_seqlen, recipe.seed + 1)
        timings["search_data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    files: dict = {}
    plan = build_plan(model, recipe, score, structure, numels, windows, progress, profile_windows, files,
                      search_windows)
    timings["allocation_s"] = time.perf_counter() - t0

    visitor = PruneVisitor(score, structure, plan, adapter.block_prefix(model), rowwise=recipe.rowwise)
    t0 = time.perf_counter()
    if score.needs is None and not recipe.rowwise:
        _walk_without_data(model, adapter, visitor)
    else:
        SequentialEngine(model, adapter, windows, recipe.chunk_size, progress, desc=f"{recipe.score} prune",
                         sequential=recipe.sequential).run(visitor)
    timings["prune_s"] = time.perf_counter() - t0
    if recipe.rowwise and not plan.method.endswith("+rowwise"):
        plan.method = f"{plan.method}+rowwise"
        plan.params["rowwise"] = "trim"

    measured = measure_sparsity(model, list(numels))
    report = {
        "prunewise": __version__,
        "model": recipe.model,
        "score": recipe.score,
        "structure": structure.name,
        "allocation": plan.method,
        "target_sparsity": recipe.sparsity,
        "achieved_sparsity": measured["sparsity"],
        "sparsity_of_all_parameters": measured["sparsity_of_all_parameters"],
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
        "modules": {n: {**measured["modules"][n], **visitor.records.get(n, {}), "planned": plan.modules[n]}
                    for n in numels},
        "cholesky_retries": {n: r["damp"] for n, r in visitor.records.items() if "damp" in r},
    }
    return PruneResult(model, tokenizer, recipe, plan, report, files)


def _prune_structured(recipe: Recipe, model, tokenizer, adapter, numels, progress: bool) -> PruneResult:
    """Structured pruning: statistics, widths or blocks, compensation, and a physically smaller model."""
    structure = recipe.structure_obj
    timings: dict[str, float] = {}
    needs_data = (recipe.score != "magnitude" or recipe.bias_compensation or recipe.allocation == "owl"
                  or structure.kind in ("blocks", "sublayers"))
    windows = None
    if needs_data:
        t0 = time.perf_counter()
        windows = calibration_spec_windows(tokenizer, recipe.calibration, recipe.nsamples, recipe.seqlen, recipe.seed)
        timings["calibration_data_s"] = time.perf_counter() - t0
    source_plan = None
    if recipe.plan:
        source_plan = AllocationPlan.load(recipe.plan)
        source_plan.check_matches(numels)
    elif recipe.allocation == "owl":
        t0 = time.perf_counter()
        source_plan = _owl_plan(model, adapter, recipe, Unstructured(), numels, windows, progress)
        timings["allocation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan, info = prune_structured(model, adapter, recipe, windows, progress, source_plan)
    timings["prune_s"] = time.perf_counter() - t0
    timings.update(info.pop("timings"))
    before, after = info["params_before"], info["params_after"]
    report = {
        "prunewise": __version__,
        "model": recipe.model,
        "score": {"blocks": "block-influence", "sublayers": "output-kl-per-parameter"}.get(structure.kind, recipe.score),
        "structure": structure.name,
        "allocation": plan.method,
        "target_sparsity": recipe.sparsity,
        "achieved_sparsity": info["removed_share_of_targeted"],
        "sparsity_of_all_parameters": 1 - after["total"] / before["total"],
        "bias_compensation": recipe.bias_compensation,
        "structured": info,
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
        "modules": {n: {"planned": v, "sparsity": v} for n, v in plan.modules.items()},
    }
    files = {}
    if info["config"] == "custom":
        files["modeling_prunewise.py"] = MODELING_FILE.read_text()
    return PruneResult(model, tokenizer, recipe, plan, report, files)


def _dense_cache_path(model_spec: str, corpus, seqlen: int, max_tokens: int) -> Path | None:
    try:
        fp = model_fingerprint(model_spec)
    except PrunewiseError:
        return None
    return cache_dir("evals") / f"ppl-{fp}-{corpus.fingerprint[:16]}-{seqlen}-{max_tokens}.json"


def evaluate(model: nn.Module, tokenizer, data: list[str], eval_tokens: int = 32768, seqlen: int = 512,
             calibration: CalibrationSpec | None = None, dense_spec: str | None = None,
             progress: bool = True) -> dict[str, float]:
    """Perplexity on each evaluation corpus; refuses corpora that overlap the calibration text (every mixture part).

    With ``dense_spec`` (the model is the unmodified named/source model) results are cached on disk.
    """
    results = {}
    calibs = calibration_corpora(calibration) if calibration else []
    for name in data:
        corpus = get_corpus(name, "evaluation")
        for calib in calibs:
            check_no_overlap(calib, corpus)
        cache = _dense_cache_path(dense_spec, corpus, seqlen, eval_tokens) if dense_spec else None
        if cache is not None and cache.exists():
            results[name] = json.loads(cache.read_text())["perplexity"]
            continue
        windows = evaluation_windows(tokenizer, corpus, seqlen, eval_tokens)
        results[name] = perplexity(model, windows, progress=progress, desc=f"ppl {name}")
        if cache is not None:
            cache.write_text(json.dumps({"perplexity": results[name], "windows": list(windows.shape)}))
    return results


def report_markdown(report: dict, plan: AllocationPlan, details_only: bool = False) -> str:
    """A readable summary of a pruning run (``details_only``: the search, row-wise, structured and module parts)."""
    lines = [] if details_only else [f"# prunewise report: {report['model']}", "",
             f"- score: **{report['score']}**, structure: **{report['structure']}**, allocation: **{report['allocation']}**",
             f"- target sparsity {report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f} "
             f"(of all parameters: {report['sparsity_of_all_parameters']:.4f})",
             "- timings: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
             f"- peak RSS {report['peak_rss_mb']:.0f} MB", ""]
    if report.get("perplexity") and not details_only:
        lines += ["| data | dense | pruned | ratio |", "|---|---|---|---|"]
        for name, row in report["perplexity"].items():
            lines.append(f"| {name} | {row['dense']:.2f} | {row['pruned']:.2f} | {row['pruned'] / row['dense']:.2f}x |")
        lines.append("")
    stats = plan.layer_stats if isinstance(plan.layer_stats, dict) else {}
    if stats.get("history"):
        tracked = [h for h in stats["history"] if h.get("tracking_fitness") is not None]
        lines += [f"Search: started from **{stats['start']}** (KL on the tracking windows: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in stats["start_fitness"].items()) +
                  f"); {stats['history'][-1]['generation']} generations in {stats['seconds']['total']:.0f} s, "
                  f"{stats['variants_pruned']} pruned variants; tracking KL by generation: " +
                  ", ".join(f"{h['generation']}: {h['tracking_fitness']:.4f}" for h in tracked), ""]
    if plan.rows:
        spans = [max(v) - min(v) for v in plan.rows.values()]
        lines += [f"Row-wise (TRIM): {len(plan.rows)} modules with per-row sparsities; widest row range "
                  f"{max(spans):.3f}, median {sorted(spans)[len(spans) // 2]:.3f}.", ""]
    if report.get("structured"):
        lines += structured_markdown(report["structured"])
    if report.get("cholesky_retries"):
        lines += ["Cholesky needed more dampening for: " + ", ".join(f"{k} ({v:g})" for k, v in report["cholesky_retries"].items()), ""]
    lines += ["| module | planned | achieved |", "|---|---|---|"]
    for name, row in report["modules"].items():
        lines.append(f"| {name} | {row['planned']:.4f} | {row['sparsity']:.4f} |")
    return "\n".join(lines) + "\n"


def structured_markdown(info: dict) -> list[str]:
    """The structured part of report.md: parameters before and after, and each block's widths."""
    b, a = info["params_before"], info["params_after"]
    lines = [f"Structured: {info['removed_targeted_params']:,} of {info['targeted_params']:,} targeted parameters removed "
             f"({info['removed_share_of_targeted']:.2%}); all parameters {b['total']:,} -> {a['total']:,}, decoder "
             f"{b['decoder']:,} -> {a['decoder']:,} ({info['removed_share_of_decoder']:.2%} of it removed); ideal speedup "
             f"{info['ideal_speedup']:.3f}x; saved with a **{info['config']}** config"
             + (f"; removed blocks: {info['removed_blocks']}" if info.get("removed_blocks") else "") + ".", "",
             "| block | query heads | kv heads | MLP channels | o_proj bias | down_proj bias |", "|---|---|---|---|---|---|"]
    for row in info["layers"]:
        lines.append(f"| {row['block']} | {row['num_attention_heads']} | {row['num_key_value_heads']} | "
                     f"{row['intermediate_size']} | {'yes' if row['o_proj_bias'] else ''} | "
                     f"{'yes' if row['down_proj_bias'] else ''} |")
    return lines + [""]


def _dense_key(model_spec: str) -> str | None:
    try:
        return model_fingerprint(model_spec)
    except PrunewiseError:
        return None


def run(recipe: Recipe, progress: bool = True) -> dict:
    """The whole job: evaluate dense, prune, evaluate pruned, save (if ``recipe.output``). Returns the report.

    Evaluation covers perplexity on ``recipe.evaluation``, zero-shot accuracy on ``recipe.tasks`` and greedy
    completions of fixed prompts, each beside the dense model; the folder gets report.json, report.md (with
    figures/) and a self-contained report.html.
    """
    if recipe.output:
        check_output(recipe.output, recipe.overwrite, source=recipe.model)
        with output_lock(recipe.output):  # a second run to the same output fails at once
            return _run(recipe, progress)
    return _run(recipe, progress)


def _stored_bytes(model) -> int:
    """Bytes of the model's distinct tensors: about the size of its safetensors file."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def _run(recipe: Recipe, progress: bool) -> dict:
    from .evaluate.completions import greedy_completions
    from .report.build import report_files, run_sections
    from .tasks.suite import evaluate_tasks, load_tasks

    calibs = calibration_corpora(recipe.calibration) if recipe.evaluation else []
    for name in recipe.evaluation:  # refuse overlapping data before any work
        corpus = get_corpus(name, "evaluation")
        for calib in calibs:
            check_no_overlap(calib, corpus)
    tasks = load_tasks(recipe.tasks, recipe.task_limit) if recipe.tasks else []
    model, tokenizer = load_model(recipe.model)
    if recipe.output:  # room for the weights (and a margin for the report), before any work
        check_output(recipe.output, recipe.overwrite, source=recipe.model,
                     expected_bytes=int(_stored_bytes(model) * 1.05) + (16 << 20))
    dense = evaluate(model, tokenizer, recipe.evaluation, recipe.eval_tokens, recipe.eval_seqlen,
                     dense_spec=recipe.model, progress=progress) if recipe.evaluation else {}
    dense_tasks = evaluate_tasks(model, tokenizer, tasks, dense_key=_dense_key(recipe.model),
                                 progress=progress) if tasks else {}
    dense_text = greedy_completions(model, tokenizer) if recipe.completions else []
    result = prune(recipe, model, tokenizer, progress)
    pruned = evaluate(result.model, tokenizer, recipe.evaluation, recipe.eval_tokens, recipe.eval_seqlen,
                      progress=progress) if recipe.evaluation else {}
    report = result.report
    report["perplexity"] = {n: {"dense": dense[n], "pruned": pruned[n]} for n in recipe.evaluation}
    if tasks:
        report["tasks"] = {"dense": dense_tasks, "pruned": evaluate_tasks(result.model, tokenizer, tasks, progress=progress)}
    if recipe.completions:
        report["completions"] = {"dense": dense_text, "pruned": greedy_completions(result.model, tokenizer)}
    if recipe.output:
        title, lead, sections = run_sections(report, result.plan)
        pages = report_files(title, lead, sections)
        pages["report.md"] += "\n## Details\n\n" + report_markdown(report, result.plan, details_only=True)
        save_pruned(result.model, tokenizer, recipe.output, {
            "recipe.yaml": recipe.to_yaml(),
            "plan.json": result.plan.model_dump_json(indent=1),
            **({"plan.png": png} if (png := plot_plan(result.plan)) is not None else {}),
            "report.json": json.dumps(report, indent=1),
            **pages,
            **result.files,
        }, overwrite=recipe.overwrite, source=recipe.model)
    return report
