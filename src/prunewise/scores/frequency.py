"""Expert frequency: how many calibration tokens the router sends each routed expert (the baseline of
expert-pruning papers: MC-SMoE's usage, REAP's ``frequency`` criterion)."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import EXPERTS, Score


@register("score")
class FrequencyScore(Score):
    name = "frequency"
    description = "routed experts by how many calibration tokens the router sends them (--structure experts)"
    needs = Needs(experts=True)
    works_with = {"structure": EXPERTS}
    hint = "frequency ranks routed experts; use it with --structure experts on a mixture-of-experts model"

    def expert_scores(self, stats) -> torch.Tensor:
        return stats.counts.clone()
