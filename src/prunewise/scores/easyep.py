"""EASY-EP (RUCAIBox/EASYEP, ``pruning/expert_selection.py``): output-aware expert importance from a few task
demonstrations, ``I_j = sum over tokens x routed to j of g_j(x) * ||f_j(x)|| * s(x)``, where
``s(x) = max(1 - cos(h, h'), 0)`` weighs each token by how much the MoE sublayer turns its residual stream (``h``
entering the sublayer, ``h' = h + MoE(norm(h))`` leaving it, the shared expert included). A sum over the calibration
tokens, so an expert used often by tokens the layer changes much ranks high; an expert no calibration token reaches
scores 0 and goes first. Task-aware by construction: ``--calibration my_task.jsonl`` gives EASY-EP's setting."""

from __future__ import annotations

import torch

from ..core.registry import register
from ..core.stats import Needs
from .base import EXPERTS, Score


@register("score")
class EasyEPScore(Score):
    name = "easyep"
    description = ("EASY-EP: sum over routed tokens of gate x expert output norm x how much the MoE sublayer turns "
                   "the token's hidden state (--structure experts)")
    needs = Needs(experts=True)
    works_with = {"structure": EXPERTS}
    hint = "easyep ranks routed experts; use it with --structure experts on a mixture-of-experts model"

    def expert_scores(self, stats) -> torch.Tensor:
        return stats.changed_norm.clone()
