"""Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2 over calibration tokens, compared per output row."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs, wanda_metric
from .base import Score


@register("score")
class WandaScore(Score):
    name = "wanda"
    description = "|W| * ||X||: weights times input activation norms (Wanda); summed over a unit for structures"
    needs = Needs(sq_norm=True)

    def importance(self, weight, stats, module: str = "?") -> torch.Tensor:
        return wanda_metric(weight, stats)

