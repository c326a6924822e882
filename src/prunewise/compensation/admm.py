"""ADMM weight update with a gradual mask (Boža, 2024; fmfi-compbio/admm-pruning ``lib/admm.py::AdmmPruner``).

In the coordinates where the Hessian has a unit diagonal (``Hn = D^-1 H D^-1``, ``B = D W^T``, then ``damp`` added
to the diagonal), with a penalty ``rho`` fixed at 1 and ``A = (Hn + rho I)^-1`` inverted once:

- ``Z = (W + U) * M`` (the kept entries), ``U += W - Z``, ``W = A (Hn B0 + rho (Z - U))``,

for ``iters`` iterations; the output is the last ``Z``. The mask ``M``:

- ``gradual`` (the paper's method, and the reference's N:M branch): during the first ``prune_iters`` iterations
  ``M`` keeps the largest ``|W + U|`` at the level ``s - s (1 - (t+1)/T)^3`` (cubic, reaching the target at the last
  of them), compared as the structure compares (the layer, a row, a row-wise plan's level per row); under N:M the
  weights outside each group's largest ``M - N`` are pruned at that level, the smallest first, so the last
  schedule step is exactly N:M;
- ``final``: the reference's default unstructured branch, whose ``topk`` uses the final sparsity at every one of the
  first ``prune_iters`` iterations (the schedule is computed and not used); the first mask is the score's;
- ``fixed``: the score's mask throughout (the reference's ``iterative_prune=0``), ADMM only moves the survivors.

The mask of the last schedule step is the one returned, its counts exact.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from ..core.hessian import normalized_hessian
from ..core.masks import PruneOutcome
from ..core.registry import PartConfig, register
from ..core.stats import Needs
from ..errors import PrunewiseError
from .base import Compensation


class ADMMConfig(PartConfig):
    damp: float = Field(0.1, ge=0, description="added to the normalised Hessian's unit diagonal (the reference's percdamp)")
    rho: float = Field(1.0, gt=0, description="the ADMM penalty")
    iters: int = Field(20, ge=1, description="ADMM iterations")
    prune_iters: int = Field(15, ge=1, description="iterations over which the mask is chosen (the gradual schedule)")
    mask: Literal["gradual", "final", "fixed"] = Field("gradual", description="how the mask moves: the cubic schedule, "
                                                       "the final level at every step (the reference's unstructured "
                                                       "default), or the score's mask kept")


@register("compensation")
class ADMMCompensation(Compensation):
    key = "admm"
    name = "admm"
    description = ("ADMM weight update (Boza 2024): a penalty-split reconstruction of the kept weights with a mask "
                   "chosen gradually on a cubic schedule")
    Config = ADMMConfig
    needs = Needs(hessian=True)
    reconstructs = True
    chooses_mask = True
    default_group = "layer"  # the reference compares the whole layer (per_out=False)
    works_with = {"structure": ("unstructured", "n:m")}
    hint = "ADMM reconstructs single weights; structured runs compensate with bias"

    def compensate(self, weight: torch.Tensor, stats, structure, sparsity, mask: torch.Tensor | None = None,
                   saliency=None, module: str = "?") -> PruneOutcome:
        if mask is None:
            raise PrunewiseError(f"admm on {module} needs a starting mask from the score")
        cfg = self.config
        t0 = time.perf_counter()
        device = weight.device
        key = ("admm_inverse", cfg.damp, cfg.rho)
        found = stats.cache.get(key)
        if found is None:  # once per statistics object: q/k/v (and gate/up) share it
            Hd, scale, dead = normalized_hessian(stats, 0.0, module)
            Hd.diagonal().add_(cfg.damp)
            Hr = Hd.clone()
            Hr.diagonal().add_(cfg.rho)
            found = stats.cache[key] = (Hd.float().to(device), torch.linalg.inv(Hr).float().to(device),
                                        scale.float().to(device), dead)
            del Hr
        Hd, inv, s, dead = found
        W0 = weight.detach().float().clone()
        W0[:, dead.to(device)] = 0.0
        B0 = W0 * s  # weight-shaped (out, in): the selections read contiguous rows, the products are right-hand
        XY = B0 @ Hd
        nm = structure.level_quantum
        target = structure.n / structure.m if nm else sparsity
        pruned = mask.to(device=device, dtype=torch.bool)
        W, U = B0.clone(), torch.zeros_like(B0)
        steps = min(cfg.prune_iters, cfg.iters)  # the schedule reaches the target within the iterations run
        final = structure.selector(weight.shape, sparsity) if cfg.mask == "final" else None
        for t in range(cfg.iters):
            if cfg.mask != "fixed" and t < steps and not (cfg.mask == "final" and t == 0):
                imp = (W + U).abs()
                if final is not None:
                    pruned = final(imp)
                else:
                    pruned = _scheduled(structure, imp, target, sparsity, 1 - (1 - (t + 1) / steps) ** 3)
            Z = (W + U).masked_fill_(pruned, 0.0)
            U.add_(W - Z)
            W = (XY + cfg.rho * (Z - U)) @ inv
        Z = (W + U).masked_fill_(pruned, 0.0)
        out = Z / s
        if not torch.isfinite(out).all():
            raise PrunewiseError(f"ADMM produced non-finite weights for {module}; raise its damp or use more "
                                 "calibration samples")
        notes = {"admm_s": time.perf_counter() - t0}
        if int(dead.sum()):
            notes["dead_inputs"] = int(dead.sum())
        return PruneOutcome(out.to(weight.dtype).contiguous(), pruned.contiguous(), notes)


def _scheduled(structure, imp: torch.Tensor, target: float, sparsity, share: float) -> torch.Tensor:
    """The mask at ``share`` of the way to the target (1 at the schedule's last step: the structure's own mask)."""
    if share >= 1:
        return structure.mask(imp, sparsity)
    if structure.level_quantum:  # N:M: every group keeps its largest M - N; of the rest the smallest go first
        candidates = structure.mask(imp, sparsity)
        count = int(round(target * share * imp.numel()))
        out = torch.zeros(imp.numel(), dtype=torch.bool, device=imp.device)
        if count:
            key = imp.masked_fill(~candidates, float("inf")).flatten()
            out[torch.topk(key, count, largest=False, sorted=False).indices] = True
        return out.view(imp.shape)
    level = sparsity * share if isinstance(sparsity, torch.Tensor) else float(sparsity) * share
    return structure.mask(imp, level)
