"""GBLM-Pruner (Das et al., 2023; VILA-Lab/GBLM-Pruner ``lib/prune.py::prune_gblm``): gradients and activations.

``|W_ij| * sqrt(sum_t x_tj^2 / n) + |W_ij| * |G_ij|``, where ``n`` is the number of calibration
windows (the reference's running ``scaler_row``) and ``G = sqrt(sum_s (scale * g_s)^2)`` is the l2
norm over windows of the per-window gradients of the mean next-token loss
(``gradient_computation.py``, ``scale`` 100, one window per backward pass). Compared per output
row like Wanda; summed over a unit for structured pruning.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.registry import PartConfig, register
from ..core.stats import Needs
from .base import Score


class GBLMConfig(PartConfig):
    scale: float = Field(100.0, gt=0, description="factor on every per-window gradient (the reference's --scale)")


@register("score")
class GBLMScore(Score):
    name = "gblm"
    description = "GBLM-Pruner: |W| * ||X|| + |W| * l2 norm of per-window LM-loss gradients"
    Config = GBLMConfig
    needs = Needs(sq_norm=True, gradient="per_sample_l2")

    def importance(self, weight, stats, module: str = "?") -> torch.Tensor:
        w = weight.abs().float()
        activation = w * (stats.sq_norm / max(stats.windows, 1)).sqrt().float().unsqueeze(0)
        return activation + w * (stats.gradient.float() * self.config.scale).abs()
