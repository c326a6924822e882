"""FLAP's fluctuation (An et al., 2024): per input channel of an output projection, the sample variance of
that input times the squared norm of its weight column; a structured unit sums its channels."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import UNITS, Score


@register("score")
class FluctuationScore(Score):
    name = "fluctuation"
    description = "FLAP: variance of an output projection's input channel x its squared weight column (structures)"
    needs = Needs(sq_norm=True, mean=True)
    works_with = {"structure": UNITS}
    hint = "fluctuation ranks structured units; use it with --structure channels, heads or width"

    @staticmethod
    def unit_scores(linears: dict, g, stats: dict) -> dict[str, torch.Tensor]:
        down, o = stats["down"], stats["o"]
        channels = down.variance.float() * linears["down"].weight.float().pow(2).sum(0)
        per_col = (o.variance.float() * linears["o"].weight.float().pow(2).sum(0)).pow(2)  # FLAP squares the attention metric
        return {"channels": channels, "query": per_col.view(g.heads, g.head_dim).sum(1), "kv": torch.zeros(g.kv_heads),
                "query_channels": per_col}
