"""Merging removed experts into kept ones (M-SMoE / HC-SMoE / UNCURL's expert reduction), against pure removal.

Each removed routed expert that the calibration data reaches is merged into the kept expert whose mean output on
the calibration tokens is most alike (cosine of ``sum f_j(x) / |X_j|``, HC-SMoE's feature); a kept expert's
matrices become the frequency-weighted average of its own and those merged into it,
``W_k <- (n_k W_k + sum_r n_r W_r) / (n_k + sum_r n_r)`` (M-SMoE's weighting, ``n`` the tokens routed), its router
row unchanged. A removed expert no calibration token reached carries no weight and is dropped, as pure removal
drops it. The matrices are averaged element by element, as the reference merges do after their alignment step;
experts whose channels are not aligned (a MoEfied model's disjoint channel groups) are averaged as they are."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import Compensation


@register("compensation")
class MergeCompensation(Compensation):
    key = "merge"
    name = "merge"
    description = "removed experts merged into the most alike kept expert (frequency-weighted average of matrices)"
    needs = Needs(experts=True)
    works_with = {"structure": ("experts",)}
    hint = "merge combines removed routed experts with kept ones; use it with --structure experts"
    merges_experts = True

    @staticmethod
    def assign(stats, keep: torch.Tensor, removed: torch.Tensor) -> dict[int, list[int]]:
        """Kept expert -> the removed experts merged into it (only removed experts some calibration token reached)."""
        out: dict[int, list[int]] = {int(k): [] for k in keep}
        reached = [int(r) for r in removed if stats.counts[int(r)] > 0]
        kept = [int(k) for k in keep]
        if not reached or stats.output_sum is None:
            return out
        mean = stats.output_sum / stats.counts.clamp_min(1).unsqueeze(1)
        alike = torch.nn.functional.cosine_similarity(mean[reached].unsqueeze(1), mean[kept].unsqueeze(0), dim=-1)
        for i, r in enumerate(reached):
            out[kept[int(torch.argmax(alike[i]))]].append(r)
        return out
