"""EAN (expert activation norm, as REAP's paper compares it): the summed output norm of each routed expert over
the calibration tokens routed to it, ``sum_x ||f_j(x)||``, without the gate value."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import EXPERTS, Score


@register("score")
class EANScore(Score):
    name = "ean"
    description = "expert activation norm: sum over routed tokens of the expert output norm (--structure experts)"
    needs = Needs(experts=True)
    works_with = {"structure": EXPERTS}
    hint = "ean ranks routed experts; use it with --structure experts on a mixture-of-experts model"

    def expert_scores(self, stats) -> torch.Tensor:
        return stats.norm.clone()
