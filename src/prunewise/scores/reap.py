"""REAP (Lasby et al., 2025, CerebrasResearch/reap ``pruning_metrics.py``): the router-weighted expert activation
norm, ``S_j = mean over the tokens x routed to j of g_j(x) * ||f_j(x)||``, ``g_j`` the gate value the layer applies
(top-k, renormalised where the family renormalises) and ``f_j(x)`` the expert's output. An expert no calibration
token reaches scores 0 (the mean over no tokens is taken as 0), so it goes first."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import EXPERTS, Score


@register("score")
class REAPScore(Score):
    name = "reap"
    description = "REAP: mean over routed tokens of gate value x expert output norm (--structure experts)"
    needs = Needs(experts=True)
    works_with = {"structure": EXPERTS}
    hint = "reap ranks routed experts; use it with --structure experts on a mixture-of-experts model"

    def expert_scores(self, stats) -> torch.Tensor:
        return torch.where(stats.counts > 0, stats.gated_norm / stats.counts.clamp_min(1), torch.zeros_like(stats.counts))
