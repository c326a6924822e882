"""Allocation methods: uniform, global threshold, and OWL (outlier-weighted layerwise sparsity)."""

from __future__ import annotations

import logging

import torch
from pydantic import Field
from torch import nn

from ..core.registry import register
from ..core.stats import LinearStats, Needs, wanda_metric
from ..errors import PrunewiseError
from .base import Allocation, AllocationConfig, AllocationContext
from .plan import AllocationPlan, exact_counts, quantize_levels

log = logging.getLogger(__name__)


def allocate_uniform(numels: dict[str, int], target: float, structure, exact: bool = False) -> AllocationPlan:
    """Every module at the target; ``exact`` (unstructured) rounds to whole weights so that exactly
    ``round(target * total)`` go overall (a module may then differ from ``round(target * numel)`` by one)."""
    modules = {m: target for m in numels}
    if exact and not structure.level_quantum:
        modules = exact_counts(modules, numels, target)
    return AllocationPlan(method="uniform", target=target, structure=structure.name, modules=modules, numels=numels)


class OutlierVisitor:
    """Dense pass collecting, per block, the share of Wanda scores above M times their mean (OWL's LOD)."""

    modifies_weights = False

    def __init__(self, prefix: str, targets: set[str], m: float) -> None:
        self.prefix, self.targets, self.m = prefix, targets, m
        self.metrics: list[torch.Tensor] = []
        self.ratios: list[float] = []

    def needs(self, i: int, name: str) -> Needs | None:
        return Needs(sq_norm=True)

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats) -> None:
        if f"{self.prefix}.{i}.{name}" in self.targets:
            self.metrics.append(wanda_metric(linear.weight, stats).flatten())

    def end_block(self, i: int, block: nn.Module) -> None:
        if self.metrics:
            allm = torch.cat(self.metrics)
            self.ratios.append(float((allm > self.m * allm.mean()).double().mean()))
        else:
            self.ratios.append(float("nan"))
        self.metrics = []


def owl_block_sparsity(ratios: list[float], target: float, lam: float) -> list[float]:
    """OWL's mapping: outlier ratios rescaled to [0, 2*lambda], centred so that mean density = 1 - target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - target)
    return (1 - density).tolist()


def allocate_owl(ratios: list[float], block_modules: list[list[str]], numels: dict[str, int], target: float,
                 structure, m: float, lam: float) -> AllocationPlan:
    """Per-block sparsity from outlier ratios; every targeted module of a block gets its block's level."""
    sparsity = owl_block_sparsity(ratios, target, lam)
    if max(sparsity) >= 1 or min(sparsity) < 0:
        raise PrunewiseError(f"OWL lambda {lam} pushes a layer outside [0, 1) at target {target}; use a smaller --owl-lambda")
    if structure.level_quantum:
        snapped = quantize_levels(torch.tensor(sparsity), structure.level_quantum, target).tolist()
        modules = {x: s for mods, s in zip(block_modules, snapped) for x in mods}
    else:
        modules = exact_counts({x: s for mods, s in zip(block_modules, sparsity) for x in mods}, numels, target)
    return AllocationPlan(method="owl", target=target, structure=structure.name, modules=modules, numels=numels,
                          params={"M": m, "lambda": lam},
                          layer_stats={"outlier_ratio": ratios, "block_sparsity": sparsity})


class ImportanceSampleVisitor:
    """Dense pass keeping a sorted sample of each targeted module's importance scores (for global allocation)."""

    modifies_weights = False

    def __init__(self, score, prefix: str, targets: set[str], max_sample: int = 1 << 18, seed: int = 0) -> None:
        self.score, self.prefix, self.targets, self.max_sample = score, prefix, targets, max_sample
        self.samples: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def needs(self, i: int, name: str) -> Needs | None:
        return self.score.needs if self.score.needs.any else None

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        full = f"{self.prefix}.{i}.{name}"
        if full not in self.targets:
            return
        imp = self.score.importance(linear.weight.detach(), stats, module=full).flatten().float()
        if imp.numel() > self.max_sample:
            imp = imp[torch.randint(imp.numel(), (self.max_sample,), generator=self.gen)]
        self.samples[full] = torch.sort(imp).values

    def end_block(self, i: int, block: nn.Module) -> None:
        return None


