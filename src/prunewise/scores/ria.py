"""RIA (Zhang et al., ICLR 2024; biomedical-cybernetics/Relative-importance-and-activation-pruning, ``prune_ria``):
relative importance times activation, ``(|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^a``.

A weight counts relative to its input column (every output reading input ``j``) and to its output row, so a
channel whose weights are all small is not emptied wholesale; ``a = 0.5`` is the reference's default. The
reference compares over the whole layer unless ``--per_outneuron`` (here ``--group layer``, the default, or
``row``). Its N:M channel reallocation permutes input channels before choosing N:M groups and leaves the mask
N:M only in the permuted order, which a stock checkpoint cannot run as N:M: not offered.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.registry import PartConfig, register
from ..core.stats import Needs
from .base import WEIGHT_LEVEL, Score


class RIAConfig(PartConfig):
    a: float = Field(0.5, ge=0, description="exponent of the input's L2 norm")


@register("score")
class RIAScore(Score):
    name = "ria"
    description = "RIA: |W| relative to its row's and its column's sums, times ||X||^a (a=0.5)"
    Config = RIAConfig
    needs = Needs(sq_norm=True)
    default_group = "layer"
    works_with = {"structure": WEIGHT_LEVEL}

    def importance(self, weight, stats, module: str = "?") -> torch.Tensor:
        W = weight.abs().float()
        tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column: its weights rank lowest, not NaN
        relative = W / W.sum(0, keepdim=True).clamp_min(tiny) + W / W.sum(1, keepdim=True).clamp_min(tiny)
        return relative * stats.sq_norm.float().sqrt().pow(self.config.a).unsqueeze(0)
