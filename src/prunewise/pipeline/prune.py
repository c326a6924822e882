"""One prune flow for every structure: statistics -> score -> select -> compensate -> apply, masks kept.

Weight-level structures (unstructured, N:M) mask single weights through the sequential engine, the
allocation part planning per-module levels first; structured ones slice units or remove sublayers
and blocks (``pipeline/structured.py``), the allocation part planning per-block widths. Both return
a :class:`PruneResult` whose ``masks`` say exactly what was removed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .._version import __version__
from ..allocation.base import AllocationContext
from ..allocation.plan import AllocationPlan
from ..core.masks import MaskSet
from ..core.stats import check_weight
from ..data import calibration_spec_windows
from ..engine.sequential import SequentialEngine
from ..engine.services import loss_gradients
from ..errors import PrunewiseError
from ..evaluate.sparsity import measure_sparsity
from ..export.register import MODELING_FILE
from ..models.adapters import get_adapter, prunable_weights
from ..models.loading import load_model
from .parts import placement_for
from .structured import prune_structured
from .visitor import GeneralVisitor, PruneVisitor

log = logging.getLogger(__name__)


ADAPTER_FOLDER = "eora"  # beside the weights: a PEFT LoRA adapter (PeftModel.from_pretrained(model, out / "eora"))


@dataclass
class PruneResult:
    """A pruned model in memory, the plan it followed, its masks and the report of what happened."""

    model: nn.Module
    tokenizer: object
    recipe: object
    plan: AllocationPlan
    report: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> content that run() saves beside plan.json (profile.json, ...)
    masks: MaskSet | None = None
    lowrank: object | None = None  # engine.lowrank.LowRankSet: corrections attached to the model (EoRA), saved as PEFT


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def targeted_numels(model: nn.Module, recipe) -> dict[str, int]:
    """Full name -> weight count of every prunable linear the recipe's targets/ignore select."""
    weights = prunable_weights(model)
    keep = {n: w.numel() for n, w in weights.items()
            if re.search(recipe.targets, n) and not (recipe.ignore and re.search(recipe.ignore, n))}
    if not keep:
        raise PrunewiseError(f"no prunable module matches targets={recipe.targets!r} ignore={recipe.ignore!r}; "
                             f"module names look like {next(iter(weights))}")
    return keep


def check_moe_targets(model: nn.Module, adapter, recipe, parts, streamed: bool = False) -> bool:
    """On a mixture-of-experts model: whether a weight-level run reaches inside the routed experts (its targets name
    their matrices, ``mlp.experts.{e}.gate_proj`` ...; the default targets do), refusing in one line what cannot run
    there yet (a low-rank correction, a model streamed from disk); the experts structure never removes a shared
    expert."""
    if adapter.moe is None or not any(adapter.experts_of(b) is not None for b in adapter.blocks(model)):
        return False
    structure = parts.structure
    prefix = adapter.block_prefix(model)
    if structure.key == "experts":
        if recipe.budget:
            raise PrunewiseError("--budget is not supported with --structure experts yet (a budget counts every targeted "
                                 "weight, the experts structure removes a share of the routed experts); give --sparsity, "
                                 "the share of routed experts to remove")
        for name in adapter.moe.shared:
            if recipe.targets != ".*" and re.search(recipe.targets, f"{prefix}.0.{name}"):
                raise PrunewiseError(f"--targets {recipe.targets!r} names the shared expert ({name}), which is not a "
                                     "routed expert: --structure experts removes routed experts only; drop --targets")
        return False
    if not structure.weight_level:
        return False
    routed = [f"{prefix}.{i}.{name}" for i, block in enumerate(adapter.blocks(model)) for name in adapter.weights(block)
              if adapter.in_routed_expert(name)]
    inside = any(re.search(recipe.targets, n) and not (recipe.ignore and re.search(recipe.ignore, n)) for n in routed)
    if inside and streamed:
        raise PrunewiseError(f"{structure.name} pruning inside the routed experts does not stream from disk yet; "
                             "load the model in memory (drop --offload disk), remove whole experts with --structure "
                             f"experts, or prune the other linears with --ignore {adapter.moe.experts!r}")
    if inside and any(c.adds_lowrank for c in parts.compensation):
        raise PrunewiseError("a low-rank correction (eora) cannot be kept beside the fused routed experts of a stock "
                             f"checkpoint; drop eora, or leave the experts out with --ignore {adapter.moe.experts!r}")
    return inside


