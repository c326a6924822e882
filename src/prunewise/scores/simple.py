"""Scores that rank weights without updating the survivors: magnitude and Wanda."""

from __future__ import annotations

import torch

from .base import LinearStats, PruneOutcome


class _MaskOnly:
    """Prune by masking the least important weights; the survivors are left as they are."""

    def prune(self, weight, stats, structure, sparsity, module: str = "?") -> PruneOutcome:
        mask = structure.mask(self.importance(weight, stats, module), sparsity)
        return PruneOutcome(weight.masked_fill(mask, 0.0), mask)


class MagnitudeScore(_MaskOnly):
    """|W_ij|: the classic baseline (compared per layer by default, as in the Wanda repo's baseline)."""

    name = "magnitude"
    needs = None
    default_group = "layer"

    def importance(self, weight: torch.Tensor, stats: LinearStats | None, module: str = "?") -> torch.Tensor:
        return weight.abs().float()


class WandaScore(_MaskOnly):
    """|W_ij| * ||X_j||_2 over calibration tokens, compared per output row (Sun et al., 2023)."""

    name = "wanda"
    needs = "sq_norm"
    default_group = "row"

    def importance(self, weight: torch.Tensor, stats: LinearStats | None, module: str = "?") -> torch.Tensor:
        return weight.abs().float() * stats.sq_norm.sqrt().float().unsqueeze(0)