def allocate_global(samples: dict[str, torch.Tensor], numels: dict[str, int], target: float, structure,
                    min_density: float) -> AllocationPlan:
    """One importance threshold across all modules, with every module keeping at least ``min_density``."""
    if structure.level_quantum:
        raise PrunewiseError("global allocation ranks single weights across layers and cannot produce N:M levels; "
                             "use --allocation uniform or owl with N:M")
    if not 0 < min_density <= 1 - target:
        raise PrunewiseError(f"min density {min_density} must be in (0, 1 - target = {1 - target:.3f}]")
    cap = 1.0 - min_density
    total = sum(numels.values())
    goal = target * total

    def removed(t: torch.Tensor) -> float:
        return sum(min(float(torch.searchsorted(s, t)) / s.numel(), cap) * numels[m] for m, s in samples.items())

    lo, hi = min(float(s[0]) for s in samples.values()), max(float(s[-1]) for s in samples.values())
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    for _ in range(64):
        mid = (lo + hi) / 2
        if removed(mid) < goal:
            lo = mid
        else:
            hi = mid
    t = hi
    raw = {m: min(float(torch.searchsorted(s, t)) / s.numel(), cap) for m, s in samples.items()}
    modules = exact_counts(raw, numels, target, max_sparsity=cap)
    return AllocationPlan(method="global", target=target, structure=structure.name, modules=modules, numels=numels,
                          params={"min_density": min_density, "threshold": float(t)})


@register("allocation")
class Uniform(Allocation):
    key = "uniform"
    name = "uniform"
    description = "every targeted module at the target"

    def allocate(self, ctx: AllocationContext) -> AllocationPlan:
        return allocate_uniform(ctx.numels, ctx.target, ctx.structure, exact=ctx.exact)


class OWLConfig(AllocationConfig):
    m: float = Field(5.0, gt=0, description="outlier threshold M (times the mean Wanda score)")
    lam: float = Field(0.08, ge=0, lt=0.5, alias="lambda", description="spread lambda around the target")


def owl_plan(ctx: AllocationContext, windows, m: float, lam: float, structure=None) -> AllocationPlan:
    """OWL: outlier ratios from one dense pass over ``windows``, mapped to per-block levels."""
    structure = structure or ctx.structure
    prefix = ctx.adapter.block_prefix(ctx.model)
    visitor = OutlierVisitor(prefix, set(ctx.numels), m)
    ctx.engine(windows, "OWL outliers", False).run(visitor)
    blocks = [[f"{prefix}.{i}.{n}" for n in ctx.adapter.linears(b) if f"{prefix}.{i}.{n}" in ctx.numels]
              for i, b in enumerate(ctx.adapter.blocks(ctx.model))]
    keep = [j for j, mods in enumerate(blocks) if mods]
    return allocate_owl([visitor.ratios[j] for j in keep], [blocks[j] for j in keep], ctx.numels, ctx.target,
                        structure, m, lam)


@register("allocation")
class OWL(Allocation):
    key = "owl"
    name = "owl"
    description = "outlier-weighted layerwise sparsity: blocks with more Wanda outliers keep more (OWL)"
    Config = OWLConfig
    works_with = {"structure": ("unstructured", "n:m", "channels", "heads", "width")}

    def reads_calibration(self, pruner) -> bool:
        return True

    def allocate(self, ctx: AllocationContext) -> AllocationPlan:
        return owl_plan(ctx, ctx.windows, self.config.m, self.config.lam)


class GlobalConfig(AllocationConfig):
    min_density: float = Field(0.1, gt=0, le=1, description="share every module keeps at least")


@register("allocation")
class Global(Allocation):
    key = "global"
    name = "global"
    description = "one importance threshold across all modules (structures: FLAP's standardised global ranking)"
    Config = GlobalConfig
    works_with = {"structure": ("unstructured", "channels", "heads", "width")}
    hint = "global allocation cannot produce N:M levels; use uniform, owl or profile with N:M"

    def reads_calibration(self, pruner) -> bool:
        return pruner.needs.any

    def allocate(self, ctx: AllocationContext) -> AllocationPlan:
        prefix = ctx.adapter.block_prefix(ctx.model)
        visitor = ImportanceSampleVisitor(ctx.pruner, prefix, set(ctx.numels), seed=ctx.seed)
        ctx.engine(ctx.windows, "global scores", False).run(visitor)
        return allocate_global(visitor.samples, ctx.numels, ctx.target, ctx.structure, self.config.min_density)