def budget_share(recipe, model: nn.Module, numels: dict[str, int]) -> float:
    """The share of the targeted weights a parameter/byte budget removes (refused when impossible)."""
    from ..allocation.knapsack import parse_budget

    total = sum(numels.values())
    others = sum(p.numel() for p in model.parameters()) - total
    return parse_budget(recipe.budget, recipe.budget_dtype, others).removal(total) / total


def check_fits(parts, model: nn.Module, numels: dict[str, int]) -> None:
    """Refuse, from the targeted linears' shapes alone (meta tensors too), what the structure or a compensation
    cannot do with them (N:M widths, an EoRA rank at the layer's full rank), before any pruning."""
    weights = prunable_weights(model)
    for name in numels:
        parts.structure.check(name, weights[name])
        for part in parts.compensation:
            part.check(name, weights[name])


def allocation_context(model, recipe, parts, numels, windows, progress: bool, tokenizer=None,
                       stream=None, gradients: dict | None = None) -> AllocationContext:
    """What the allocation part gets: the model, the composed pruner, the targets, windows and engine services."""
    from ..allocation.profile import weights_fingerprint
    from ..models.loading import model_fingerprint  # noqa: F401  (the profile cache keys on the weights)

    adapter = get_adapter(model)
    draw = None
    if tokenizer is not None:
        def draw(n: int, length: int, seed: int) -> torch.Tensor:
            return calibration_spec_windows(tokenizer, recipe.calibration, n, length, seed)

    placement = placement_for(model, recipe, parts)

    def engine(win, desc: str, sequential: bool = False) -> SequentialEngine:
        e = SequentialEngine(model, adapter, win, recipe.chunk_size, progress, desc=desc, sequential=sequential,
                             placement=placement, stream=stream)
        e.gradients = gradients  # computed once before allocating (D-Pruner's folded gradients), or None
        return e

    remote = None
    if recipe.ray:
        remote = {"address": recipe.ray, "num_cpus": recipe.num_cpus, "num_gpus": recipe.num_gpus,
                  "build": functools.partial(search_replica, recipe.model_copy(update={"ray": None}))}
    return AllocationContext(model=model, adapter=adapter, pruner=parts.pruner(adapter), structure=parts.structure,
                             numels=numels, target=float(recipe.sparsity), exact=bool(recipe.budget),
                             windows=windows, progress=progress, seed=recipe.seed, chunk_size=recipe.chunk_size,
                             draw=draw, engine=engine, fingerprint=lambda: weights_fingerprint(model), remote=remote)


def search_replica(recipe):
    """What a Ray search actor holds: the dense model loaded as the driver loads it, the pruner and the structure."""
    model, _ = load_model(recipe.model, recipe.dtype)
    parts = recipe.parts()
    return model, parts.pruner(get_adapter(model)), parts.structure


