"""LLM-Pruner's first-order Taylor score (Ma et al., 2023), element-wise: ``|W_ij * dL/dW_ij|`` with the
gradients of the language-model loss summed over the calibration windows; a structured unit sums it."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import UNITS, Score


@register("score")
class TaylorScore(Score):
    name = "taylor"
    description = "LLM-Pruner first-order Taylor |W * dL/dW|, gradients of the LM loss (structures)"
    needs = Needs(gradient="sum")
    works_with = {"structure": UNITS}
    hint = "taylor ranks structured units; use it with --structure channels, heads or width"

    def importance(self, weight, stats, module: str = "?") -> torch.Tensor:
        return self.unit_element(weight, stats)

    def unit_element(self, weight, stats) -> torch.Tensor:
        return (weight.float() * stats.gradient.float()).abs()
