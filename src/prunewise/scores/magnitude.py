"""Magnitude: |W_ij|, the classic baseline (compared per layer by default, as in the Wanda repo's baseline)."""

from __future__ import annotations

import torch

from ..core.registry import register
from .base import Score


@register("score")
class MagnitudeScore(Score):
    name = "magnitude"
    description = "|W|: weight magnitude, no data (group magnitude, the L2 norm of a unit's weights, for structures)"
    default_group = "layer"

    def importance(self, weight, stats=None, module: str = "?") -> torch.Tensor:
        return weight.abs().float()

    def unit_element(self, weight, stats=None) -> torch.Tensor:
        return weight.float().pow(2)

    def unit_finish(self, values: torch.Tensor) -> torch.Tensor:
        return values.sqrt()  # group magnitude is a norm: the root of the summed squares