def general_regularised_gradients(model, adapter, recipe, score, tokenizer, windows, placement, progress: bool,
                                  timings: dict) -> dict:
    """D-Pruner's importance of every block linear: the score's general importance from a dense pass over
    ``recipe.general_calibration`` (default wiki), then the domain windows' per-batch gradients folded with it."""
    t0 = time.perf_counter()
    general_windows = calibration_spec_windows(tokenizer, recipe.general_spec, recipe.nsamples,
                                               recipe.seqlen, recipe.seed)
    visitor = GeneralVisitor(score)
    SequentialEngine(model, adapter, general_windows, recipe.chunk_size, progress, desc=f"{score.name} general",
                     sequential=False, placement=placement, propagate="dense").run(visitor)
    general = visitor.general
    timings["general_importance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if score.config.lam is None:  # lam from balance: the first batch's gradients against the general importance
        ratios: list = []

        def probe(key, w, g, acc):
            ratios.append(score.regulariser_ratio(g, general[key].to(g.device)))
            return acc

        loss_gradients(model, adapter, windows[: score.config.batch], "folded", chunk_size=score.config.batch,
                       progress=False, fold=probe)
        log.info("dpruner: lam %.4g (balance %g)", score.resolve_lam(torch.cat(ratios)), score.config.balance)
    gradients = loss_gradients(model, adapter, windows, "folded", chunk_size=score.config.batch, progress=progress,
                               fold=lambda key, w, g, acc: score.fold(w, g, general[key].to(g.device), acc))
    timings["gradients_s"] = time.perf_counter() - t0
    return gradients


def build_plan(model, recipe, numels, windows, progress: bool, files: dict | None = None,
               tokenizer=None, stream=None, gradients: dict | None = None) -> AllocationPlan:
    """The allocation plan the recipe asks for: a saved plan, or the allocation part's."""
    if recipe.plan:
        plan = AllocationPlan.load(recipe.plan)
        plan.check_matches(numels)
        return plan
    parts = recipe.parts()
    ctx = allocation_context(model, recipe, parts, numels, windows, progress, tokenizer, stream, gradients)
    plan = parts.allocation.allocate(ctx)
    if files is not None:
        files.update(ctx.files)
    return plan


def prune(recipe, model: nn.Module | None = None, tokenizer=None, progress: bool = True, stream=None) -> PruneResult:
    """Prune ``recipe.model`` (or the given model, in place) as the recipe says; nothing is written to disk.

    With ``stream`` (``pipeline/streamed.py``) the model is on the meta device: every walk reads blocks
    from the checkpoint and the pruning walk writes them to the stream's output shards.
    """
    if recipe.ray and (recipe.plan or recipe.allocation["name"] != "search"):
        raise PrunewiseError(f"--ray distributes sweeps (prunewise sweep --ray) and the allocation search; this prune "
                             f"(allocation {recipe.allocation['name']}{', a saved plan' if recipe.plan else ''}) has "
                             "nothing to distribute: drop --ray, or use --allocation search")
    if model is None:
        if recipe.offload == "disk" and stream is None:
            raise PrunewiseError("--offload disk writes the pruned model as it goes: use run() (prunewise prune "
                                 "--output DIR), not prune(), which returns a model in memory")
        model, tokenizer = load_model(recipe.model, recipe.dtype)
    adapter = get_adapter(model)
    parts = recipe.parts()
    # inside routed experts the walk sees each expert's matrices as linears; they are fused back before returning
    inside = check_moe_targets(model, adapter, recipe, parts, streamed=stream is not None)
    with adapter.unfused(model) if inside else contextlib.nullcontext():
        return _prune(recipe, model, tokenizer, progress, stream, adapter, parts)


def _prune(recipe, model, tokenizer, progress, stream, adapter, parts) -> PruneResult:
    structure = parts.structure
    placement = placement_for(model, recipe, parts)
    numels = targeted_numels(model, recipe)
    if recipe.budget:  # a parameter/byte budget becomes the share of the targeted weights to remove
        recipe = recipe.model_copy(update={"sparsity": budget_share(recipe, model, numels)})
        log.info("budget %s: sparsity %.6f of the targeted weights", recipe.budget, recipe.sparsity)
    check_fits(parts, model, numels)
    weights = prunable_weights(model)
    for name in numels:
        if stream is None:  # streamed: checked in the prune visitor when the block is read
            check_weight(name, weights[name])
    timings: dict[str, float] = {}
    pruner = parts.pruner(adapter)
    rowwise = bool(parts.allocation.config.rowwise)
    if structure.weight_level:
        needs_data = pruner.needs.any or rowwise or (not recipe.plan and parts.allocation.reads_calibration(pruner))
    else:
        needs_data = (pruner.needs.any or parts.compensation_named("bias") is not None or structure.depth
                      or getattr(parts.score, "tunes", False)
                      or (not recipe.plan and parts.allocation.reads_calibration(pruner)))
    windows = None
    if needs_data:
        t0 = time.perf_counter()
        windows = calibration_spec_windows(tokenizer, recipe.calibration, recipe.nsamples, recipe.seqlen, recipe.seed)
        timings["calibration_data_s"] = time.perf_counter() - t0
    if not structure.weight_level:
        return _prune_units(recipe, parts, model, tokenizer, adapter, numels, windows, timings, progress, stream)

    gradients = None
    if pruner.needs.general:  # D-Pruner: general importance, then the domain gradients it regularises
        gradients = general_regularised_gradients(model, adapter, recipe, parts.score, tokenizer, windows, placement,
                                                  progress, timings)
    t0 = time.perf_counter()
    files: dict = {}
    plan = build_plan(model, recipe, numels, windows, progress, files, tokenizer, stream, gradients)
    timings["allocation_s"] = time.perf_counter() - t0

    visitor = PruneVisitor(pruner, structure, plan, adapter.block_prefix(model), rowwise=rowwise)
    visitor.masks.made_for = {"blocks": len(adapter.blocks(model))}
    if stream is not None:  # out of core: each block's masks packed into a file, not kept in memory
        visitor.masks.spill = stream.mask_spill
    t0 = time.perf_counter()
    engine = SequentialEngine(model, adapter, windows, recipe.chunk_size, progress, desc=f"{parts.score.name} prune",
                              sequential=recipe.sequential, placement=placement, stream=stream,
                              propagate=recipe.propagate)
    if gradients is not None:
        engine.gradients = gradients
    elif pruner.needs.gradient:
        engine.gradients = loss_gradients(model, adapter, windows, pruner.needs.gradient,
                                          chunk_size=min(recipe.chunk_size or 4, 4), progress=progress)
        timings["gradients_s"] = time.perf_counter() - t0
    t_walk = time.perf_counter()
    engine.run(visitor)
    timings["prune_s"] = time.perf_counter() - t0
    # where the walk's seconds went (capture, statistics, per-linear work, propagation, copies, bookkeeping)
    timings.update({f"prune.{k}": v for k, v in engine.breakdown(time.perf_counter() - t_walk).items()})
    if rowwise and not plan.method.endswith("+rowwise"):
        plan.method = f"{plan.method}+rowwise"
        plan.params["rowwise"] = "trim"

    measured = stream.measured_sparsity(model) if stream is not None else measure_sparsity(model, list(numels))
    report = _weight_report(recipe, parts, measured, numels, plan, visitor, timings)
    # how the walk went: block passes in all (one per block is the floor), windows per chunk, chunks taking turns
    report["walk"] = {"passes": engine.passes, "chunk_size": engine.chunk_size, "turns": engine.turns,
                      "within_block": "sequential" if recipe.sequential else "parallel", "propagate": recipe.propagate}
    if engine.unreached:  # routed experts no calibration token reached: pruned by magnitude (LinearStats.unreached)
        report["walk"]["unreached"] = [f"{visitor.prefix}.{i}.{n}" for i, n in engine.unreached]
    lowrank = visitor.lowrank if len(visitor.lowrank) else None
    if lowrank is not None:
        report["adapter"] = {"kind": "lora", "folder": ADAPTER_FOLDER, **lowrank.summary(next(model.parameters()).dtype)}
    return PruneResult(model, tokenizer, recipe, plan, report, files, visitor.masks, lowrank)


def _weight_report(recipe, parts, measured, numels, plan, visitor, timings) -> dict:
    """What a weight-level run did: planned and achieved sparsity per module, timings, Cholesky retries."""
    return {
        "prunewise": __version__,
        "model": recipe.model,
        "score": parts.score.name,
        "structure": parts.structure.name,
        "allocation": plan.method,
        "compensation": [c.key for c in parts.compensation],
        "target_sparsity": recipe.sparsity,
        "achieved_sparsity": measured["sparsity"],
        "sparsity_of_all_parameters": measured["sparsity_of_all_parameters"],
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
        "modules": {n: {**measured["modules"][n], **visitor.records.get(n, {}), "planned": plan.modules[n]}
                    for n in numels},
        "cholesky_retries": {n: r["damp"] for n, r in visitor.records.items() if "damp" in r},
    }


def _prune_units(recipe, parts, model, tokenizer, adapter, numels, windows, timings, progress: bool,
                 stream=None) -> PruneResult:
    """Structured pruning: unit scores (or block and sublayer influence), widths, compensation, a smaller model."""
    structure = parts.structure
    source_plan = None
    if recipe.plan:
        source_plan = AllocationPlan.load(recipe.plan)
        source_plan.check_matches(numels)
    elif parts.allocation.key == "owl":  # OWL's block levels become per-block widths
        from ..allocation.methods import owl_plan
        from ..structures import Unstructured

        t0 = time.perf_counter()
        ctx = allocation_context(model, recipe, parts, numels, windows, progress, stream=stream)
        source_plan = owl_plan(ctx, windows, parts.allocation.config.m, parts.allocation.config.lam,
                               structure=Unstructured())
        timings["allocation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan, info, masks = prune_structured(model, adapter, recipe, windows, progress, source_plan, stream)
    timings["prune_s"] = time.perf_counter() - t0
    timings.update(info.pop("timings"))
    before, after = info["params_before"], info["params_after"]
    report = {
        "prunewise": __version__,
        "model": recipe.model,
        "score": {"blocks": "block-influence", "sublayers": "output-kl-per-parameter"}.get(structure.kind,
                                                                                            parts.score.name),
        "structure": structure.name,
        "allocation": plan.method,
        "compensation": [c.key for c in parts.compensation],
        "target_sparsity": recipe.sparsity,
        "achieved_sparsity": info["removed_share_of_targeted"],
        "sparsity_of_all_parameters": 1 - after["total"] / before["total"],
        "bias_compensation": parts.compensation_named("bias") is not None,
        "structured": info,
        "timings": timings,
        "peak_rss_mb": peak_rss_mb(),
        "modules": {n: {"planned": v, "sparsity": v} for n, v in plan.modules.items()},
    }
    files = {}
    if info["config"] == "custom":
        files["modeling_prunewise.py"] = MODELING_FILE.read_text()
    return PruneResult(model, tokenizer, recipe, plan, report, files, masks)
